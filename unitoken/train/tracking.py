"""Experiment tracking: a Null tracker and an MLflow tracker that survives outages.

Only rank 0 tracks. The MLflow tracker queues every call (run creation, params, metrics with
``step=``, artifacts, dataset inputs) and flushes in order; when the server cannot be reached
the queue is kept and retried on the next call, so training never stops for tracking. At the
end of a stage ``close`` retries for ``final_wait_s``; whatever still cannot be sent is written
to ``pending.jsonl`` next to the stage output (documented policy, tested) and a warning says so.

The pipeline's parent run comes from ``MLFLOW_PARENT_RUN_ID`` or ``MLFLOW_RUN_ID``; the stage's
run is created as its child (``mlflow.parentRunId``).

**Artifact store (S3) errors.** The tracking server can be up while its artifact store (S3)
fails. Training's artifacts are then *deferred*: the tracker keeps them aside, params and
metrics keep flowing, and each deferred artifact is retried with exponential backoff (2 s to
60 s) until it is stored, at the latest during ``close``; what is still not stored goes to
``pending.jsonl`` like every other undelivered call. Code that must not go on without its
artifact (registration, pipeline steps) calls ``with_artifact_retries``: a bounded number of
attempts with exponential backoff, then ``ArtifactLogError`` naming the artifact and the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitoken.files import scoped_env, unitoken_home

if TYPE_CHECKING:
    from tenacity import RetryCallState

log = logging.getLogger(__name__)


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


def _first_line(err: BaseException, limit: int) -> str:
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
                    _first_line(err, 300), state.attempt_number, attempts, state.upcoming_sleep)

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
            f"{_first_line(err, 300)})") from err


@contextlib.contextmanager
def _fail_fast_http():
    """The tracker's own sends: one HTTP attempt, 10 s timeout (its queue does the retrying;
    MLflow's default backs off for minutes), unless the environment sets either. Scoped, so the
    registry and pipeline steps in the same process keep MLflow's defaults."""
    with (scoped_env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or "0"),
          scoped_env("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or "10")):
        yield


def _stale_connection(err: BaseException) -> bool:
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


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, rows: list[dict], context: str = "train") -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class MLflowTracker(NullTracker):
    def __init__(self, run_name: str, out_dir: Path, experiment: str = "unitoken", tracking_uri: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
                 final_wait_s: float = 30.0, min_flush_interval_s: float = 2.0) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        self.uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.out_dir = Path(out_dir)
        self.run_name, self.experiment = run_name, experiment
        self.parent = parent_run_id or os.environ.get("MLFLOW_PARENT_RUN_ID") or os.environ.get("MLFLOW_RUN_ID")
        self.tags = dict(tags or {})
        self.run_id = run_id  # resuming an interrupted stage continues its run
        self.queue: list[tuple[str, tuple, float]] = []
        # artifacts the artifact store refused: [op args, stamp, next attempt (monotonic), delay]
        self.deferred: list[list] = []
        self.final_wait_s, self.min_flush_interval_s = final_wait_s, min_flush_interval_s
        self._last_flush = 0.0
        self.failures = 0
        self.flush(force=True)

    # ------------------------------------------------------------------ queueing

    def _push(self, op: str, *args, urgent: bool = False) -> None:
        self.queue.append((op, args, time.time()))
        self.flush(force=urgent)

    def log_params(self, params: dict[str, Any]) -> None:
        self._push("params", {k: str(v)[:6000] for k, v in params.items()}, urgent=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._push("metrics", {k: float(v) for k, v in metrics.items()}, int(step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._push("artifact", str(path), artifact_path, urgent=True)

    def log_dataset(self, name: str, digest: str, source: str, rows: list[dict], context: str = "train") -> None:
        self._push("dataset", name, digest, source, rows, context, urgent=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._push("tags", dict(tags), urgent=True)

    # ------------------------------------------------------------------ sending

    def _ensure_run(self) -> None:
        if self.run_id:
            return
        exp_id = experiment_for(self.client, self.parent, self.experiment)
        tags = dict(self.tags)
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id

    def _send(self, op: str, args: tuple, stamp: float) -> None:
        """One queued call, sent again at once if it met a stale pooled connection (``_stale_connection``)."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        Retrying(stop=stop_after_attempt(2), retry=retry_if_exception(_stale_connection), reraise=True)(
            self._send_once, op, args, stamp)

    def _send_once(self, op: str, args: tuple, stamp: float) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

        if op == "params":
            items = [Param(k, v) for k, v in args[0].items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        elif op == "metrics":
            metrics, step = args
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, int(stamp * 1000), step) for k, v in metrics.items()])
        elif op == "artifact":
            self.client.log_artifact(self.run_id, args[0], args[1])
        elif op == "tags":
            log_batched(self.client, self.run_id, tags=args[0])
        elif op == "dataset":
            import mlflow.data
            import pandas as pd

            name, digest, source, rows, context = args
            ds = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name, digest=digest)
            # to_dict() carries exactly the entity's fields (name, digest, source, source_type, schema, profile)
            entity = Dataset(**ds.to_dict())
            self.client.log_inputs(self.run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])
        elif op == "terminate":
            self.client.set_terminated(self.run_id, args[0])

    def flush(self, force: bool = False) -> bool:
        """Send queued calls in order; False (queue kept) when the server is unreachable.

        An artifact that fails is set aside (``deferred``) and retried with backoff while the
        rest of the queue goes on; the run is terminated only after its artifacts are stored.
        """
        now = time.time()
        if not force and now - self._last_flush < self.min_flush_interval_s:
            return not self.queue and not self.deferred
        self._last_flush = now
        try:
            with _fail_fast_http():
                self._ensure_run()
                self._retry_deferred(force)
                while self.queue:
                    op, args, stamp = self.queue[0]
                    if op == "terminate" and self.deferred:
                        return False  # the run ends once its artifacts are in
                    if op == "artifact":
                        try:
                            self._send(op, args, stamp)
                        except Exception as err:  # noqa: BLE001 - e.g. S3 behind the server: set aside, go on
                            self._defer(args, stamp, err)
                        self.queue.pop(0)
                        continue
                    self._send(op, args, stamp)
                    self.queue.pop(0)
        except Exception as err:  # noqa: BLE001 - any transport/server error: keep the queue, train on
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                log.warning("MLflow at %s unreachable (%s); %d calls queued, training continues",
                            self.uri, type(err).__name__, len(self.queue))
            return False
        return not self.deferred

    def _defer(self, args: tuple, stamp: float, err: Exception, delay: float = 2.0) -> None:
        self.deferred.append([args, stamp, time.monotonic() + delay, delay])
        log.warning("artifact %s not stored (%s: %s); training continues, retrying in %.0f s", args[0],
                    type(err).__name__, _first_line(err, 200), delay)

    def _retry_deferred(self, force: bool) -> None:
        keep = []
        for item in self.deferred:
            args, stamp, due, delay = item
            if time.monotonic() < due and not force:
                keep.append(item)
                continue
            try:
                self._send("artifact", args, stamp)
                log.warning("artifact %s stored after the artifact store came back", args[0])
            except Exception:  # noqa: BLE001 - still failing: back off further
                delay = min(delay * 2, 60.0)
                keep.append([args, stamp, time.monotonic() + delay, delay])
        self.deferred = keep

    def close(self, status: str = "FINISHED") -> None:
        from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

        self.queue.append(("terminate", (status,), time.time()))
        # flush until everything is delivered or final_wait_s is up, waiting 0.5 s, 1 s, ... 5 s between
        Retrying(stop=stop_after_delay(self.final_wait_s), wait=wait_exponential(multiplier=0.5, max=5.0),
                 retry=retry_if_result(lambda delivered: not delivered),
                 retry_error_callback=lambda state: state.outcome.result())(self.flush, force=True)
        if self.queue or self.deferred:
            pending = self.out_dir / "pending.jsonl"
            calls = [("artifact", args, stamp) for args, stamp, _, _ in self.deferred] + self.queue
            with open(pending, "a") as fh:
                fh.write(json.dumps({"op": "run", "run_name": self.run_name, "experiment": self.experiment,
                                     "run_id": self.run_id, "parent": self.parent, "tags": self.tags}) + "\n")
                for op, args, stamp in calls:
                    fh.write(json.dumps({"op": op, "args": args, "time": stamp}, default=str) + "\n")
            log.warning("MLflow (or its artifact store) stayed unreachable: %d calls (%d artifacts) written to %s "
                        "(replay with `python -m unitoken.train.tracking replay %s`)", len(calls),
                        sum(op == "artifact" for op, _, _ in calls), pending, pending)
            self.queue.clear()
            self.deferred.clear()


def replay(pending: Path, tracking_uri: str | None = None) -> int:
    """Send the calls a stage could not deliver (``pending.jsonl``) once MLflow is back.

    Returns the number of calls sent; the file is removed only when all of them went through,
    otherwise it is rewritten with exactly what is still undelivered (nothing is sent twice).
    A file may hold several sections (one per ``close``), each opened by a run header.
    """
    lines = [json.loads(x) for x in Path(pending).read_text().splitlines() if x.strip()]
    sent, sections = 0, []
    for line in lines:
        if line["op"] == "run":
            tracker = MLflowTracker(line["run_name"], Path(pending).parent, experiment=line["experiment"],
                                    tracking_uri=tracking_uri, run_id=line["run_id"], parent_run_id=line["parent"],
                                    tags=line["tags"])
            sections.append((line, tracker))
            continue
        if not sections:
            raise ValueError(f"{pending}: calls before any run header; not a pending.jsonl written by a stage")
        sections[-1][1].queue.append((line["op"], tuple(line["args"]), line["time"]))
        sent += 1
    left_lines = []
    for head, tracker in sections:
        if not tracker.flush(force=True):
            left = [("artifact", args, stamp) for args, stamp, _, _ in tracker.deferred] + tracker.queue
            left_lines += [head | {"run_id": tracker.run_id}] + [{"op": op, "args": args, "time": stamp}
                                                                  for op, args, stamp in left]
    if left_lines:
        tmp = Path(pending).with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x, default=str) + "\n" for x in left_lines))
        tmp.replace(pending)
        raise ConnectionError(f"MLflow (or its artifact store) still unreachable; "
                              f"{len(left_lines) - sum(x['op'] == 'run' for x in left_lines)} calls kept in {pending}")
    Path(pending).unlink()
    return sent


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "replay":
        print(f"replayed {replay(Path(sys.argv[2]))} calls")
    else:
        print("usage: python -m unitoken.train.tracking replay PENDING_JSONL")
        sys.exit(2)
