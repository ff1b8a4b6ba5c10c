"""Experiment tracking of a training stage: a Null tracker and an MLflow tracker that survives
outages.

Only rank 0 tracks. The MLflow tracker queues every call (run creation, params, metrics with
``step=``, artifacts, dataset inputs) and flushes in order; when the server cannot be reached
the queue is kept and retried on the next call, so training never stops for tracking. At the
end of a stage ``close`` retries for ``final_wait_s``; whatever still cannot be sent is written
to ``pending.jsonl`` next to the stage output (documented policy, tested) and a warning says so
(``python -m unitoken.tracking replay OUT/pending.jsonl`` sends it later).

The stage's run is created as a child (``mlflow.parentRunId``) of ``parent_run_id``. Artifacts
the artifact store refuses are *deferred*: params and metrics keep flowing, and each deferred
artifact is retried with exponential backoff (2 s to 60 s) until it is stored, at the latest
during ``close``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from unitoken.tracking.store import (
    client,
    default_tracking_uri,
    experiment_for,
    fail_fast_http,
    first_line,
    log_batched,
    stale_connection,
)

log = logging.getLogger(__name__)


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
        self.uri = tracking_uri or default_tracking_uri()
        self.client = client(self.uri)
        self.out_dir = Path(out_dir)
        self.run_name, self.experiment = run_name, experiment
        self.parent = parent_run_id
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
        """One queued call, sent again at once if it met a stale pooled connection (``stale_connection``)."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        Retrying(stop=stop_after_attempt(2), retry=retry_if_exception(stale_connection), reraise=True)(
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
            with fail_fast_http():
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
                    type(err).__name__, first_line(err, 200), delay)

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
                        "(replay with `python -m unitoken.tracking replay %s`)", len(calls),
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
