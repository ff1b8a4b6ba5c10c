"""Model directories: our hand-off format, and the released formats we initialise from.

Hand-off format (what every ``unitoken`` command reads and writes)::

    DIR/config.json        {"format": "unitoken", "format_version": 1, "model": ModelConfig,
                            "recipe": name (optional: the recipe it was built or trained with)}
    DIR/model.safetensors  every weight (llm.*, lm_head.*, vision.*, adapter.*, vq.*)
    DIR/tokenizer.json     + tokenizer_config.json: the Chameleon-layout tokenizer

No pickle anywhere: safetensors for tensors, JSON for the rest. Saving and loading is a
bit-identical round trip.

Released formats (``load_pretrained``), each recognised from its files:
    Lumina-mGPT / Chameleon HF dir   config.json with model_type "chameleon" (+ tokenizer)
    SigLIP HF dir                    config.json with model_type "siglip" / "siglip_vision_model"
    Chameleon VQ-GAN                 vqgan.yaml + vqgan.ckpt (taming layout)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unitoken.config import LLMConfig, ModelConfig, from_dict, to_dict
from unitoken.model.tokens import build_tokenizer
from unitoken.model.unitoken import UniToken
from unitoken.model.vq import at_resolution, load_taming_state_dict, vq_config_from_taming_yaml

log = logging.getLogger(__name__)
FORMAT = "unitoken"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
LEGACY_ROW_END = "adapter.row_end"  # a learned AnyRes marker, replaced by the newline embedding


def save_model(model: UniToken, tokenizer, out: str | Path, state: dict[str, torch.Tensor] | None = None,
               recipe: str | None = None) -> Path:
    """Write ``model`` in the hand-off format (temporary dir, then rename: never half-written).

    ``state`` replaces ``model.state_dict()`` (weights gathered from a ZeRO-3 engine); ``recipe``
    is recorded so that commands can use its settings (image sampling) with the model.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(model.config)}
    if recipe:
        doc["recipe"] = recipe
    (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def is_handoff_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[UniToken, object]:
    """Load a model directory (a hand-off, ``unitoken model init``'s output) -> (model, tokenizer).
    Registry URIs are resolved where a command starts (``unitoken.registry.model_dir``).

    Raises:
        FileNotFoundError / ValueError: not a hand-off dir, wrong format version, missing or
            unexpected weights (names listed).
    """
    if str(path).startswith("models:/"):
        raise ValueError(f"{path}: a registry URI; fetch it first with unitoken.registry.model_dir")
    path = Path(path)
    if not is_handoff_dir(path):
        raise FileNotFoundError(f"{path}: not a unitoken model directory (no config.json with "
                                f"format={FORMAT!r}); create one with `unitoken model init`")
    doc = json.loads((path / "config.json").read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {doc.get('format_version')} is not supported "
                         f"(this unitoken reads {FORMAT_VERSION})")
    cfg = from_dict(ModelConfig, doc["model"], "model")
    tokenizer = load_tokenizer(path)
    model = UniToken(cfg, tokenizer.get_vocab())
    state = load_file(str(path / WEIGHTS))
    if LEGACY_ROW_END in state:
        raise ValueError(
            f"{path}: has {LEGACY_ROW_END}, the learned AnyRes end-of-row embedding of models made before "
            "2026-12-05. AnyRes now ends rows with the newline token's embedding and pads tiles instead of "
            "stretching them (as the UniToken reference does), so this model's AnyRes features would change "
            "meaning under it. Train the AnyRes stages again from a model without it (e.g. the non-AnyRes "
            "stage it started from, or `unitoken model init`)")
    _load_exact(model, state, str(path / WEIGHTS))
    model.to(device=device, dtype=dtype) if dtype else model.to(device)
    model.vq.float()  # the VQ-GAN decodes in fp32
    return model, tokenizer


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing {len(missing)} "
                         f"(e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})")


# --------------------------------------------------------------------------- released formats


def detect_format(path: str | Path) -> str:
    """'handoff' | 'chameleon' | 'siglip' | 'vqgan' from the files in ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    if is_handoff_dir(path):
        return "handoff"
    if (path / "vqgan.yaml").is_file() and (path / "vqgan.ckpt").is_file():
        return "vqgan"
    cfg = path / "config.json"
    if cfg.is_file():
        model_type = json.loads(cfg.read_text()).get("model_type", "")
        if model_type == "chameleon":
            return "chameleon"
        if model_type in ("siglip", "siglip_vision_model"):
            return "siglip"
        raise ValueError(f"{path}: config.json has model_type={model_type!r}; expected chameleon or siglip")
    raise ValueError(f"{path}: not a released model directory (need config.json, or vqgan.yaml + vqgan.ckpt)")


def _changed(kind: str, old, new) -> None:
    diffs = {f.name: (getattr(old, f.name), getattr(new, f.name)) for f in dataclasses.fields(old)
             if getattr(old, f.name) != getattr(new, f.name)}
    if diffs:
        log.warning("%s shape taken from the pretrained weights, not the recipe: %s", kind,
                    ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diffs.items()))


def init_model(cfg: ModelConfig, pretrained: list[str | Path] = (), seed: int = 0) -> tuple[UniToken, object]:
    """Build a model from a recipe's ``ModelConfig``, then load released weights over it.

    Component shapes come from the pretrained directories when given (a warning lists every
    value that differs from the recipe). Returns (model, tokenizer).
    """
    from transformers import ChameleonConfig, SiglipVisionConfig

    found: dict[str, Path] = {}
    for p in pretrained:
        kind = detect_format(p)
        if kind == "handoff":
            raise ValueError(f"{p}: already a unitoken model; use it directly as --model / --init")
        if kind in found:
            raise ValueError(f"two {kind} directories given: {found[kind]} and {p}")
        found[kind] = Path(p)

    tokenizer = None
    if "vqgan" in found:
        released = vq_config_from_taming_yaml(found["vqgan"] / "vqgan.yaml", cfg.vq.grid_unit_px)
        # The image size is the recipe's (the paper: 512 px, 32 x 32 codes): the yaml's resolution
        # only places the attention blocks (``at_resolution``).
        new = at_resolution(released, cfg.vq.resolution)
        if released.resolution != cfg.vq.resolution:
            log.warning("%s: ddconfig.resolution is %d, the recipe's vq.resolution %d; images are encoded "
                        "and generated at %d px (%d x %d codes), the yaml's value only places attention "
                        "(attn_resolutions %s -> %s). Set model.vq.resolution to change the image size",
                        found["vqgan"] / "vqgan.yaml", released.resolution, cfg.vq.resolution,
                        new.resolution, new.codes_per_side, new.codes_per_side,
                        list(released.attn_resolutions), list(new.attn_resolutions))
        _changed("vq", cfg.vq, new)
        cfg = dataclasses.replace(cfg, vq=new)
    if "chameleon" in found:
        hf = ChameleonConfig.from_pretrained(str(found["chameleon"]))
        new = LLMConfig(hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                        num_kv_heads=hf.num_key_value_heads, vocab_size=hf.vocab_size,
                        max_position_embeddings=hf.max_position_embeddings,
                        swin_norm=hf.swin_norm, rope_theta=float(_rope_theta(hf)),
                        rms_norm_eps=hf.rms_norm_eps, attn_implementation=cfg.llm.attn_implementation)
        _changed("llm", cfg.llm, new)
        cfg = dataclasses.replace(cfg, llm=new)
        tokenizer = load_tokenizer(found["chameleon"])
    if "siglip" in found:
        sv = SiglipVisionConfig.from_pretrained(str(found["siglip"]))
        new = dataclasses.replace(cfg.vision, hidden_size=sv.hidden_size, intermediate_size=sv.intermediate_size,
                                  num_layers=sv.num_hidden_layers, num_heads=sv.num_attention_heads,
                                  image_size=sv.image_size, patch_size=sv.patch_size,
                                  layer_norm_eps=sv.layer_norm_eps)
        _changed("vision", cfg.vision, new)
        cfg = dataclasses.replace(cfg, vision=new)
    cfg = from_dict(ModelConfig, to_dict(cfg), "model")  # re-validate the combination

    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    torch.manual_seed(seed)
    model = UniToken(cfg, tokenizer.get_vocab())

    if "chameleon" in found:
        _load_chameleon(model, found["chameleon"], vq_from_llm="vqgan" not in found)
    if "siglip" in found:
        _load_siglip(model, found["siglip"])
    if "vqgan" in found:
        state = load_taming_state_dict(found["vqgan"] / "vqgan.ckpt")
        _load_exact(model.vq, state, str(found["vqgan"] / "vqgan.ckpt"))
    return model, tokenizer


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_chameleon(model: UniToken, path: Path, vq_from_llm: bool) -> None:
    """``model.*`` -> llm, ``lm_head.*`` -> lm_head, ``model.vqmodel.*`` -> vq encoder side."""
    state = _read_safetensors_dir(path)
    llm, head, vq = {}, {}, {}
    for key, value in state.items():
        if key.startswith("model.vqmodel."):
            vq[key[len("model.vqmodel."):]] = value
        elif key.startswith("model."):
            llm[key[len("model."):]] = value
        elif key.startswith("lm_head."):
            head[key[len("lm_head."):]] = value
    _load_exact(model.llm, llm, f"{path} (model.*)")
    if not head:  # tied embeddings
        head = {"weight": llm["embed_tokens.weight"]}
    _load_exact(model.lm_head, head, f"{path} (lm_head.*)")
    if vq_from_llm and vq:
        # The HF checkpoint carries only the VQ encoder; the decoder stays random until a
        # VQ-GAN checkpoint is given, so say so loudly.
        missing, unexpected = model.vq.load_state_dict(vq, strict=False)
        if unexpected or any(not k.startswith("decoder.") and not k.startswith("post_quant_conv.")
                             for k in missing):
            raise ValueError(f"{path}: model.vqmodel.* does not match vq: unexpected {unexpected[:3]}")
        log.warning("%s has the VQ encoder only: image decoding needs the VQ-GAN checkpoint "
                    "(pass its directory with vqgan.yaml + vqgan.ckpt too)", path)


def _load_siglip(model: UniToken, path: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if model.vision is None:
        raise ValueError("encoder mode 'discrete' has no vision tower to load SigLIP into")
    from transformers.utils import logging as hf_logging

    # A released SigLIP dir holds the text tower too; transformers reports those keys as
    # unexpected, which is expected here. Our strict check below is the one that counts.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = SiglipVisionConfig.from_pretrained(str(path))
        config.vision_use_head = False  # set on the config: older transformers refuse it as a kwarg
        tower = SiglipVisionModel.from_pretrained(str(path), config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    _load_exact(model.vision, tower.state_dict(), str(path))
