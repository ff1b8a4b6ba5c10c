"""``models:/NAME/V`` and ``models:/NAME@ALIAS`` for every command: resolved, fetched into the
local cache and verified against the passport before anything loads them; the lineage of a version."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from unitoken.files import unitoken_home
from unitoken.registry.common import RegistryError
from unitoken.registry.passport import canonical_sha, verify_evidence
from unitoken.registry.serving import verify_packaged
from unitoken.tracking import store as tracking
from unitoken.tracking.store import (
    ArtifactLogError,
    default_tracking_uri,
    with_artifact_retries,
)


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
