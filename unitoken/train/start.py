"""Where a stage starts: the model it loads (verified against the hand-off it came from) and its
optimizer (AdamW, the ViT in its own group, warmup + cosine)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from unitoken.config import Recipe, StageConfig, config_hash
from unitoken.model import handoff as handoff_fmt
from unitoken.model.io import is_handoff_dir


def build_optimizer(model: torch.nn.Module, stage: StageConfig):
    """AdamW with the ViT in its own group (its own LR), no decay on biases/norms; warmup + cosine."""
    groups = {"vision": ([], []), "rest": ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "vision" if name.startswith("vision.") else "rest"
        groups[key][0 if p.ndim >= 2 and "embed" not in name else 1].append(p)
    o = stage.optim
    params = []
    for key, (decay, no_decay) in groups.items():
        lr = o.vision_lr if key == "vision" else o.lr
        for ps, wd in ((decay, o.weight_decay), (no_decay, 0.0)):
            if ps:
                params.append({"params": ps, "lr": lr, "weight_decay": wd, "name": f"{key}{'' if wd else '_no_decay'}"})
    # fused: one kernel for the whole update on a GPU instead of a loop over tensors
    fused = all(p.is_cuda for g in params for p in g["params"])
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None)
    warmup = max(1, round(o.warmup_fraction * stage.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, stage.max_steps - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def starting_point(stage_n: int, recipe: Recipe, init: str | Path) -> tuple[Path, dict]:
    """The model a stage starts from, verified before it is loaded: (directory, parent hand-off doc).

    Raises:
        FileNotFoundError: ``init`` is no model directory.
        HandoffError: a hand-off of the wrong stage or config, or with a changed file.
    """
    init = Path(init)
    if not init.is_dir():
        raise FileNotFoundError(f"--init {init}: no such directory; fix: pass `unitoken model init`'s --out for "
                                "stage 1, or the handoff/ folder of the previous stage, e.g. runs/stage1/handoff")
    if stage_n > 1 and not (init / handoff_fmt.HANDOFF).is_file() and not (
            recipe.model.encoder_mode == "discrete" and is_handoff_dir(init)):
        raise handoff_fmt.HandoffError(f"--init {init}: not a stage hand-off (no {handoff_fmt.HANDOFF}); fix: pass the handoff/ "
                                f"folder of a finished stage {stage_n - 1}, e.g. runs/stage{stage_n - 1}/handoff")
    if stage_n > 1 and recipe.model.encoder_mode == "discrete" and not (init / handoff_fmt.HANDOFF).is_file() \
            and is_handoff_dir(init):
        # Stage 1 trains only the continuous path (vision + adapter), which a discrete-only model
        # lacks: its stage 2 starts from the initialisation (the Table 5 ablation).
        return init, {"stage": 0, "files": {}}
    if stage_n > 1:
        # Stage N starts from stage N-1; re-running stage N on new data from a stage-N model (e.g. a
        # registered champion, stage-scoped retraining) is allowed too.
        return init, handoff_fmt.verify_handoff(init, expect_stage=(stage_n - 1, stage_n),
                                         expect_config_hash=config_hash(recipe.model))
    if (init / handoff_fmt.HANDOFF).is_file():
        return init, handoff_fmt.verify_handoff(init, expect_config_hash=config_hash(recipe.model))
    if is_handoff_dir(init):
        return init, {"stage": 0, "files": {}}
    raise FileNotFoundError(f"--init {init}: not a model directory (no config.json and weights); fix: create one "
                            "with `unitoken model init --recipe R --out DIR` and pass DIR")
