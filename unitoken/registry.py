"""Model registry on MLflow: registration with a passport, compare-and-swap promotion, alias
history, rollback, lineage, and ``models:/`` URIs for every command.

**Passport.** A JSON chain of entries (data -> stage 1..3 -> evaluation -> gate -> build); each
entry carries the sha256 of the previous one, so no entry can change without breaking every
later link. It is stored with the registration run and inside the model, and its digest is a
version tag and part of the MLmodel.

**The version is an MLflow model.** ``unitoken.serving.package`` writes a pyfunc (models from
code) around the hand-off, with a signature and an input example; the LoggedModel is an output
of the registration run and of the last stage's run, carries the evaluation metrics (so the
model page shows the scores), and the version's description is a Markdown lineage with links.

**Compare-and-swap without lock models.** MLflow aliases have no CAS, but a run's params are
immutable: logging a different value under an existing key is refused by the tracking store's
primary key. Each registered model has a *ledger run* (``registry-ledger-NAME``, found through
the param ``unitoken.ledger_run`` of version 1's registration run, which is itself claimed that
way); the n-th move of alias A is claimed as ledger param ``A.<n>`` holding the intended move.
Of two racing promoters exactly one claim is stored; the other gets ``ConflictError``. Then the
alias moves, then the move is recorded as registered-model tag ``unitoken.history.A.<n>`` (MLflow
keeps no alias history, mlflow/mlflow#2169). A promoter killed between claim and record leaves a
claim without a record: the next ``promote`` completes it (the alias did move) or records it as
rolled back (it did not), once the claim is older than ``UNITOKEN_PROMOTION_LEASE_S`` (120 s;
younger claims are a promotion in progress and get ``ConflictError``).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from unitoken.model.handoff import HANDOFF, ancestry, handoff_digest, verify_handoff
from unitoken.tracking import store as tracking
from unitoken.tracking.store import (
    ArtifactLogError,
    default_tracking_uri,
    experiment_for,
    with_artifact_retries,
)

ZERO = "0" * 64
HISTORY = "unitoken.history"
HANDOFF_TAG = "unitoken.handoff_sha256"  # a version's hand-off digest: one version per hand-off
LEDGER_PARAM = "unitoken.ledger_run"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # mlflow.utils.mlflow_tags.MLFLOW_MODEL_VERSIONS (import-free)
LEDGER_EXPERIMENT = "unitoken-registry"  # ledger runs live here, out of the training runs' table
OUTSIDE = "outside the CLI"
MOVED = ("done", "completed")  # record statuses of moves that happened (legacy records have none)


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


class ConflictError(RegistryError):
    """Another promotion moved the alias first (or the alias is not where the caller expected)."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def canonical_sha(obj) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces): the passport digest."""
    return _sha(_canonical(obj))


# --------------------------------------------------------------------------- passport


def chain(entries: list[dict]) -> list[dict]:
    """Link entries: each gets ``prev`` = sha256 of the previous (linked) entry."""
    out, prev = [], ZERO
    for e in entries:
        linked = {**e, "prev": prev}
        out.append(linked)
        prev = _sha(_canonical(linked))
    return out


def verify_chain(passport: list[dict]) -> list[str]:
    problems, prev = [], ZERO
    for i, e in enumerate(passport):
        if e.get("prev") != prev:
            problems.append(f"passport entry {i} ({e.get('kind')}) does not link to the entry before it")
        prev = _sha(_canonical(e))
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
                        "compute_hours": hours})
    entries.append({"kind": "eval", "report_sha256": _sha((eval_dir / "report.json").read_bytes()),
                    "items_sha256": _sha((eval_dir / "items.jsonl").read_bytes())})
    entries.append({"kind": "gate", "decision_sha256": _sha(gate_file.read_bytes()), "passed": decision["passed"],
                    "forced_reason": forced})
    from importlib.metadata import version

    entries.append({"kind": "build", "package_version": version("unitoken"), "git_commit": _git_commit(),
                    "pipeline_run_id": pipeline_run_id})
    return chain(entries)


# --------------------------------------------------------------------------- register


def register(model_dir: Path, eval_dir: Path, gate_file: Path, name: str, force: bool = False,
             reason: str | None = None, parent_run_id: str | None = None) -> dict:
    """Log the model (pyfunc LoggedModel + registered version), its evidence and passport; alias challenger.
    The registration run nests under ``parent_run_id`` (the pipeline run), which the passport names.

    A hand-off that ``name`` already has as a version (the same hand-off digest: the same
    weights from the same stage chain, e.g. a re-run whose steps were all cache hits) registers
    nothing: the result names that version, with ``duplicate`` True, and no run, model or alias
    changes. (Two registrations of one hand-off racing each other can still both register.)
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
        from unitoken import serving

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
    # What MLflow's own register_model writes: the model page lists its versions; the note is its description.
    client.set_logged_model_tags(lm.model_id, {MODEL_VERSIONS_TAG: json.dumps([{"name": name, "version": str(mv.version)}]),
                                               "mlflow.note.content": mv.description})
    _register_challenger(client, name, str(mv.version))
    return mv


def _register_challenger(client, name: str, version: str, attempts: int = 3) -> dict:
    """Move ``challenger`` to a new version as a recorded move (action "register"), by the same
    claim -> move -> record as ``promote``; a registration racing another retries on fresh state."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

    def once() -> dict:
        ledger = _ledger(client, name)
        seq = _settle(client, name, "challenger", ledger)
        current = _holder(client, name, "challenger")
        return _move(client, name, "challenger", version, current, "register", "registered", ledger, seq)

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
    evaluation = Dataset(name="evaluation", digest=_sha((eval_dir / "items.jsonl").read_bytes())[:16],
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


# --------------------------------------------------------------------------- fetch & verify


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME/V or models:/NAME@ALIAS -> (name, version, alias)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version, None


def resolve(uri: str, client=None):
    client = client or tracking.client()
    name, version, alias = parse_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types per store
        raise RegistryError(f"{uri}: not found in the registry at {default_tracking_uri()} ({type(err).__name__})") from None


def fetch(mv, client=None, dest: Path | None = None) -> dict[str, Path]:
    """Download a version's model, passport, eval and gate artifacts (into ``dest``, emptied first,
    or a fresh temporary directory). ``model`` is the hand-off inside the MLflow model (or the
    whole artifact for versions registered before the pyfunc packaging)."""
    import mlflow.artifacts

    client = client or tracking.client()
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix=f"unitoken-{mv.name}-v{mv.version}-"))
    else:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
    uri = default_tracking_uri()

    def download(what: str, **where) -> Path:
        # The same bounded retries with backoff as uploads; what arrives is verified afterwards
        # (verify_version), so a retried, partly written download is never trusted.
        try:
            return Path(with_artifact_retries(
                what, lambda: mlflow.artifacts.download_artifacts(tracking_uri=uri, **where), action="reading it from"))
        except ArtifactLogError as err:
            raise RegistryError(f"{err}. Check the tracking server's artifact store (S3) and run the command "
                                "again; nothing was changed in the registry") from None

    try:
        model = download(f"model files of {mv.name} version {mv.version}", artifact_uri=mv.source,
                         dst_path=str(dest / "model"))
        run_id = mv.tags.get("unitoken.registration_run", mv.run_id)
        evidence = download(f"evidence (passport, evaluation, gate) of run {run_id}", run_id=run_id,
                            artifact_path="", dst_path=str(dest / "run"))
        handoff = packaged_artifact(model, "handoff") if (model / "MLmodel").is_file() else model
        return {"root": dest, "model": handoff, "mlflow_model": model, "passport": evidence / "passport.json",
                "eval": evidence / "eval", "gate": next((evidence / "gate").glob("*.json"))}
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)  # nothing half-downloaded stays behind
        raise


def packaged_artifact(mlflow_model: Path, key: str) -> Path:
    """Where the pyfunc flavour of a downloaded MLflow model keeps artifact ``key`` (MLflow keeps
    the source directory's own name, so the path is read from the MLmodel, not assumed)."""
    import yaml

    doc = yaml.safe_load((mlflow_model / "MLmodel").read_text())
    try:
        return mlflow_model / doc["flavors"]["python_function"]["artifacts"][key]["path"]
    except (KeyError, TypeError):
        raise RegistryError(f"{mlflow_model}/MLmodel names no pyfunc artifact {key!r}; not a unitoken model") from None


def load_uri(uri: str) -> Path:
    """Fetch and verify ``models:/...`` and return a local model directory (for every command)."""
    client = tracking.client()
    mv = resolve(uri, client)
    from unitoken.files import unitoken_home

    paths = fetch(mv, client, unitoken_home() / "cache" / f"{mv.name}-v{mv.version}")
    problems = verify_version(mv, paths, client)
    if problems:
        raise RegistryError(f"{uri} (version {mv.version}) fails verification: {problems[0]}")
    return paths["model"]


def model_dir(arg: str | Path) -> Path:
    """A command's model argument as a local directory: ``models:/NAME/V`` and ``models:/NAME@ALIAS``
    are fetched and verified (``load_uri``), anything else is a path. Commands resolve URIs where
    they start; the model, data and training code take directories."""
    return load_uri(str(arg)) if str(arg).startswith("models:/") else Path(arg)


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
    if _sha((eval_dir / "report.json").read_bytes()) != ev.get("report_sha256"):
        problems.append("stored evaluation report does not match the passport")
    if _sha((eval_dir / "items.jsonl").read_bytes()) != ev.get("items_sha256"):
        problems.append("stored evaluation items do not match the passport")
    if _sha(gate_file.read_bytes()) != by_kind.get("gate", [{}])[0].get("decision_sha256"):
        problems.append("stored gate decision does not match the passport")
    return problems


def verify_version(mv, paths: dict[str, Path], client) -> list[str]:
    """Re-verify every digest of a version against its stored artifacts; [] when all hold."""
    problems = []
    passport = json.loads(paths["passport"].read_text())
    if canonical_sha({"passport": passport}) != mv.tags.get("unitoken.passport_sha256"):
        problems.append("passport.json differs from the digest recorded on the version")
    problems += verify_evidence(passport, paths["model"], paths["eval"], paths["gate"])
    packaged = paths.get("mlflow_model")
    if packaged is not None and (packaged / "MLmodel").is_file():
        import yaml

        from unitoken.serving import verify_packaged

        config = yaml.safe_load((packaged / "MLmodel").read_text()).get("flavors", {}).get(
            "python_function", {}).get("config") or {}
        if config.get("passport_sha256") != mv.tags.get("unitoken.passport_sha256"):
            problems.append("MLflow model: its MLmodel does not carry the version's passport digest")
        problems += [f"MLflow model: {p}" for p in verify_packaged(  # its weights were hashed just above
            paths["model"], packaged_artifact(packaged, "evidence"), mv.tags.get("unitoken.passport_sha256"),
            check_model=False) if p not in problems]
    for st in (e for e in passport if e["kind"] == "stage"):
        if not st.get("mlflow_run_id"):
            continue
        try:
            tag = client.get_run(st["mlflow_run_id"]).data.tags.get("unitoken.handoff_sha256")
        except Exception:  # noqa: BLE001
            problems.append(f"stage {st['stage']} run {st['mlflow_run_id']} is missing from MLflow")
            continue
        if tag != st["handoff_sha256"]:
            problems.append(f"stage {st['stage']} run records hand-off {str(tag)[:12]}, passport {st['handoff_sha256'][:12]}")
    return problems


# --------------------------------------------------------------------------- aliases


def _holder(client, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None


def _records(client, name: str, alias: str) -> dict[int, dict]:
    prefix = f"{HISTORY}.{alias}."
    return {int(k[len(prefix):]): json.loads(v) for k, v in client.get_registered_model(name).tags.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


def _record(client, name: str, alias: str, entry: dict) -> None:
    client.set_registered_model_tag(name, f"{HISTORY}.{alias}.{entry['seq']:06d}", json.dumps(entry))
    client.update_registered_model(name, description=history_markdown(client.get_registered_model(name).tags))


def history_markdown(tags: dict[str, str]) -> str:
    """The registered model's description: every recorded alias move as a Markdown table, newest
    first (the MLflow UI shows no alias history of its own; the records are the model's tags)."""
    moves = [json.loads(v) for k, v in tags.items() if k.startswith(f"{HISTORY}.")]
    moves = sorted((m for m in moves if m.get("status", "done") in MOVED), key=lambda m: m.get("t", 0), reverse=True)
    rows = [f"| {m['when']} | {m['alias']} | {m['action']} | {m['from'] or '-'} | {m['to']} | {m['who']} | "
            f"{str(m.get('reason', '')).replace('|', '/')} |" for m in moves]
    return "\n".join(["**Alias history** (recorded by `unitoken registry`; moves made elsewhere show in "
                      "`unitoken registry history`)", "", "| when | alias | action | from | to | who | reason |",
                      "|---|---|---|---|---|---|---|", *rows])


def history(name: str, alias: str = "champion", client=None) -> list[dict]:
    """The moves of ``alias`` that happened, oldest first. Moves the CLI did not make (the MLflow
    UI, another client) show as rows with action "outside the CLI" wherever one move does not
    start where the previous one ended, or the alias is not where the last one left it. (A move
    whose promoter was killed after moving the alias shows that way too, until the next
    ``promote`` settles its claim as completed.)"""
    client = client or tracking.client()
    moves = [e for _, e in sorted(_records(client, name, alias).items()) if e.get("status", "done") in MOVED]
    out, at = [], None
    for m in moves:
        if out and str(m["from"]) != str(at) or not out and m["from"] is not None:
            out.append(_outside(alias, at, m["from"]))
        out.append(m)
        at = m["to"]
    current = _holder(client, name, alias)
    if str(current) != str(at):
        out.append(_outside(alias, at, current))
    return out


def _outside(alias: str, frm, to) -> dict:
    return {"seq": "-", "action": OUTSIDE, "alias": alias, "from": frm, "to": to, "who": "?", "when": "?",
            "reason": "the alias was moved without `unitoken registry`"}


def _ledger(client, name: str) -> str:
    """The run whose immutable params are ``name``'s alias claims (created on first use, race-free:
    the pointer to it is itself an immutable param of version 1's registration run)."""
    pinned = client.get_registered_model(name).tags.get(LEDGER_PARAM)
    if pinned:  # resolved before: stays put even if the version it was anchored on is deleted
        return pinned
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise RegistryError(f"{name}: no registered versions")
    first = min(versions, key=lambda v: int(v.version))
    anchor = first.tags.get("unitoken.registration_run") or first.run_id
    params = client.get_run(anchor).data.params
    if LEDGER_PARAM not in params:
        exp = _ledger_experiment(client)
        ledger = client.create_run(exp, run_name=f"registry-ledger-{name}", tags={
            "unitoken.kind": "registry-ledger", "unitoken.registered_model": name}).info.run_id
        client.set_terminated(ledger, "FINISHED")
        if _claim_param(client, anchor, LEDGER_PARAM, ledger):
            params = {**params, LEDGER_PARAM: ledger}
        else:
            params = client.get_run(anchor).data.params
        if params.get(LEDGER_PARAM) != ledger:  # another promoter's ledger was stored first
            client.delete_run(ledger)
    client.set_registered_model_tag(name, LEDGER_PARAM, params[LEDGER_PARAM])
    return params[LEDGER_PARAM]


def _ledger_experiment(client) -> str:
    exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
    if exp is None:
        try:
            return client.create_experiment(LEDGER_EXPERIMENT, tags={"mlflow.note.content": (
                "Alias claims of the model registry (one run per registered model, written by `unitoken registry "
                "promote`); do not edit.")})
        except Exception:  # noqa: BLE001 - created by a concurrent promoter: use theirs
            exp = client.get_experiment_by_name(LEDGER_EXPERIMENT)
            if exp is None:
                raise
    return exp.experiment_id


def _claim_param(client, run_id: str, key: str, value: str) -> bool:
    """Log ``key=value`` unless ``key`` holds another value; True when ``value`` is what is stored."""
    try:
        client.log_param(run_id, key, value)
    except Exception:  # noqa: BLE001 - the store refuses a changed param; anything else re-raises below
        stored = client.get_run(run_id).data.params.get(key)
        if stored is None:
            raise
        return stored == value
    return True


def _lease_s() -> float:
    return float(os.environ.get("UNITOKEN_PROMOTION_LEASE_S", "120"))


def _settle(client, name: str, alias: str, ledger: str) -> int:
    """Finish what killed promoters left (claims with no record) and return the next move number.

    Raises:
        ConflictError: a claim younger than the lease has no record yet: a promotion is in progress.
    """
    pre = f"{alias}."
    claims = {int(k[len(pre):]): json.loads(v) for k, v in client.get_run(ledger).data.params.items()
              if k.startswith(pre) and k[len(pre):].isdigit()}
    records = _records(client, name, alias)
    for seq in sorted(set(claims) - set(records)):
        c = claims[seq]
        age = time.time() - c["t"]
        if age < _lease_s():
            raise ConflictError(f"promotion #{seq} of {name}@{alias} to version {c['to']} by {c['who']} is in "
                                f"progress (claimed {age:.0f} s ago); retry after it finishes (or after "
                                f"{_lease_s():.0f} s if it was killed: the next promotion then completes it)")
        holder = _holder(client, name, alias)
        if holder == str(c["to"]):
            status, note = "completed", "the promoter stopped after moving the alias; completed by a later promotion"
        elif holder == (None if c["from"] is None else str(c["from"])):
            status, note = "rolled back", "the promoter stopped before moving the alias; nothing was moved"
        else:
            status, note = "interrupted", f"the promoter stopped; the alias is now at {holder}"
        _record(client, name, alias, {**c, "status": status, "note": note})
    return max([*claims, *records], default=-1) + 1


def promote(name: str, version: str, alias: str = "champion", expect_current: str | None = None,
            reason: str = "", action: str = "promote") -> dict:
    """Move ``alias`` to ``version`` if (and only if) it is where the caller expects.

    ``expect_current``: the version the caller expects the alias at (``"none"``: unset); None
    compare-and-swaps against the holder read just before the move (``checked`` in the result
    says which). A move to the version the alias already holds moves nothing and records
    nothing (``action`` "none"). Steps: settle earlier claims -> verify the version -> claim move
    n on the ledger (the CAS) -> move the alias -> record move n. A kill between any two leaves a
    state the next call settles.

    Raises:
        ConflictError: the alias is not where ``expect_current`` says, or another promotion won.
        RegistryError: the version does not verify against its passport.
    """
    client = tracking.client()
    version = str(version)
    mv = resolve(f"models:/{name}/{version}", client)
    ledger = _ledger(client, name)
    seq = _settle(client, name, alias, ledger)
    current = _holder(client, name, alias)
    if expect_current is not None and str(expect_current).lower() != str(current).lower():
        raise ConflictError(f"alias {alias!r} of {name} is held by version {current}, not {expect_current}; "
                            "re-read it (unitoken registry history) and retry")
    checked = "--expect-current" if expect_current is not None else "the holder read before the move"
    if current == version:  # e.g. the re-run of a promotion a kill interrupted, or a repeated command
        return {"seq": None, "action": "none", "alias": alias, "from": current, "to": version, "checked": checked,
                "note": f"{name}@{alias} already holds version {version}; nothing moved, nothing recorded"}
    paths = fetch(mv, client)
    try:
        problems = verify_version(mv, paths, client)
    finally:
        shutil.rmtree(paths["root"], ignore_errors=True)
    if problems:
        raise RegistryError(f"refusing to promote {name} v{version}: {problems[0]}")
    return {**_move(client, name, alias, version, current, action, reason, ledger, seq), "checked": checked}


def _move(client, name: str, alias: str, version: str, current: str | None, action: str, reason: str,
          ledger: str, seq: int) -> dict:
    """Claim move ``seq`` on the ledger (the compare-and-swap against ``current``), move the alias,
    record the move; the recorded entry."""
    entry = {"seq": seq, "action": action, "alias": alias, "from": current, "to": version,
             "who": os.environ.get("UNITOKEN_ACTOR") or getpass.getuser(),
             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason[:1000],
             "t": time.time(), "token": uuid.uuid4().hex}
    # Claim -> move -> record with one HTTP attempt per call (MLflow's own retries can stall a
    # call for minutes): the window another promoter could take for a killed one stays far
    # inside the lease.
    with tracking.fail_fast_http():
        if not _claim_param(client, ledger, f"{alias}.{seq:06d}", json.dumps(entry, ensure_ascii=False)):
            raise ConflictError(f"another promotion of {name}@{alias} moved first (move #{seq}); re-read and retry")
        if _holder(client, name, alias) != current:  # moved outside the CLI since we read it
            _record(client, name, alias, {**entry, "status": "abandoned",
                                          "note": "the alias moved during the promotion"})
            raise ConflictError(f"alias {alias!r} of {name} changed during the promotion")
        client.set_registered_model_alias(name, alias, version)
        if seq in _records(client, name, alias):  # settled by another promoter while this one stalled
            raise ConflictError(f"promotion #{seq} of {name}@{alias} took longer than the lease and was settled by "
                                "another promotion; read `unitoken registry history` before retrying")
        _record(client, name, alias, {**entry, "status": "done"})
    return entry


def rollback(name: str, alias: str = "champion", reason: str = "rollback") -> dict:
    """Move ``alias`` back to the version it held before its last move.

    Raises:
        RegistryError: the model has no such alias, or no earlier holder was recorded.
    """
    client = tracking.client()
    current = _holder(client, name, alias)
    if current is None:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise RegistryError(f"{name} has no alias {alias!r} (its aliases: {', '.join(aliases) or 'none'}); "
                            f"nothing to roll back; fix: name one with --alias")
    moves = history(name, alias, client)
    if not moves or moves[-1]["from"] is None:
        raise RegistryError(f"{name}@{alias} (version {current}) has no earlier holder; nothing to roll back to; "
                            f"fix: move it with `unitoken registry promote {name} --version N --alias {alias}`")
    return promote(name, moves[-1]["from"], alias, expect_current=current, reason=reason, action="rollback")


# --------------------------------------------------------------------------- lineage


def lineage(uri: str) -> dict:
    """The lineage tree of a version, every digest re-verified; ``ok`` False on any broken link."""
    client = tracking.client()
    mv = resolve(uri, client)
    paths = fetch(mv, client)
    try:
        passport = json.loads(paths["passport"].read_text())
        problems = verify_version(mv, paths, client)
    finally:
        shutil.rmtree(paths["root"], ignore_errors=True)
    aliases = [a for a, v in client.get_registered_model(mv.name).aliases.items() if str(v) == str(mv.version)]
    return {"name": mv.name, "version": mv.version, "aliases": aliases, "passport": passport,
            "problems": problems, "ok": not problems}
