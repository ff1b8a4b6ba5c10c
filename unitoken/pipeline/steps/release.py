"""Registration: the gated model as a registry version (challenger), promoted by compare-and-swap
when asked, and the pipeline run's summary (links, scores) in MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from unitoken import registry
from unitoken.model.handoff import ancestry
from unitoken.pipeline.steps.runs import step_run
from unitoken.tracking import store as tracking
from unitoken.tracking.store import log_batched

log = logging.getLogger(__name__)


def register(model_dir: Path, eval_dir: Path, decision: Path, model_name: str, parent_run_id: str,
             promote: bool) -> dict:
    """Register the gated model (alias challenger); with ``promote``, move champion to it by
    compare-and-swap against the champion the gate compared with (a concurrent promotion wins).

    A hand-off the model already has as a version (a re-run with unchanged inputs) registers
    nothing and moves no alias: the step's run ``register-NAME`` records which version it is
    (tag ``unitoken.duplicate_of``) and the result names that version (``alias`` None)."""
    info = registry.register(Path(model_dir), Path(eval_dir), Path(decision), model_name, parent_run_id=parent_run_id)
    log.info(registry.registration_note(info))
    if info["duplicate"]:
        with step_run(f"register-{model_name}", parent_run_id, {"handoff_sha256": info["handoff_sha256"]}) as run:
            run.tags({"unitoken.duplicate_of": str(info["version"]),
                      "mlflow.note.content": registry.registration_note(info)})
        info["alias"] = None
    elif promote:
        expect_champion = json.loads(Path(decision).read_text()).get("champion_version", "none")
        registry.promote(model_name, info["version"], "champion", expect_current=expect_champion,
                         reason=f"pipeline {parent_run_id}: gate passed")
        info["alias"] = "champion"
    else:
        info["alias"] = "challenger"
    summarise_pipeline_run(parent_run_id, info, Path(model_dir), Path(eval_dir), Path(decision))
    return info


def summarise_pipeline_run(parent_run_id: str, info: dict, model_dir: Path, eval_dir: Path, decision: Path) -> None:
    """What the pipeline run's page in the MLflow UI says first: a Markdown description linking the
    registered version, its logged model, each stage's run and the gate's verdict, and the
    evaluation's headline scores as the run's metrics."""
    client = tracking.client()
    exp = client.get_run(parent_run_id).info.experiment_id
    gate = json.loads(decision.read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    scores = {k: float(v) for k, v in report.get("metrics", {}).items() if k.endswith("/overall")}
    version, name = info["version"], info["name"]
    facts = [f"**Registered**: [{name} v{version}](#/models/{name}/versions/{version})"
             + (f" (alias {info['alias']})" if info.get("alias") else " (already registered: nothing new)"),
             f"**Logged model**: [{info.get('model_id')}](#/experiments/{exp}/models/{info.get('model_id')})"
             if info.get("model_id") else "**Logged model**: -",
             "**Stages**: " + ", ".join(
                 f"[stage {a['stage']}](#/experiments/{exp}/runs/{a['mlflow_run_id']})" if a.get("mlflow_run_id")
                 else f"stage {a['stage']}" for a in ancestry(model_dir) if a.get("stage")),
             f"**Gate**: {'passed' if gate.get('passed') else 'failed'}"
             + (f" ({'; '.join(gate.get('reasons', []))})" if gate.get("reasons") else "")]
    table = ["| score | value |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in sorted(scores.items()))]
    log_batched(client, parent_run_id, metrics=scores,
                tags={"mlflow.note.content": "\n\n".join(facts) + "\n\n" + "\n".join(table)})
