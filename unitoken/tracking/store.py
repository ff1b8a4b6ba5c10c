"""The one home of MLflow in unitoken: the default tracking URI, the client, the experiment a
run goes to, batched logging and the artifact retries.

Every MLflow client is built by ``client()`` against ``default_tracking_uri()``
(``MLFLOW_TRACKING_URI``, else the sqlite store in ``unitoken_home()``).

**Artifact store (S3) errors.** The tracking server can be up while its artifact store (S3)
fails. Code that must not go on without its artifact (registration, pipeline steps) calls
``with_artifact_retries``: a bounded number of attempts with exponential backoff, then
``ArtifactLogError`` naming the artifact and the run.

**The parent run.** Inside one process the run a run nests under is passed as an argument;
across a process boundary (torchrun ranks, a TrainJob's pods) it travels as
``MLFLOW_PARENT_RUN_ID``, which only the receiving command reads (``parent_run_from_env``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from unitoken.files import scoped_env, unitoken_home

if TYPE_CHECKING:
    from tenacity import RetryCallState

log = logging.getLogger(__name__)
PARENT_RUN_ENV = "MLFLOW_PARENT_RUN_ID"


def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` for ``tracking_uri`` (default: ``default_tracking_uri()``); the only
    place one is built."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def parent_run_from_env() -> str | None:
    """The run a command's runs nest under when it was started by another process (the pipeline's
    step launcher, torchrun, a TrainJob pod): ``MLFLOW_PARENT_RUN_ID``, else ``MLFLOW_RUN_ID``."""
    return os.environ.get(PARENT_RUN_ENV) or os.environ.get("MLFLOW_RUN_ID") or None


class ArtifactLogError(RuntimeError):
    """MLflow could not store an artifact after every retry (its artifact store keeps failing)."""


# 4xx answers other than 429 mean the request itself is wrong (or not allowed): not retried.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST",
                    "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def _transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False  # a local file problem: retrying cannot help
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return getattr(err, "error_code", None) not in _PERMANENT_CODES


def first_line(err: BaseException, limit: int) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


@contextlib.contextmanager
def _single_http_attempt():
    """MLflow's own HTTP retries back off for minutes on a 500; tenacity is the only retry layer.
    Scoped to one attempt: other MLflow calls in this process keep MLflow's defaults."""
    with scoped_env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"):
        yield


def with_artifact_retries(what: str, upload, attempts: int | None = None, backoff_s: float | None = None,
                          action: str = "storing it in"):
    """Run ``upload()`` (an MLflow artifact call: an upload, or a download with ``action="reading it
    from"``) up to ``attempts`` times, waiting ``backoff_s``, then twice as long after each failure
    (defaults: ``UNITOKEN_ARTIFACT_ATTEMPTS`` = 5 and ``UNITOKEN_ARTIFACT_BACKOFF_S`` = 2, i.e. up
    to 2+4+8+16 = 30 s of waiting). A connection the server closed during a failed upload fails
    at most the next attempt, which is retried like any transient error.

    Raises:
        ArtifactLogError: still failing after the last attempt, or a permanent error (4xx, a
            missing local file); the message names ``what`` and the last error.
    """
    # tenacity comes with the [pipeline] extra, like MLflow; training imports this module without them
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    attempts = attempts or int(os.environ.get("UNITOKEN_ARTIFACT_ATTEMPTS", "5"))
    delay = float(os.environ.get("UNITOKEN_ARTIFACT_BACKOFF_S", "2")) if backoff_s is None else backoff_s

    def once():
        with _single_http_attempt():
            return upload()

    def warn(state: RetryCallState) -> None:
        err = state.outcome.exception()
        log.warning("%s: artifact store error (%s: %s); attempt %d/%d, retrying in %.0f s", what, type(err).__name__,
                    first_line(err, 300), state.attempt_number, attempts, state.upcoming_sleep)

    retrying = Retrying(stop=stop_after_attempt(attempts), wait=wait_exponential(multiplier=delay, exp_base=2),
                        # Exception only: KeyboardInterrupt and SystemExit stop at once
                        retry=retry_if_exception(lambda err: isinstance(err, Exception) and _transient(err)),
                        before_sleep=warn, reraise=True)
    start = time.monotonic()
    try:
        return retrying(once)
    except Exception as err:  # noqa: BLE001 - re-raised with the artifact's name
        kind = "failed" if _transient(err) else "was refused (not retried)"
        raise ArtifactLogError(
            f"{what}: {action} MLflow's artifact store {kind} after {retrying.statistics['attempt_number']} "
            f"attempt(s) over {time.monotonic() - start:.0f} s (last error {type(err).__name__}: "
            f"{first_line(err, 300)})") from err


@contextlib.contextmanager
def fail_fast_http():
    """The tracker's own sends: one HTTP attempt, 10 s timeout (its queue does the retrying;
    MLflow's default backs off for minutes), unless the environment sets either. Scoped, so the
    registry and pipeline steps in the same process keep MLflow's defaults."""
    with (scoped_env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or "0"),
          scoped_env("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "10")):
        yield


def stale_connection(err: BaseException) -> bool:
    """The request died on a pooled keep-alive connection the server had closed (it may close one
    after failing an upload, and MLflow's retries are 0 in our scopes): worth one more try at
    once, on a fresh connection. A refused connection or an HTTP error is not this."""
    from urllib3.exceptions import ProtocolError

    while err is not None:
        reason = getattr(err.args[0], "reason", None) if err.args else None  # requests wraps urllib3's MaxRetryError
        if isinstance(err, ProtocolError) or isinstance(reason, ProtocolError):
            return True
        err = err.__cause__ or err.__context__  # MLflow re-raises requests' error without `from`
    return False


def log_batched(client, run_id: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                metrics: dict[str, float] | None = None, step: int = 0) -> None:
    """A run's params, tags and metrics in as few ``log_batch`` calls as MLflow's limits allow
    (100 params, 100 tags, 1,000 entries per call). Params are cut at 6,000 characters."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ps = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
    ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    ms = [Metric(k, float(v), now, int(step)) for k, v in sorted((metrics or {}).items())]
    while ps or ts or ms:
        client.log_batch(run_id, params=ps[:100], tags=ts[:100], metrics=ms[:800])
        ps, ts, ms = ps[100:], ts[100:], ms[800:]


_announced: set[str] = set()
# MLflow 3's UI opens an experiment on its GenAI overview unless it is tagged as model development
# (the runs table then comes first)
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the sqlite store in ``unitoken_home()``, which is said once per
    process on stderr (a command run from another directory must not silently start a new store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = unitoken_home()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    if uri not in _announced:
        _announced.add(uri)
        print(f"MLflow tracking store: {uri} (set MLFLOW_TRACKING_URI or UNITOKEN_HOME for another)",
              file=sys.stderr)
    return uri


def ensure_experiment(client, name: str = "unitoken") -> str:
    """Experiment id; created on first use, with artifacts under ``unitoken_home()`` for the local store."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:  # made before the tag existed
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return exp.experiment_id
    location = None
    if client.tracking_uri == default_tracking_uri() and client.tracking_uri.startswith("sqlite:"):
        location = (unitoken_home() / "artifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
    except MlflowException as err:  # a parallel step (a pre-tokenisation worker) created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        log.info("experiment %s was created concurrently (%s)", name, err.error_code)
        return exp.experiment_id


def experiment_for(client, parent_run_id: str | None, name: str = "unitoken") -> str:
    """Where a run goes: its parent's experiment (a nested run beside its parent, also when the
    parent is KFP's own pipeline run in KFP's experiment), else ours, created on first use."""
    if parent_run_id:
        return client.get_run(parent_run_id).info.experiment_id
    return ensure_experiment(client, name)
