"""Registration: a verified hand-off with its evidence becomes a LoggedModel (pyfunc, signature,
scores) and a registered version (alias challenger), with a Markdown lineage as its description."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from unitoken.model.handoff import handoff_digest, verify_handoff
from unitoken.registry import serving
from unitoken.registry.aliases import alias_holder, ledger_run, move_alias, settle
from unitoken.registry.common import HANDOFF_TAG, MODEL_VERSIONS_TAG, ConflictError, RegistryError
from unitoken.registry.passport import build_passport, canonical_sha, sha256_hex
from unitoken.tracking import store as tracking
from unitoken.tracking.store import (
    ArtifactLogError,
    experiment_for,
    with_artifact_retries,
)


def register(model_dir: Path, eval_dir: Path, gate_file: Path, name: str, force: bool = False,
             reason: str | None = None, parent_run_id: str | None = None) -> dict:
    """Log the model (pyfunc LoggedModel + registered version), its evidence and passport; alias challenger.
    The registration run nests under ``parent_run_id`` (the pipeline run), which the passport names.

    A hand-off that ``name`` already has as a version (the same hand-off digest: the same
    weights from the same stage chain, e.g. a re-run whose steps were all cache hits) registers
    nothing: the result names that version, with ``duplicate`` True, and no run, model or alias
    changes. Two registrations of one hand-off racing each other both create a version; each then
    looks again, and the one whose version is not the lowest withdraws it (``_withdraw``) and
    returns the winner's as a duplicate: one version stands.
    """
    model_dir, eval_dir, gate_file = Path(model_dir), Path(eval_dir), Path(gate_file)
    decision = json.loads(gate_file.read_text())
    if not decision.get("passed"):
        if not (force and reason):
            raise RegistryError(f"{gate_file}: the gate did not pass ({'; '.join(decision.get('reasons', []))}); "
                                "register anyway only with --force --reason TEXT")
    verify_handoff(model_dir)
    client = tracking.client()
    digest = handoff_digest(model_dir)
    existing = version_of_handoff(client, name, digest)
    if existing is not None:
        return {"name": name, "version": str(existing.version), "uri": f"models:/{name}/{existing.version}",
                "run_id": existing.tags.get("unitoken.registration_run", existing.run_id),
                "model_id": existing.tags.get("unitoken.logged_model"),
                "passport_sha256": existing.tags.get("unitoken.passport_sha256"), "handoff_sha256": digest,
                "duplicate": True}
    parent = parent_run_id
    passport = build_passport(model_dir, eval_dir, gate_file, decision, reason if force else None, client, parent)
    passport_sha = canonical_sha({"passport": passport})
    tags = {"unitoken.kind": "registration"}
    exp_id = experiment_for(client, parent)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp_id, run_name=f"register-{name}", tags=tags).info.run_id
    lm = None
    with tempfile.TemporaryDirectory() as tmp:
        evidence = serving.write_evidence(Path(tmp) / "evidence", passport, eval_dir, gate_file)
        try:  # every artifact is stored before anything is registered
            for f, sub in ((evidence / "passport.json", None), (eval_dir / "report.json", "eval"),
                           (eval_dir / "items.jsonl", "eval"), (gate_file, "gate")):
                label = f"{sub}/{f.name}" if sub else f.name
                with_artifact_retries(f"{label} of run {run_id}",
                                      lambda f=f, sub=sub: client.log_artifact(run_id, str(f), sub))
            lm = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="unitoken",
                                            params={"handoff_sha256": digest},
                                            tags={"unitoken.passport_sha256": passport_sha})
            packaged = serving.package(Path(tmp) / "model", model_dir, evidence, passport_sha,
                                       mlflow_model=_mlflow_model(lm, run_id),
                                       metadata={"unitoken.passport_sha256": passport_sha, "registered_name": name})
            with_artifact_retries(f"model files of {model_dir} (logged model {lm.model_id})",
                                  lambda: client.log_model_artifacts(lm.model_id, str(packaged)))
        except ArtifactLogError as err:
            raise RegistryError(f"{err}. Nothing was registered: no model version and no alias for {name!r}; the "
                                f"registration run {run_id} is marked FAILED{_abandon(client, run_id, lm, err)}. "
                                f"Check the tracking server's artifact store (S3) and run the registration again "
                                f"once it answers.") from err
    try:
        mv = _publish(client, name, run_id, exp_id, lm, passport, passport_sha, eval_dir, decision,
                      reason if force else "", digest)
    except Exception as err:  # noqa: BLE001 - whatever failed, the run and the model say so
        _abandon(client, run_id, lm, err)
        raise
    client.set_terminated(run_id, "FINISHED")
    if mv.run_id != run_id:  # a racing registration of this hand-off won: its version is the one
        return {"name": name, "version": str(mv.version), "uri": f"models:/{name}/{mv.version}",
                "run_id": mv.tags.get("unitoken.registration_run", mv.run_id),
                "model_id": mv.tags.get("unitoken.logged_model"),
                "passport_sha256": mv.tags.get("unitoken.passport_sha256"), "handoff_sha256": digest,
                "duplicate": True}
    return {"name": name, "version": mv.version, "run_id": run_id, "model_id": lm.model_id,
            "uri": f"models:/{name}/{mv.version}", "passport_sha256": passport_sha, "handoff_sha256": digest,
            "duplicate": False}


def version_of_handoff(client, name: str, digest: str):
    """The version of ``name`` registered from hand-off ``digest`` (its ``unitoken.handoff_sha256``
    tag), or None. Versions registered before that tag existed are not found."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{HANDOFF_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def registration_note(info: dict) -> str:
    """One line on what ``register`` did, for the command line and the pipeline's log."""
    if info.get("duplicate"):
        return (f"registered nothing: hand-off {info['handoff_sha256'][:12]} is already {info['uri']} "
                f"(aliases left as they are)")
    return f"registered {info['uri']} (alias challenger), passport {info['passport_sha256'][:16]}..."


def _publish(client, name: str, run_id: str, exp_id: str, lm, passport: list[dict], passport_sha: str,
             eval_dir: Path, decision: dict, forced: str, handoff_sha256: str):
    """Once every artifact is stored: the UI links, the LoggedModel READY, the version, its aliases."""
    report = json.loads((eval_dir / "report.json").read_text())
    stage_runs = _link_model(client, run_id, lm.model_id, passport, eval_dir, report)
    client.finalize_logged_model(lm.model_id, "READY")
    try:
        client.create_registered_model(name)
    except Exception as err:  # noqa: BLE001 - "already exists" is the normal case
        if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
            raise
    mv = client.create_model_version(
        name, source=lm.artifact_location, run_id=run_id, model_id=lm.model_id,
        description=lineage_markdown(passport, report, decision, {**stage_runs, run_id: exp_id}, run_id, lm),
        tags={"unitoken.passport_sha256": passport_sha, "unitoken.registration_run": run_id,
              "unitoken.logged_model": lm.model_id, "unitoken.gate_passed": str(decision["passed"]).lower(),
              "unitoken.forced_reason": forced, HANDOFF_TAG: handoff_sha256})
    winner = version_of_handoff(client, name, handoff_sha256)
    if winner is not None and int(winner.version) < int(mv.version):
        _withdraw(client, name, mv, lm, run_id, winner)
        return winner
    # What MLflow's own register_model writes: the model page lists its versions; the note is its description.
    client.set_logged_model_tags(lm.model_id, {MODEL_VERSIONS_TAG: json.dumps([{"name": name, "version": str(mv.version)}]),
                                               "mlflow.note.content": mv.description})
    _register_challenger(client, name, str(mv.version))
    return mv


def _withdraw(client, name: str, mv, lm, run_id: str, winner) -> None:
    """This registration lost a race with another of the same hand-off (``winner``, a lower
    version): delete its version before any alias points at it, and say so on its run and model."""
    client.delete_model_version(name, str(mv.version))
    note = f"withdrawn: the same hand-off registered concurrently as {name} version {winner.version}"
    client.set_tag(run_id, "unitoken.duplicate_of", f"models:/{name}/{winner.version}")
    client.set_tag(run_id, "mlflow.note.content", note)
    client.set_logged_model_tags(lm.model_id, {"unitoken.duplicate_of": f"models:/{name}/{winner.version}",
                                               "mlflow.note.content": note})


def _register_challenger(client, name: str, version: str, attempts: int = 3) -> dict:
    """Move ``challenger`` to a new version as a recorded move (action "register"), by the same
    claim -> move -> record as ``promote``; a registration racing another retries on fresh state."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

    def once() -> dict:
        ledger = ledger_run(client, name)
        seq = settle(client, name, "challenger", ledger)
        current = alias_holder(client, name, "challenger")
        return move_alias(client, name, "challenger", version, current, "register", "registered", ledger, seq)

    return Retrying(retry=retry_if_exception_type(ConflictError), stop=stop_after_attempt(attempts), reraise=True)(once)


def _mlflow_model(lm, run_id: str):
    from mlflow.models import Model

    return Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id)


def _link_model(client, run_id: str, model_id: str, passport: list[dict], eval_dir: Path,
                report: dict) -> dict[str, str]:
    """What the MLflow UI shows: the model as an output of the registration run and of the last
    stage's run, the validated data and the evaluation items as dataset inputs, the evaluation
    scores (and held-out losses) as metrics of the model. Returns {stage run id: experiment id}."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric

    stage_runs = {}
    for e in passport:
        if e["kind"] == "stage" and e.get("mlflow_run_id"):
            try:
                stage_runs[e["mlflow_run_id"]] = client.get_run(e["mlflow_run_id"]).info.experiment_id
            except Exception:  # noqa: BLE001 - a stage tracked on another server: no link to it
                pass
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    last = next((e["mlflow_run_id"] for e in reversed(passport) if e["kind"] == "stage"), None)
    if last in stage_runs:
        client.log_outputs(last, [LoggedModelOutput(model_id, step=0)])
    data = passport[0]
    validated = Dataset(name="validated-manifest", digest=str(data.get("manifest_sha256") or "unknown")[:16],
                        source_type="unitoken", source=json.dumps({k: data.get(k) for k in (
                            "manifest_sha256", "validation_report_sha256", "pretokenized_sha256")}))
    items = [json.loads(x) for x in (eval_dir / "items.jsonl").read_text().splitlines() if x.strip()]
    evaluation = Dataset(name="evaluation", digest=sha256_hex((eval_dir / "items.jsonl").read_bytes())[:16],
                         source_type="unitoken", source=json.dumps({"registration_run": run_id, "path": "eval/items.jsonl"}),
                         profile=json.dumps({"num_rows": len(items), "suites": sorted({i.get("suite") for i in items})}))
    client.log_inputs(run_id, [DatasetInput(validated, [InputTag("mlflow.data.context", "validation")]),
                               DatasetInput(evaluation, [InputTag("mlflow.data.context", "evaluation")])])
    now = int(time.time() * 1000)
    scores = dict(report.get("metrics", {}))
    for task, held in (report.get("heldout") or {}).items():
        if isinstance(held, dict) and "mean" in held:
            scores[f"heldout_loss/{task}"] = held["mean"]
    metrics = [Metric(k, float(v), now, 0, model_id=model_id, dataset_name="evaluation",
                      dataset_digest=evaluation.digest) for k, v in scores.items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    return stage_runs


def lineage_markdown(passport: list[dict], report: dict, decision: dict, experiments: dict[str, str],
                     run_id: str, lm) -> str:
    """The version's description: data digest -> validation -> stages (linked runs) -> evaluation -> gate."""
    def run(rid: str | None, label: str) -> str:
        return f"[{label}](#/experiments/{experiments[rid]}/runs/{rid})" if rid in experiments else label

    def short(digest) -> str:
        return f"`{str(digest)[:12]}`" if digest else "unknown"

    data = passport[0]
    lines = ["**Lineage** (each step's digest is in the passport, re-verified by `unitoken lineage`)", "",
             f"1. **Data**: manifest {short(data.get('manifest_sha256'))} -> **validation** report "
             f"{short(data.get('validation_report_sha256'))} -> pre-tokenised {short(data.get('pretokenized_sha256'))}"]
    for e in passport:
        if e["kind"] == "stage":
            lines.append(f"{len(lines) - 1}. **Stage {e['stage']}** ({e.get('recipe')}, {e.get('steps')} steps): "
                         f"{run(e.get('mlflow_run_id'), 'run ' + str(e.get('mlflow_run_id'))[:8])}, hand-off "
                         f"{short(e['handoff_sha256'])}")
    scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(report.get("metrics", {}).items()) if k.endswith("/overall"))
    lines.append(f"{len(lines) - 1}. **Evaluation**: {scores or 'no scores'} "
                 f"({run(run_id, 'registration run')}; model `{lm.model_id}`)")
    forced = next((e.get("forced_reason") for e in passport if e["kind"] == "gate"), None)
    verdict = "passed" if decision.get("passed") else f"did not pass; registered by force: {forced}"
    reasons = "; ".join(decision.get("reasons", []))
    champion = decision.get("champion_version")
    lines.append(f"{len(lines) - 1}. **Gate**: {verdict}"
                 + (f" against champion v{champion}" if champion not in (None, "none") else " (no champion)")
                 + (f" ({reasons})" if reasons else ""))
    build = next((e for e in passport if e["kind"] == "build"), {})
    lines += ["", f"Built by unitoken {build.get('package_version')} at commit `{str(build.get('git_commit'))[:12]}`"
              + (f", pipeline run {run(build['pipeline_run_id'], build['pipeline_run_id'][:8])}"
                 if build.get("pipeline_run_id") else "") + "."]
    return "\n".join(lines)


def _abandon(client, run_id: str, lm, err: Exception) -> str:
    """Mark an interrupted registration's run FAILED (and its logged model); '' or what could not be marked."""
    from tenacity import Retrying, stop_after_attempt, wait_fixed

    try:  # the server may have dropped the connection the failed upload used
        for attempt in Retrying(stop=stop_after_attempt(3), wait=wait_fixed(1.0), reraise=True):
            with attempt:
                client.set_tag(run_id, "unitoken.registration_error", str(err)[:5000])
                if lm is not None:
                    client.finalize_logged_model(lm.model_id, "FAILED")
                client.set_terminated(run_id, "FAILED")
    except Exception as cleanup:  # noqa: BLE001 - the tracking server went too; say so
        return f" (marking it FAILED also failed: {type(cleanup).__name__})"
    return ""
