"""The passport: a JSON chain of entries (data -> stage 1..3 -> evaluation -> gate -> build), each
carrying the sha256 of the previous one, so no entry can change without breaking every later link;
and the check of a version's evidence (model files, evaluation, gate) against it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from unitoken.model.handoff import HANDOFF, ancestry, handoff_digest, verify_handoff
from unitoken.registry.common import RegistryError

ZERO = "0" * 64


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def canonical_sha(obj) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces): the passport digest."""
    return sha256_hex(_canonical(obj))


def chain(entries: list[dict]) -> list[dict]:
    """Link entries: each gets ``prev`` = sha256 of the previous (linked) entry."""
    out, prev = [], ZERO
    for e in entries:
        linked = {**e, "prev": prev}
        out.append(linked)
        prev = sha256_hex(_canonical(linked))
    return out


def verify_chain(passport: list[dict]) -> list[str]:
    problems, prev = [], ZERO
    for i, e in enumerate(passport):
        if e.get("prev") != prev:
            problems.append(f"passport entry {i} ({e.get('kind')}) does not link to the entry before it")
        prev = sha256_hex(_canonical(e))
    return problems


def _stage_chain(model_dir: Path) -> list[tuple[dict, str]]:
    """(stage doc, hand-off digest) from stage 1 to the model, from the chain each hand-off carries
    (``ancestors``); hand-offs written before that existed follow parent links that exist locally."""
    doc = json.loads((Path(model_dir) / HANDOFF).read_text()) if (Path(model_dir) / HANDOFF).is_file() else None
    if doc is not None and "ancestors" in doc:
        return [(e, e["handoff_sha256"]) for e in ancestry(Path(model_dir))]
    found, d = [], Path(model_dir)
    while (d / HANDOFF).is_file():
        doc = json.loads((d / HANDOFF).read_text())
        found.append((doc, handoff_digest(d)))
        d = Path(doc.get("parent", ""))
    return list(reversed(found))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_passport(model_dir: Path, eval_dir: Path, gate_file: Path, decision: dict, forced: str | None,
                   client, pipeline_run_id: str | None = None) -> list[dict]:
    stages = _stage_chain(model_dir)
    if not stages:
        raise RegistryError(f"{model_dir}: not a stage hand-off (no {HANDOFF}); register the output of `unitoken train`")
    first = stages[0][0]
    index = Path(first.get("data_dir") or "") / "index.json"
    plan = json.loads(index.read_text()) if index.is_file() else {}
    entries = [{"kind": "data", "manifest_sha256": first.get("manifest_sha256") or plan.get("manifest_sha256"),
                "validation_report_sha256": first.get("validation_report_sha256")
                or plan.get("validation_report_sha256"),
                "pretokenized_sha256": first.get("data_digest")}]
    for doc, digest in stages:
        hours = None
        if doc.get("mlflow_run_id"):
            try:
                m = client.get_run(doc["mlflow_run_id"]).data.metrics
                hours = m.get("cuda_hours", m.get("cpu_hours"))
            except Exception:  # noqa: BLE001 - a stage tracked elsewhere: the passport says unknown
                hours = None
        entries.append({"kind": "stage", "stage": doc["stage"], "mlflow_run_id": doc.get("mlflow_run_id"),
                        "handoff_sha256": digest, "recipe": doc.get("recipe"), "steps": doc.get("step"),
                        "compute_hours": hours, "mixture": doc.get("mixture")})
    entries.append({"kind": "eval", "report_sha256": sha256_hex((eval_dir / "report.json").read_bytes()),
                    "items_sha256": sha256_hex((eval_dir / "items.jsonl").read_bytes())})
    entries.append({"kind": "gate", "decision_sha256": sha256_hex(gate_file.read_bytes()), "passed": decision["passed"],
                    "forced_reason": forced})
    from importlib.metadata import version

    entries.append({"kind": "build", "package_version": version("unitoken"), "git_commit": _git_commit(),
                    "pipeline_run_id": pipeline_run_id})
    return chain(entries)


def verify_evidence(passport: list[dict], model_dir: Path, eval_dir: Path, gate_file: Path,
                    check_model: bool = True) -> list[str]:
    """The passport's chain, the model files (unless ``check_model`` is False: the caller hashed
    them already) and the evaluation and gate files against it; [] when all hold."""
    problems = verify_chain(passport)
    by_kind: dict[str, list[dict]] = {}
    for e in passport:
        by_kind.setdefault(e["kind"], []).append(e)
    try:
        if check_model:
            verify_handoff(model_dir)
            digest = handoff_digest(model_dir)
            if by_kind.get("stage") and by_kind["stage"][-1]["handoff_sha256"] != digest:
                problems.append("stored model is not the hand-off the passport names")
    except ValueError as err:
        problems.append(f"stored model: {err}")
    ev = by_kind.get("eval", [{}])[0]
    if sha256_hex((eval_dir / "report.json").read_bytes()) != ev.get("report_sha256"):
        problems.append("stored evaluation report does not match the passport")
    if sha256_hex((eval_dir / "items.jsonl").read_bytes()) != ev.get("items_sha256"):
        problems.append("stored evaluation items do not match the passport")
    if sha256_hex(gate_file.read_bytes()) != by_kind.get("gate", [{}])[0].get("decision_sha256"):
        problems.append("stored gate decision does not match the passport")
    return problems
