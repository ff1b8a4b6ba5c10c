"""Periodic checkpoints (for exact resume); the hand-off format is ``unitoken.model.handoff``.

Periodic checkpoints live in ``OUT/checkpoints/step_000010``. Each is written into a
temporary directory and renamed when complete, so a directory with that name is always a
whole checkpoint; anything else (``.tmp-*``) is debris from an interrupted write and ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STEP_PREFIX = "step_"


# --------------------------------------------------------------------------- periodic


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete periodic checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "meta.json").is_file():
            try:
                found.append((int(p.name[len(STEP_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(found)


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{STEP_PREFIX}{step:06d}"


def prepare_tmp(root: Path, step: int) -> Path:
    """An empty temporary directory for the checkpoint of ``step`` (rank 0 only)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(root: Path, step: int, meta: dict, keep: int = 2) -> Path:
    """Finish a checkpoint: meta.json last, then one rename makes it visible; prune old ones."""
    tmp = tmp_dir(root, step)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def clean_debris(root: Path) -> int:
    debris = list(root.glob(".tmp-*")) if root.is_dir() else []
    for d in debris:
        shutil.rmtree(d)
    return len(debris)


# --------------------------------------------------------------------------- hand-off
