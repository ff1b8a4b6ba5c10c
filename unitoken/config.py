"""Typed configuration: one source of truth for model shapes, optimisation and stages.

Every dataclass validates itself in ``__post_init__`` and names the offending field (its
dotted path from the recipe root) and the fix. Recipes (``unitoken.recipes``) build these;
the command line only picks a recipe and applies ``--set a.b=value`` overrides, which go
through the same validation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from unitoken.layout import max_input_image_tokens, min_seq_len

ENCODER_MODES = ("dual", "discrete", "continuous")
FREEZE_PREFIXES = ("vision", "adapter", "llm", "lm_head")
ANYRES_GRIDS = ((2, 2), (1, 2), (1, 3), (2, 1), (3, 1))  # UniToken tech report, AnyRes


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(ok: bool, field_name: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {problem}; fix: {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(
            isinstance(value, int | float) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive number, got {value!r}",
            f"set {name} to a value > 0",
        )


# --------------------------------------------------------------------------- model


@dataclass
class LLMConfig:
    """Chameleon decoder shape (maps 1:1 onto ``transformers.ChameleonConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    swin_norm: bool = False  # only Chameleon-30B uses Swin-style norm placement
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "vocab_size", "max_position_embeddings")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
                 "choose hidden_size = num_heads * head_dim")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}",
                 "use a divisor of num_heads")
        _require(self.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flex_attention"),
                 "attn_implementation", f"unknown value {self.attn_implementation!r}",
                 "use sdpa (default) or eager")


@dataclass
class VisionConfig:
    """SigLIP vision tower (continuous path) and the AnyRes tiling of its input."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    anyres: bool = False
    anyres_grids: tuple[tuple[int, int], ...] = ANYRES_GRIDS  # (rows, cols) of image_size tiles
    # Pixel budget of a grid's canvas: at most anyres_max_size**2 pixels. 768 is the report's
    # "max 768x768": four 384-px tiles (2x2), which admits 1x3 and 3x1 (384x1152, three tiles)
    # as the reference's grid pinpoints do. A bound on the longest side would drop them.
    anyres_max_size: int = 768
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "image_size", "patch_size", "anyres_max_size")
        # SigLIP-so400m: 384 px / 14 px patches = 27 patches per side (the conv floors).
        _require(self.image_size >= self.patch_size, "image_size",
                 f"{self.image_size} is smaller than patch_size={self.patch_size}",
                 "use image_size >= patch_size")
        _require(self.hidden_size % self.num_heads == 0, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
                 "choose hidden_size = num_heads * head_dim")
        self.anyres_grids = tuple(tuple(int(x) for x in g) for g in self.anyres_grids)
        _require(all(len(g) == 2 and min(g) >= 1 for g in self.anyres_grids), "anyres_grids",
                 f"every grid must be (rows, cols) >= 1, got {self.anyres_grids}",
                 "use pairs such as [[2, 2], [1, 2]]")
        _require(bool(self.anyres_grids), "anyres_grids", "is empty", "use pairs such as [[2, 2], [1, 2]]")
        smallest = min(rows * cols for rows, cols in self.anyres_grids) * self.image_size ** 2
        _require(not self.anyres or bool(self.allowed_grids), "anyres_max_size",
                 f"{self.anyres_max_size} admits none of anyres_grids={self.anyres_grids} "
                 f"({self.image_size}-px tiles)",
                 f"use anyres_max_size >= {math.isqrt(smallest - 1) + 1} or smaller grids")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def allowed_grids(self) -> tuple[tuple[int, int], ...]:
        """The AnyRes grids whose canvas fits the pixel budget (``anyres_max_size**2``)."""
        return tuple((rows, cols) for rows, cols in self.anyres_grids
                     if rows * cols * self.image_size ** 2 <= self.anyres_max_size ** 2)


@dataclass
class VQConfig:
    """Chameleon-style VQ-GAN (taming layout): encoder, quantizer, decoder."""

    num_codes: int
    embed_dim: int
    latent_channels: int
    base_channels: int
    channel_multiplier: tuple[int, ...]
    resolution: int
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    grid_unit_px: int = 32  # Lumina-mGPT grid tokens count image size in 32-px units
    # The one precision images are VQ-encoded in, for pre-tokenisation, evaluation, chat and serving
    # alike: codes are generation targets and model inputs, and bf16 vs fp32 flips 2-11 % of them
    # (docs/performance.md), a train/serve skew. "float32" also turns TF32 off for the encoder.
    encode_dtype: str = "float32"
    # On a GPU, run the encoder through torch.compile (fused norms and activations: 2.7x the eager
    # bf16 rate measured on an H200) in every command alike, so the codes stay the same codes
    # everywhere; a CPU encodes eagerly (its codes differ from a GPU's by rounding in any case).
    encode_compiled: bool = False

    def __post_init__(self) -> None:
        _positive(self, "num_codes", "embed_dim", "latent_channels", "base_channels",
                  "resolution", "num_res_blocks", "grid_unit_px")
        self.channel_multiplier = tuple(int(x) for x in self.channel_multiplier)
        self.attn_resolutions = tuple(int(x) for x in self.attn_resolutions)
        _require(len(self.channel_multiplier) >= 1, "channel_multiplier", "is empty",
                 "give one multiplier per resolution level, e.g. [1, 1, 2, 2, 4]")
        for mult in self.channel_multiplier:
            _require(self.base_channels * mult % 32 == 0, "base_channels",
                     f"base_channels*{mult} is not a multiple of 32 (GroupNorm has 32 groups)",
                     "use a multiple of 32")
        _require(self.resolution % self.downsample == 0, "resolution",
                 f"{self.resolution} is not divisible by the downsample factor {self.downsample}",
                 "use a multiple of 2**(len(channel_multiplier)-1)")
        _require(self.encode_dtype in ("float32", "bfloat16"), "encode_dtype", f"got {self.encode_dtype!r}",
                 "use float32 (exact on every device) or bfloat16 (faster on GPUs; keep every step on one device type)")
        _require(self.resolution % self.grid_unit_px == 0, "resolution",
                 f"{self.resolution} is not a multiple of grid_unit_px={self.grid_unit_px}",
                 "use a resolution in whole grid units")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def codes_per_side(self) -> int:
        return self.resolution // self.downsample


@dataclass
class ModelConfig:
    llm: LLMConfig
    vision: VisionConfig
    vq: VQConfig
    encoder_mode: str = "dual"  # dual | discrete | continuous (the paper's ablations)
    z_loss_weight: float = 1e-5
    max_grid_tokens: int = 64  # grid tokens <reserved08801>..; 64 units of 32 px = 2048 px

    def __post_init__(self) -> None:
        _require(self.encoder_mode in ENCODER_MODES, "encoder_mode",
                 f"unknown mode {self.encoder_mode!r}", f"use one of {', '.join(ENCODER_MODES)}")
        _require(self.z_loss_weight >= 0, "z_loss_weight", f"negative ({self.z_loss_weight})",
                 "use 0 to disable, 1e-5 as in the paper")
        _require(self.vq.resolution // self.vq.grid_unit_px <= self.max_grid_tokens,
                 "max_grid_tokens", "too few grid tokens for vq.resolution",
                 "raise max_grid_tokens")


# --------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    lr: float
    vision_lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_fraction: float = 0.01
    min_lr_ratio: float = 0.0
    grad_clip: float = 4.0

    def __post_init__(self) -> None:
        _positive(self, "lr", "vision_lr", "grad_clip")
        self.betas = tuple(float(b) for b in self.betas)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"need two values in [0, 1), got {self.betas}", "use [0.9, 0.95]")
        _require(0 <= self.warmup_fraction < 1, "warmup_fraction",
                 f"must be in [0, 1), got {self.warmup_fraction}", "use 0.01 (1% of the steps)")
        _require(self.weight_decay >= 0, "weight_decay", "negative", "use 0.1")


@dataclass
class StageConfig:
    """One training stage: what trains, at which rates, on which data mix."""

    trainable: tuple[str, ...]
    optim: OptimConfig
    max_steps: int
    batch_size: int
    understanding_ratio: float = 1.0  # understanding : generation sampling weights
    generation_ratio: float = 0.0
    text_ratio: float = 0.0
    max_seq_len: int = 4096
    sources: tuple[str, ...] = ()  # manifest `source` values this stage trains on; () = all
    # The mixture by source: {source: weight}, samples drawn in proportion to the weights (each
    # source's records reshuffled per epoch of that source), instead of the task ratios above; the
    # sources it names are the stage's data. The reference's data configs (`ratio` per file) import
    # as weight = ratio x records (`unitoken data mixture import`).
    source_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        self.sources = tuple(self.sources)
        self.source_weights = {str(k): float(v) for k, v in dict(self.source_weights or {}).items()}
        bad = {k: v for k, v in self.source_weights.items() if not v >= 0}
        _require(not bad, "source_weights", f"weights must be >= 0, got {bad}", "e.g. {vqa: 3, t2i: 1}")
        _require(not self.source_weights or sum(self.source_weights.values()) > 0, "source_weights",
                 "all weights are 0", "give at least one source a weight above 0")
        outside = sorted(set(self.source_weights) - set(self.sources)) if self.sources else []
        _require(not outside, "source_weights", f"names {outside}, which are not among the stage's sources "
                 f"{list(self.sources)}", "weight only the stage's sources, or set train.stageN.sources=[] first")
        unknown = sorted(set(self.trainable) - set(FREEZE_PREFIXES))
        _require(not unknown, "trainable", f"unknown module prefixes {unknown}",
                 f"use a subset of {list(FREEZE_PREFIXES)}")
        _require(bool(self.trainable), "trainable", "is empty", "name at least one module prefix")
        _positive(self, "max_steps", "batch_size", "max_seq_len")
        ratios = (self.understanding_ratio, self.generation_ratio, self.text_ratio)
        _require(all(r >= 0 for r in ratios) and sum(ratios) > 0, "understanding_ratio",
                 f"data ratios must be >= 0 and not all zero, got {ratios}",
                 "e.g. understanding_ratio=1 generation_ratio=1")


@dataclass
class TrainConfig:
    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 on CPU (bf16 is 25-30x slower there), bf16 on GPU
    dropout: float = 0.05  # residual dropout on each decoder layer's attention and MLP outputs (the reference's)
    seed: int = 0
    save_every: int = 1000
    # periodic checkpoints: training waits only for the copy to host memory, a thread writes the
    # files (unitoken.train.staged_checkpoint); false: it waits for DeepSpeed's torch.save
    async_checkpoint: bool = True
    # Keep this many periodic checkpoints (the newest); older ones are deleted once a newer one is
    # published. The hand-off is separate and always kept.
    keep_checkpoints: int = 2
    # Token slots of one micro-batch: a rank's share of the global batch is cut into micro-batches
    # of at most this many and their gradients accumulated (the step stays the same step). "auto":
    # planned from the card's free memory once the model and optimizer are placed
    # (unitoken.train.memory); on a CPU, or with no budget, one micro-batch holds the whole share.
    micro_batch_tokens: int | str = "auto"
    activation_checkpointing: bool = True
    # Decoder layers whose activations are recomputed when activation_checkpointing is on: "auto" =
    # as few as the memory plan needs (every layer where no plan is made: the reference), -1 =
    # every layer, n = the first n.
    checkpoint_layers: int | str = "auto"
    packing: bool = True  # pack samples into max_seq_len rows (False: pad to the longest)
    # "sdpa": stock attention (packed rows get a dense block-diagonal mask); "varlen": each
    # packed sample attends only to itself through a variable-length kernel (needs packing).
    attention: str = "sdpa"
    ce_chunk: int = 0  # rows per chunk of the fused head + cross-entropy (0 = all at once, fp32)
    # GiB one micro-batch's activations may use; 0 = measured on the GPU (what is free once the
    # model, optimizer and ZeRO state are placed, less gradients and a margin). The memory plan
    # (micro_batch_tokens, checkpoint_layers: auto) is made against it.
    activation_budget_gib: float = 0.0
    compile: bool = False  # torch.compile every decoder layer (GPU; +27 % tokens/s measured on the 7B shape)
    cfg_dropout: float = 0.1  # share of generation samples whose prompt is dropped (for CFG)
    # batches drawn and collated ahead on a thread while the accelerator trains (0: inline);
    # the batches are the same either way
    prefetch: int = 2
    log_every: int = 1
    # "token": mean cross-entropy over every supervised token of the batch (the paper). "sample":
    # every sample weighs the same, so a 3-token answer is not drowned by 270 image tokens.
    loss_reduction: str = "token"
    # Keep SigLIP's patch and position embeddings frozen in every stage, as the reference does
    # (a pretrained tower; a tower trained from scratch needs them trainable).
    freeze_vision_embeddings: bool = False
    # Profile this step (0 = none) with torch.profiler: OUT/profile_step<N>.txt lists the operators
    # by device time and how much of the step's wall time the accelerator was busy.
    profile_step: int = 0

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"got {self.zero_stage}",
                 "use 0, 1, 2 or 3")
        _require(self.precision in ("fp32", "bf16"), "precision", f"got {self.precision!r}",
                 "use fp32 (CPU) or bf16 (GPU)")
        _require(0 <= self.dropout < 1, "dropout", f"got {self.dropout}", "use 0.05")
        _require(0 <= self.cfg_dropout < 1, "cfg_dropout", f"got {self.cfg_dropout}", "use 0.1")
        _require(self.loss_reduction in ("token", "sample"), "loss_reduction", f"got {self.loss_reduction!r}",
                 "use token (mean over supervised tokens) or sample (mean over samples)")
        _positive(self, "save_every", "log_every")
        _require(self.attention in ("sdpa", "varlen"), "attention", f"got {self.attention!r}",
                 "use sdpa (stock) or varlen (packed samples, no padding)")
        _require(self.attention != "varlen" or self.packing, "attention",
                 "varlen needs packed rows (train.packing=false)", "set train.packing=true or train.attention=sdpa")
        _require(self.prefetch >= 0, "prefetch", f"got {self.prefetch}", "use 0 (draw inline) or e.g. 2")
        _require(self.ce_chunk >= 0, "ce_chunk", f"got {self.ce_chunk}", "use 0 (off) or e.g. 4096")
        _require(self.activation_budget_gib >= 0, "activation_budget_gib", f"got {self.activation_budget_gib}",
                 "use 0 (off) or the GiB left for activations")
        _require(self.checkpoint_layers == "auto" or _is_int(self.checkpoint_layers) and self.checkpoint_layers >= -1,
                 "checkpoint_layers", f"got {self.checkpoint_layers!r}",
                 "use auto (as the memory plan needs), -1 (every layer) or a number of layers >= 0")
        _require(self.micro_batch_tokens == "auto" or _is_int(self.micro_batch_tokens) and self.micro_batch_tokens > 0,
                 "micro_batch_tokens", f"got {self.micro_batch_tokens!r}",
                 "use auto (planned from the card's memory) or a number of tokens, e.g. 16384")
        _require(_is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1, "keep_checkpoints",
                 f"got {self.keep_checkpoints!r}", "keep at least 1 (2: the newest and the one before)")
        _require(_is_int(self.profile_step) and self.profile_step >= 0, "profile_step",
                 f"got {self.profile_step!r}", "use 0 (off) or the step to profile, e.g. 4 (after compilation)")

    def stage(self, n: int) -> StageConfig:
        _require(n in (1, 2, 3), "stage", f"got {n}", "use 1, 2 or 3")
        return getattr(self, f"stage{n}")


@dataclass
class SamplingConfig:
    """Image-generation defaults: what `unitoken generate` and `unitoken eval` use when the
    command line does not say (``--cfg``, ``--top-k``)."""

    cfg: float = 3.0  # classifier-free guidance scale (1.0 = off)
    top_k: int = 0  # sample among the k most likely image tokens (0 = all)

    def __post_init__(self) -> None:
        _require(self.cfg >= 0, "cfg", f"negative ({self.cfg})", "use 1.0 (off) or e.g. 5.5")
        _require(self.top_k >= 0, "top_k", f"negative ({self.top_k})", "use 0 (all image tokens) or e.g. 4000")


@dataclass
class GateConfig:
    """What a model of this recipe must reach to be registered, champion or not: the gate's
    floors (``unitoken.eval.gate``). A pipeline's ``gate_policy`` parameter replaces them."""

    # metric -> lowest acceptable score, e.g. {"shapes-vqa/overall": 0.3}
    floors: dict[str, float] = field(default_factory=dict)
    # suites whose 95 % interval (Wilson) must lie wholly above the suite's chance level
    above_chance: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for metric, floor in self.floors.items():
            _require("/" in str(metric), f"gate.floors.{metric}", "not a metric name",
                     "use SUITE/METRIC, e.g. shapes-vqa/overall")
            _require(isinstance(floor, int | float) and not isinstance(floor, bool) and 0 <= floor <= 1,
                     f"gate.floors.{metric}", f"{floor!r} is not a score in [0, 1]", "use e.g. 0.3")


@dataclass
class Recipe:
    name: str
    model: ModelConfig
    train: TrainConfig
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. paper targets)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        need = min_seq_len(self.model)
        for n in (1, 2, 3):
            have = self.train.stage(n).max_seq_len
            _require(have >= need, f"train.stage{n}.max_seq_len",
                     f"{have} tokens cannot hold one input image of this model ({max_input_image_tokens(self.model)} "
                     f"tokens at worst{', AnyRes grids included' if self.model.vision.anyres else ''}) in a conversation",
                     f"raise it to at least {need} (plus room for text)")


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    import hashlib

    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown field; "
                          f"fix: use one of {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path + '.' if path else ''}{err}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    return value


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``a.b.c=value`` overrides (YAML-parsed values) and re-validate everything.

    Raises:
        ConfigError: malformed override, unknown key, or a value that fails validation.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.seed=1")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                here = ".".join(parts[:i]) or "<root>"
                options = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"--set {key}: unknown field {part!r} under {here}; "
                                  f"fix: use one of {options}")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(cfg), data)
