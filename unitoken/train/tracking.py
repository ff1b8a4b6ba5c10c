"""Experiment tracking: a Null tracker and an MLflow tracker that survives outages.

Only rank 0 tracks. The MLflow tracker queues every call (run creation, params, metrics with
``step=``, artifacts, dataset inputs) and flushes in order; when the server cannot be reached
the queue is kept and retried on the next call, so training never stops for tracking. At the
end of a stage ``close`` retries for ``final_wait_s``; whatever still cannot be sent is written
to ``pending.jsonl`` next to the stage output (documented policy, tested) and a warning says so.

The pipeline's parent run comes from ``MLFLOW_PARENT_RUN_ID`` or ``MLFLOW_RUN_ID``; the stage's
run is created as its child (``mlflow.parentRunId``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(".unitoken").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def ensure_experiment(client, name: str = "unitoken") -> str:
    """Experiment id; created on first use, with artifacts under ./.unitoken/ for the local store."""
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    location = None
    if client.tracking_uri == default_tracking_uri() and client.tracking_uri.startswith("sqlite:"):
        location = (Path(".unitoken") / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


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
        # Fail fast per request; our own queue does the retrying (mlflow's default backs off for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
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
        exp_id = ensure_experiment(self.client, self.experiment)
        tags = dict(self.tags)
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id

    def _send(self, op: str, args: tuple, stamp: float) -> None:
        from mlflow.entities import DatasetInput, InputTag, Metric, Param

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
            for k, v in args[0].items():
                self.client.set_tag(self.run_id, k, v)
        elif op == "dataset":
            import mlflow.data
            import pandas as pd

            name, digest, source, rows, context = args
            ds = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name, digest=digest)
            self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(),
                                                              tags=[InputTag("mlflow.data.context", context)])])
        elif op == "terminate":
            self.client.set_terminated(self.run_id, args[0])

    def flush(self, force: bool = False) -> bool:
        """Send queued calls in order; False (queue kept) when the server is unreachable."""
        now = time.time()
        if not force and now - self._last_flush < self.min_flush_interval_s:
            return not self.queue
        self._last_flush = now
        try:
            self._ensure_run()
            while self.queue:
                self._send(*self.queue[0])
                self.queue.pop(0)
        except Exception as err:  # noqa: BLE001 - any transport/server error: keep the queue, train on
            self.failures += 1
            if self.failures == 1 or self.failures % 50 == 0:
                log.warning("MLflow at %s unreachable (%s); %d calls queued, training continues",
                            self.uri, type(err).__name__, len(self.queue))
            return False
        return True

    def close(self, status: str = "FINISHED") -> None:
        self.queue.append(("terminate", (status,), time.time()))
        deadline = time.time() + self.final_wait_s
        delay = 0.5
        while not self.flush(force=True) and time.time() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        if self.queue:
            pending = self.out_dir / "pending.jsonl"
            with open(pending, "a") as fh:
                fh.write(json.dumps({"op": "run", "run_name": self.run_name, "experiment": self.experiment,
                                     "run_id": self.run_id, "parent": self.parent, "tags": self.tags}) + "\n")
                for op, args, stamp in self.queue:
                    fh.write(json.dumps({"op": op, "args": args, "time": stamp}, default=str) + "\n")
            log.warning("MLflow stayed unreachable: %d calls written to %s (replay with "
                        "`python -m unitoken.train.tracking replay %s`)", len(self.queue), pending, pending)
            self.queue.clear()


def replay(pending: Path, tracking_uri: str | None = None) -> int:
    """Send the calls a stage could not deliver (``pending.jsonl``) once MLflow is back.

    Returns the number of calls sent; the file is removed only when all of them went through.
    """
    lines = [json.loads(x) for x in Path(pending).read_text().splitlines() if x.strip()]
    sent, tracker = 0, None
    for line in lines:
        if line["op"] == "run":
            tracker = MLflowTracker(line["run_name"], Path(pending).parent, experiment=line["experiment"],
                                    tracking_uri=tracking_uri, run_id=line["run_id"], parent_run_id=line["parent"],
                                    tags=line["tags"])
            continue
        tracker.queue.append((line["op"], tuple(line["args"]), line["time"]))
        sent += 1
    if tracker is None or not tracker.flush(force=True):
        raise ConnectionError(f"MLflow still unreachable; {pending} kept")
    Path(pending).unlink()
    return sent


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "replay":
        print(f"replayed {replay(Path(sys.argv[2]))} calls")
    else:
        print("usage: python -m unitoken.train.tracking replay PENDING_JSONL")
        sys.exit(2)
