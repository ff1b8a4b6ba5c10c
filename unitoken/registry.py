"""Model registry on MLflow: registration with a passport, compare-and-swap promotion, alias
history, rollback, lineage, and ``models:/`` URIs for every command.

**Passport.** A JSON chain of entries (data -> stage 1..3 -> evaluation -> gate -> build); each
entry carries the sha256 of the previous one, so no entry can change without breaking every
later link. It is stored with the registration run and its digest as a version tag.

**Compare-and-swap.** MLflow aliases have no CAS. A promotion of alias A is the n-th move of
A; the mover must first create the registered model ``<name>.lock.<A>.<n>``. The tracking
store's unique constraint lets exactly one of two racing promoters create it; the other gets
``ConflictError``. The move is then recorded as tag ``unitoken.history.<A>.<n>`` (who, when,
from, to, reason): MLflow itself keeps no alias history (mlflow/mlflow#2169).
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
from pathlib import Path

from unitoken.train.checkpoint import HANDOFF, ancestry, handoff_digest, verify_handoff
from unitoken.train.tracking import (ArtifactLogError, default_tracking_uri, ensure_experiment, experiment_for,
                                     with_artifact_retries)

ZERO = "0" * 64
HISTORY = "unitoken.history"


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


class ConflictError(RegistryError):
    """Another promotion moved the alias first (or the alias is not where the caller expected)."""


def _client():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=default_tracking_uri())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


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
                   client) -> list[dict]:
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
                    "pipeline_run_id": os.environ.get("MLFLOW_PARENT_RUN_ID") or os.environ.get("MLFLOW_RUN_ID")})
    return chain(entries)


# --------------------------------------------------------------------------- register


def register(model_dir: Path, eval_dir: Path, gate_file: Path, name: str, force: bool = False,
             reason: str | None = None) -> dict:
    """Log the model (LoggedModel + registered version), its evidence and passport; alias challenger."""
    model_dir, eval_dir, gate_file = Path(model_dir), Path(eval_dir), Path(gate_file)
    decision = json.loads(gate_file.read_text())
    if not decision.get("passed"):
        if not (force and reason):
            raise RegistryError(f"{gate_file}: the gate did not pass ({'; '.join(decision.get('reasons', []))}); "
                                "register anyway only with --force --reason TEXT")
    verify_handoff(model_dir)
    client = _client()
    passport = build_passport(model_dir, eval_dir, gate_file, decision, reason if force else None, client)
    tags = {"unitoken.kind": "registration"}
    parent = os.environ.get("MLFLOW_PARENT_RUN_ID") or os.environ.get("MLFLOW_RUN_ID")
    exp_id = experiment_for(client, parent)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp_id, run_name=f"register-{name}", tags=tags).info.run_id
    lm = None
    try:  # every artifact is stored before anything is registered
        with tempfile.TemporaryDirectory() as tmp:
            passport_file = Path(tmp) / "passport.json"
            passport_file.write_text(json.dumps(passport, indent=2))
            with_artifact_retries(f"passport.json of run {run_id}",
                                  lambda: client.log_artifact(run_id, str(passport_file)))
        for f, sub in ((eval_dir / "report.json", "eval"), (eval_dir / "items.jsonl", "eval"), (gate_file, "gate")):
            with_artifact_retries(f"{sub}/{f.name} of run {run_id}",
                                  lambda f=f, sub=sub: client.log_artifact(run_id, str(f), sub))
        lm = client.create_logged_model(exp_id, name=name, source_run_id=run_id,
                                        params={"handoff_sha256": handoff_digest(model_dir)})
        with_artifact_retries(f"model files of {model_dir} (logged model {lm.model_id})",
                              lambda: client.log_model_artifacts(lm.model_id, str(model_dir)))
    except ArtifactLogError as err:
        raise RegistryError(f"{err}. Nothing was registered: no model version and no alias for {name!r}; the "
                            f"registration run {run_id} is marked FAILED{_abandon(client, run_id, lm, err)}. Check the "
                            f"tracking server's artifact store (S3) and run the registration again once it "
                            f"answers.") from err
    client.finalize_logged_model(lm.model_id, "READY")
    try:
        client.create_registered_model(name)
    except Exception as err:  # noqa: BLE001 - "already exists" is the normal case
        if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
            raise
    passport_sha = _sha(_canonical({"passport": passport}))
    mv = client.create_model_version(name, source=lm.artifact_location, run_id=run_id, model_id=lm.model_id, tags={
        "unitoken.passport_sha256": passport_sha, "unitoken.registration_run": run_id,
        "unitoken.logged_model": lm.model_id, "unitoken.gate_passed": str(decision["passed"]).lower(),
        "unitoken.forced_reason": reason if force else ""})
    client.set_registered_model_alias(name, "challenger", mv.version)
    client.set_terminated(run_id, "FINISHED")
    return {"name": name, "version": mv.version, "run_id": run_id, "model_id": lm.model_id,
            "uri": f"models:/{name}/{mv.version}", "passport_sha256": passport_sha}


def _abandon(client, run_id: str, lm, err: Exception) -> str:
    """Mark an interrupted registration's run FAILED (and its logged model); '' or what could not be marked."""
    for attempt in range(3):  # the server may have dropped the connection the failed upload used
        try:
            client.set_tag(run_id, "unitoken.registration_error", str(err)[:5000])
            if lm is not None:
                client.finalize_logged_model(lm.model_id, "FAILED")
            client.set_terminated(run_id, "FAILED")
            return ""
        except Exception as cleanup:  # noqa: BLE001 - the tracking server went too; say so
            if attempt == 2:
                return f" (marking it FAILED also failed: {type(cleanup).__name__})"
            time.sleep(1.0)
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
    client = client or _client()
    name, version, alias = parse_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own exception types per store
        raise RegistryError(f"{uri}: not found in the registry at {default_tracking_uri()} ({type(err).__name__})") from None


def fetch(mv, client=None, dest: Path | None = None) -> dict[str, Path]:
    """Download a version's model, passport, eval and gate artifacts (into ``dest``, emptied first,
    or a fresh temporary directory)."""
    import mlflow.artifacts

    client = client or _client()
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

    model = download(f"model files of {mv.name} version {mv.version}", artifact_uri=mv.source,
                     dst_path=str(dest / "model"))
    run_id = mv.tags.get("unitoken.registration_run", mv.run_id)
    evidence = download(f"evidence (passport, evaluation, gate) of run {run_id}", run_id=run_id, artifact_path="",
                        dst_path=str(dest / "run"))
    return {"root": dest, "model": model, "passport": evidence / "passport.json", "eval": evidence / "eval",
            "gate": next((evidence / "gate").glob("*.json"))}


def load_uri(uri: str) -> Path:
    """Fetch and verify ``models:/...`` and return a local model directory (for every command)."""
    client = _client()
    mv = resolve(uri, client)
    paths = fetch(mv, client, Path(".unitoken") / "cache" / f"{mv.name}-v{mv.version}")
    problems = verify_version(mv, paths, client)
    if problems:
        raise RegistryError(f"{uri} (version {mv.version}) fails verification: {problems[0]}")
    return paths["model"]


def verify_version(mv, paths: dict[str, Path], client) -> list[str]:
    """Re-verify every digest of a version against its stored artifacts; [] when all hold."""
    problems = []
    passport = json.loads(paths["passport"].read_text())
    if _sha(_canonical({"passport": passport})) != mv.tags.get("unitoken.passport_sha256"):
        problems.append("passport.json differs from the digest recorded on the version")
    problems += verify_chain(passport)
    by_kind: dict[str, list[dict]] = {}
    for e in passport:
        by_kind.setdefault(e["kind"], []).append(e)
    try:
        verify_handoff(paths["model"])
        digest = handoff_digest(paths["model"])
        if by_kind.get("stage") and by_kind["stage"][-1]["handoff_sha256"] != digest:
            problems.append("stored model is not the hand-off the passport names")
    except ValueError as err:
        problems.append(f"stored model: {err}")
    ev = by_kind.get("eval", [{}])[0]
    if _sha((paths["eval"] / "report.json").read_bytes()) != ev.get("report_sha256"):
        problems.append("stored evaluation report does not match the passport")
    if _sha((paths["eval"] / "items.jsonl").read_bytes()) != ev.get("items_sha256"):
        problems.append("stored evaluation items do not match the passport")
    if _sha(paths["gate"].read_bytes()) != by_kind.get("gate", [{}])[0].get("decision_sha256"):
        problems.append("stored gate decision does not match the passport")
    for st in by_kind.get("stage", []):
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


def history(name: str, alias: str = "champion", client=None) -> list[dict]:
    client = client or _client()
    tags = client.get_registered_model(name).tags
    prefix = f"{HISTORY}.{alias}."
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(prefix)]


def _holder(client, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None


def promote(name: str, version: str, alias: str = "champion", expect_current: str | None = None,
            reason: str = "", action: str = "promote") -> dict:
    """Move ``alias`` to ``version`` if (and only if) it is where the caller expects.

    ``expect_current``: None skips the check; ``"none"`` requires the alias to be unset.
    """
    client = _client()
    version = str(version)
    mv = resolve(f"models:/{name}/{version}", client)
    current = _holder(client, name, alias)
    if expect_current is not None and str(expect_current).lower() != str(current).lower():
        raise ConflictError(f"alias {alias!r} of {name} is held by version {current}, not {expect_current}; "
                            "re-read it (unitoken registry history) and retry")
    paths = fetch(mv, client)
    try:
        problems = verify_version(mv, paths, client)
    finally:
        shutil.rmtree(paths["root"], ignore_errors=True)
    if problems:
        raise RegistryError(f"refusing to promote {name} v{version}: {problems[0]}")
    seq = len(history(name, alias, client))
    try:  # the compare-and-swap: exactly one creator of this lock name exists
        client.create_registered_model(f"{name}.lock.{alias}.{seq:06d}", tags={"unitoken.lock": "true"})
    except Exception as err:  # noqa: BLE001
        if "RESOURCE_ALREADY_EXISTS" in str(err) or "already exists" in str(err).lower():
            raise ConflictError(f"another promotion of {name}@{alias} moved first (move #{seq}); re-read and retry") from None
        raise
    if _holder(client, name, alias) != current:  # a writer that skipped the lock protocol
        raise ConflictError(f"alias {alias!r} of {name} changed during the promotion")
    client.set_registered_model_alias(name, alias, version)
    entry = {"seq": seq, "action": action, "alias": alias, "from": current, "to": version,
             "who": os.environ.get("UNITOKEN_ACTOR") or getpass.getuser(), "when": time.strftime(
                 "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason}
    client.set_registered_model_tag(name, f"{HISTORY}.{alias}.{seq:06d}", json.dumps(entry))
    return entry


def rollback(name: str, alias: str = "champion", reason: str = "rollback") -> dict:
    client = _client()
    moves = history(name, alias, client)
    current = _holder(client, name, alias)
    if not moves or moves[-1]["from"] is None:
        raise RegistryError(f"{name}@{alias} has no previous holder to roll back to")
    return promote(name, moves[-1]["from"], alias, expect_current=current, reason=reason, action="rollback")


# --------------------------------------------------------------------------- lineage


def lineage(uri: str) -> dict:
    """The lineage tree of a version, every digest re-verified; ``ok`` False on any broken link."""
    client = _client()
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
