"""Named recipes, as Python functions that derive from each other (torchtitan's lesson: no
YAML registries). ``get_recipe("tiny", ["train.seed=1"])`` applies ``--set`` overrides.

    unitoken-7b          the paper: Chameleon-7B + SigLIP-so400m-patch14-384 + VQ-GAN at 512 px
    unitoken-7b-anyres   the same with AnyRes tiling on the continuous path
    small                one GPU, ~130M parameters, trains through three stages in minutes
    demo                 `make demo`: the tiny model trained until it answers above chance (CPU, minutes)
    tiny                 CPU, a few hundred thousand parameters, trains in seconds (tests)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from unitoken.config import (
    GateConfig,
    LLMConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    SamplingConfig,
    StageConfig,
    TrainConfig,
    VisionConfig,
    VQConfig,
    apply_overrides,
)
from unitoken.layout import max_input_image_tokens, min_vocab_size

ALL = ("vision", "adapter", "llm", "lm_head")
# Stage data of the synthetic shapes set (`unitoken data synth`): captions to align vision;
# VQA + all text-to-image for joint training; dialogues (+ replay) to tune.
SYNTH_STAGE1 = ("synth-caption",)
SYNTH_STAGE2 = ("synth-vqa", "synth-mc", "synth-t2i", "synth-t2i-fine")
# Stage 3 replays the stage-2 questions and prompts beside the dialogues: the dialogues ask only
# colour/shape/count, so tuning on them alone forgot positions and multiple choice (tiny run).
SYNTH_STAGE3 = ("synth-dialogue", "synth-vqa", "synth-mc", "synth-t2i", "synth-t2i-fine")


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def paper_stages(batch_size: int, max_steps: tuple[int, int, int]) -> TrainConfig:
    """Technical report Table 2: stage I aligns vision (LLM frozen, LR 1e-3, ViT 1e-5 because
    5e-4 collapsed SigLIP, report §4); stages II/III train all at 1e-5; 1:1 und:gen in II,
    423K dialogues : 100K fine-grained T2I (4.23:1) in III. SigLIP's patch and position
    embeddings stay frozen throughout (the reference's training scripts)."""
    return TrainConfig(
        stage1=StageConfig(trainable=("vision", "adapter"), optim=OptimConfig(lr=1e-3, vision_lr=1e-5),
                           max_steps=max_steps[0], batch_size=batch_size,
                           understanding_ratio=1.0, generation_ratio=0.0),
        stage2=StageConfig(trainable=ALL, optim=OptimConfig(lr=1e-5, vision_lr=1e-5),
                           max_steps=max_steps[1], batch_size=batch_size,
                           understanding_ratio=1.0, generation_ratio=1.0),
        stage3=StageConfig(trainable=ALL, optim=OptimConfig(lr=1e-5, vision_lr=1e-5),
                           max_steps=max_steps[2], batch_size=batch_size,
                           understanding_ratio=4.23, generation_ratio=1.0),
        zero_stage=3, precision="bf16", dropout=0.05, save_every=1000, activation_checkpointing=True,
        freeze_vision_embeddings=True,
    )


def unitoken_7b() -> Recipe:
    # 2.5M captions / 20M pairs / 523K samples at batch 128, one epoch each.
    vq = VQConfig(num_codes=8192, embed_dim=256, latent_channels=256, base_channels=128,
                  channel_multiplier=(1, 1, 2, 2, 4), resolution=512, num_res_blocks=2,
                  # bf16 at pre-tokenisation and inference alike: ~4x fp32 on the GPU (docs/performance.md)
                  encode_dtype="bfloat16", encode_compiled=True)
    model = ModelConfig(
        llm=LLMConfig(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, vocab_size=65536, max_position_embeddings=4096),
        vision=VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
                            image_size=384, patch_size=14),
        vq=vq,
    )
    # Generation as the paper evaluates GenEval: CFG 5.5 (T2I-CompBench++: 5.0, `--cfg 5.0`), and
    # image top-k 4000 at temperature 1.0, the reference's value with CFG 5.5 (demos/inference.py:
    # `gen_t, cfg, image_top_k = 1.0, 5.5, 4000`; its README also samples with image_top_k=4000).
    return Recipe(name="unitoken-7b", model=model, train=paper_stages(128, (19_531, 156_250, 4_086)),
                  description="UniToken as published (base resolution, no AnyRes)",
                  sampling=SamplingConfig(cfg=5.5, top_k=4000))


def unitoken_7b_anyres() -> Recipe:
    """unitoken-7b with AnyRes tiling, and rows long enough for it.

    A photo's AnyRes features alone outgrow the paper's 4,096-token rows (640x480 -> 2x2 grid:
    2,929 features, 3,990 tokens with the discrete block). The reference cuts ids + text to
    4,096 and inserts the continuous features after that, so its rows run to ~7,800 tokens;
    ours are sized up front instead: the worst-case AnyRes image (4,760 tokens) plus the room
    for text that unitoken-7b's rows leave beside a base image (4,096 - 1,790 = 2,306),
    rounded up to 7,168. A sample that still does not fit is an error naming it."""
    base = unitoken_7b()
    model = dataclasses.replace(base.model, vision=dataclasses.replace(base.model.vision, anyres=True))
    stages = {}
    for n in (1, 2, 3):
        stage = base.train.stage(n)
        text_room = stage.max_seq_len - max_input_image_tokens(base.model)
        stages[f"stage{n}"] = dataclasses.replace(
            stage, max_seq_len=_round_up(max_input_image_tokens(model) + text_room, 1024))
    return dataclasses.replace(base, name="unitoken-7b-anyres", model=model,
                               train=dataclasses.replace(base.train, **stages),
                               description="UniToken with AnyRes tiling of the continuous path")


def unitoken_7b_fast() -> Recipe:
    """unitoken-7b with the measured speed settings (docs/performance.md): packed samples with
    variable-length attention, the chunked head + cross-entropy, compiled decoder layers, and the
    memory plan (``unitoken.train.memory``): each rank's share of the 128-sample batch is cut
    into micro-batches that fit the card it runs on, with activation checkpointing on only as
    many layers as that needs. The paper's dropout 0.05 is residual dropout, so it goes with the
    varlen kernel (the speed measurements ran with dropout 0)."""
    base = unitoken_7b()
    # ZeRO-2, not the paper's ZeRO-3: ZeRO-3 gathers parameters in hooks on every Linear, which
    # break the compiled layers into pieces (dynamo hit its recompile limit in those hooks; 25k
    # tokens/s, 29 % MFU on one H100, docs/performance.md). A 7B's ZeRO-2 state over 8 GPUs of one
    # node is ~38 GB a GPU, which leaves the rest of an 80 GB card to the memory plan.
    train = dataclasses.replace(base.train, attention="varlen", ce_chunk=4096, packing=True,
                                activation_checkpointing=True, compile=True, zero_stage=2)
    return dataclasses.replace(base, name="unitoken-7b-fast", train=train,
                               description="unitoken-7b with varlen packing, chunked CE and compiled layers")


def small() -> Recipe:
    base = unitoken_7b()
    # 128-px images as an 8 x 8 code grid (16-px codes: a small object spans ~2 x 2 codes): an
    # image is 74 tokens instead of 272 with 8-px codes, so generation has a quarter of the
    # tokens to learn and every sample is ~2.3x shorter (runs 1-3 used 8-px codes; see
    # docs/results.md). `--set model.vq.channel_multiplier=[1,2,2,4]` gives the 16 x 16 grid.
    vq = VQConfig(num_codes=1024, embed_dim=64, latent_channels=64, base_channels=64,
                  channel_multiplier=(1, 1, 2, 2, 4), resolution=128, num_res_blocks=1)
    max_grid = 16
    model = ModelConfig(
        llm=LLMConfig(hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12,
                      num_kv_heads=12, vocab_size=_round_up(min_vocab_size(vq.num_codes, max_grid)),
                      max_position_embeddings=4096),
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6,
                            image_size=128, patch_size=16),
        vq=vq, max_grid_tokens=max_grid,
    )
    # From scratch in minutes, so far above the paper's 1e-5 (which fine-tunes a pretrained 7B):
    # a 113M decoder at ~100 samples per step trains stably at 6e-4; the randomly initialised
    # ViT needs more than the paper's 1e-5 (a pretrained SigLIP) to learn anything in stage 1.
    align = OptimConfig(lr=1e-3, vision_lr=2e-4, warmup_fraction=0.05, grad_clip=1.0)
    joint = OptimConfig(lr=6e-4, vision_lr=2e-4, warmup_fraction=0.05, min_lr_ratio=0.1, grad_clip=1.0)
    tune = OptimConfig(lr=3e-4, vision_lr=1e-4, warmup_fraction=0.05, min_lr_ratio=0.1, grad_clip=1.0)
    train = dataclasses.replace(
        base.train,
        # 256 samples (~40k tokens) per step: a 113M model leaves an H200 mostly idle at 96.
        stage1=dataclasses.replace(base.train.stage1, optim=align, max_steps=150, batch_size=256, sources=SYNTH_STAGE1),
        stage2=dataclasses.replace(base.train.stage2, optim=joint, max_steps=1200, batch_size=256, sources=SYNTH_STAGE2),
        # stage 3 stays 1:1 (what the small runs used): the synthetic set is not the paper's 423K/100K mix
        stage3=dataclasses.replace(base.train.stage3, optim=tune, max_steps=400, batch_size=256, sources=SYNTH_STAGE3,
                                   understanding_ratio=1.0, generation_ratio=1.0),
        # Each sample weighs the same: with mean-over-tokens a 3-token answer counts 1/90 of a
        # 270-token image block and understanding learns far slower than generation.
        zero_stage=2, save_every=500, dropout=0.0, activation_checkpointing=False, loss_reduction="sample",
        freeze_vision_embeddings=False,  # its ViT starts from random weights
        # Samples are ~100-250 tokens: padding them costs ~20 % pad tokens, while packing them
        # into 4096-token rows through stock SDPA makes every attention a 4096 x 4096 masked one
        # (10x the work). On a GPU, `--set train.packing=true --set train.attention=varlen` packs
        # without that cost (docs/performance.md: 6x the reference batching on this shape); the
        # small study trains that way with --fast. Padding stays the default: it also runs on CPUs.
        packing=False,
    )
    return Recipe(name="small", model=model, train=train, description="one GPU, ~130M parameters")


def tiny() -> Recipe:
    base = small()
    vq = VQConfig(num_codes=256, embed_dim=32, latent_channels=32, base_channels=32,
                  channel_multiplier=(1, 1, 2, 2), resolution=64, num_res_blocks=1)
    max_grid = 8
    model = ModelConfig(
        llm=LLMConfig(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=4,
                      vocab_size=_round_up(min_vocab_size(vq.num_codes, max_grid)),
                      max_position_embeddings=1024, attn_implementation="sdpa"),
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                            image_size=32, patch_size=8),
        vq=vq, max_grid_tokens=max_grid,
    )
    fast = OptimConfig(lr=2e-3, vision_lr=1e-3, warmup_fraction=0.05)
    train = dataclasses.replace(
        base.train,
        stage1=dataclasses.replace(base.train.stage1, optim=fast, max_steps=20, batch_size=8, max_seq_len=512),
        stage2=dataclasses.replace(base.train.stage2, optim=fast, max_steps=40, batch_size=8, max_seq_len=512),
        stage3=dataclasses.replace(base.train.stage3, optim=fast, max_steps=20, batch_size=8, max_seq_len=512),
        zero_stage=0, precision="fp32", save_every=10, activation_checkpointing=False, dropout=0.05, packing=True,
        loss_reduction="token",
    )
    # No floors: tiny trains for seconds (tests, smoke runs of the platform) and answers at or
    # below chance, so a first tiny model passes the gate on no evidence; `demo` has real floors.
    return Recipe(name="tiny", model=model, train=train, description="CPU, trains in seconds",
                  gate=GateConfig(floors={}, above_chance=()))


def demo() -> Recipe:
    """What `make demo` trains: the tiny model, long enough on 2 CPU cores to answer shapes-VQA
    above chance and to lower the held-out loss at every stage (docs/results.md, "Issue 26").

    Stage 1 only aligns the (random) vision path, so it is short; stage 2 carries the learning;
    stage 3's dialogues and replayed questions add ~0.05 VQA accuracy in 100 steps. Samples are
    padded, not packed (0.35 against 0.50 s per step here: packed rows attend 512 x 512), each
    sample weighs the same in the loss (short VQA answers would otherwise drown in image
    tokens) and there is no dropout (the model underfits). The gate's floors are the point of
    the demo: a first model registers only if its shapes-VQA 95 % interval lies above chance.
    """
    base = tiny()
    stages = {}
    for n, steps, lr in ((1, 5, 2e-3), (2, 300, 2e-3), (3, 100, 2e-3)):
        stage = base.train.stage(n)
        stages[f"stage{n}"] = dataclasses.replace(stage, max_steps=steps, batch_size=16,
                                                  optim=dataclasses.replace(stage.optim, lr=lr, vision_lr=lr / 2))
    train = dataclasses.replace(base.train, **stages, packing=False, dropout=0.0, loss_reduction="sample")
    gate = GateConfig(floors={"shapes-vqa/overall": 0.3}, above_chance=("shapes-vqa",))
    return dataclasses.replace(base, name="demo", train=train, gate=gate,
                               description="`make demo`: tiny, trained until it answers above chance on 2 CPU cores")


RECIPES: dict[str, Callable[[], Recipe]] = {
    "tiny": tiny,
    "demo": demo,
    "small": small,
    "unitoken-7b": unitoken_7b,
    "unitoken-7b-anyres": unitoken_7b_anyres,
    "unitoken-7b-fast": unitoken_7b_fast,
}


def sampling_defaults(model_dir: str | Path) -> tuple[SamplingConfig, str]:
    """Image-sampling defaults for a model directory: its recipe's (``config.json`` records the
    recipe, a stage hand-off's ``handoff.json`` too), else ``SamplingConfig()``.

    Returns:
        (sampling, where it came from), e.g. (SamplingConfig(5.5, 4000), "recipe unitoken-7b").
    """
    model_dir = Path(model_dir)
    for name in ("config.json", "handoff.json"):
        f = model_dir / name
        recipe = json.loads(f.read_text()).get("recipe") if f.is_file() else None
        if recipe in RECIPES:
            return RECIPES[recipe]().sampling, f"recipe {recipe}"
    return SamplingConfig(), "built-in defaults (the model names no known recipe)"


def get_recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    """Recipe by name, with ``--set key=value`` overrides applied and validated.

    Raises:
        ConfigError: unknown recipe name or bad override.
    """
    from unitoken.config import ConfigError

    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r}: unknown recipe; fix: use one of {sorted(RECIPES)}")
    recipe = RECIPES[name]()
    return apply_overrides(recipe, overrides) if overrides else recipe
