"""The hand-off between stages: a model directory plus ``handoff.json``.

``handoff.json`` holds the stage, step, recipe and config hash, data digest, the parent's
digest, the sha256 of every file, and digests of the trainable and the frozen parameters. Its
digest (the sha256 of ``handoff.json``) is what the next stage records as its parent, and the
registry's passport names. ``verify_handoff`` re-checks every file before a stage, the registry
or the server loads it. Training writes hand-offs; the registry, the pipeline and serving read
them: the format lives here, with the model, below all of them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from unitoken.files import sha256_file, write_json

HANDOFF = "handoff.json"


def tensor_digest(state: dict[str, torch.Tensor], names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def handoff_digest(path: Path) -> str:
    """Identity of a hand-off (or any model directory): sha256 of its manifest, or of its files."""
    manifest = path / HANDOFF
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


LINEAGE_KEYS = ("stage", "step", "recipe", "mlflow_run_id", "data_dir", "data_digest", "manifest_sha256",
                "validation_report_sha256", "mixture")


def ancestry(model_dir: Path) -> list[dict]:
    """The stage chain up to and including ``model_dir``, carried inside each hand-off.

    Every stage copies its parent's chain and appends the parent, so a hand-off knows its whole
    history even where the parents' directories do not exist (another pod, another machine): a
    pipeline step on a cluster sees only its own input artifacts."""
    model_dir = Path(model_dir)
    manifest = model_dir / HANDOFF
    if not manifest.is_file():
        return []
    doc = json.loads(manifest.read_text())
    entry = {k: doc.get(k) for k in LINEAGE_KEYS} | {"handoff_sha256": handoff_digest(model_dir)}
    return list(doc.get("ancestors", [])) + [entry]


def write_handoff(model_dir: Path, info: dict, state: dict[str, torch.Tensor], trainable: list[str]) -> dict:
    """Add ``handoff.json`` to a saved model directory (after every other file is written)."""
    frozen = [k for k in state if k not in set(trainable)]
    doc = {
        "format": "unitoken-handoff", "format_version": 1, **info,
        "files": {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != HANDOFF},
        "trainable_parameters": len(trainable), "frozen_parameters": len(frozen),
        "trainable_digest": tensor_digest(state, trainable), "frozen_digest": tensor_digest(state, frozen),
        "created_unix": round(time.time(), 3),
    }
    write_json(model_dir / HANDOFF, doc)
    return doc


class HandoffError(ValueError):
    """A hand-off checkpoint is corrupted, incomplete or from the wrong stage."""


def verify_handoff(path: Path, expect_stage: int | tuple[int, ...] | None = None, expect_config_hash: str | None = None) -> dict:
    """Check every file's sha256 (and the stage/config) before loading.

    Raises:
        HandoffError: missing manifest, a file missing or changed, wrong stage, other config.
    """
    path = Path(path)
    manifest = path / HANDOFF
    if not manifest.is_file():
        raise HandoffError(f"{path}: no {HANDOFF}; not a stage hand-off checkpoint")
    try:
        doc = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise HandoffError(f"{manifest}: unreadable ({err})") from None
    for name, digest in doc.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise HandoffError(f"{path}: {name} is missing (listed in {HANDOFF})")
        actual = sha256_file(f)
        if actual != digest:
            raise HandoffError(f"{path}: {name} is corrupted (sha256 {actual[:12]}... != recorded {digest[:12]}...)")
    allowed = (expect_stage,) if isinstance(expect_stage, int) else tuple(expect_stage or ())
    if allowed and doc.get("stage") not in allowed:
        raise HandoffError(f"{path}: hand-off of stage {doc.get('stage')}, but this stage starts from stage "
                           f"{' or '.join(map(str, allowed))}; pass the stage-{allowed[0]} output as --init")
    if expect_config_hash is not None and doc.get("model_config_hash") != expect_config_hash:
        raise HandoffError(f"{path}: model config {doc.get('model_config_hash', '?')[:12]} differs from the "
                           f"recipe's {expect_config_hash[:12]}; use the recipe the previous stage used")
    return doc
