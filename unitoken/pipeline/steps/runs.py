"""The pipeline's MLflow runs and the step cache wrapper: the pipeline run (the parent, KFP's own
when its MLflow integration opened one), every step's nested run, and ``cached_step``, which
reuses a verified output for the same inputs or computes it. A ``parent_run_id`` of None runs a
step with no MLflow at all (the small study's GPU machine has none)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unitoken.model.handoff import handoff_digest
from unitoken.pipeline.cache import CacheCorrupt, StepCache, cache_key
from unitoken.tracking import store as tracking
from unitoken.tracking.store import (
    ArtifactLogError,
    ensure_experiment,
    experiment_for,
    log_batched,
    with_artifact_retries,
)

log = logging.getLogger(__name__)


PIPELINE_TAG = "unitoken.pipeline_job"            # the KFP run's id: unique, the key


PIPELINE_NAME_TAG = "unitoken.pipeline_job_name"  # its display name: for people, not unique


class StepError(RuntimeError):
    """A pipeline step cannot do its work; the message says why and what to change."""


def _find_pipeline_run(client, exp_id: str, job: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{job}'", max_results=1)
    return runs[0] if runs else None


KFP_MLFLOW_ENV = "KFP_MLFLOW_CONFIG"


def kfp_parent_run(client) -> str | None:
    """The parent run KFP's own MLflow integration opened for this pipeline run, if it is on
    (KFP 2.17 ``plugins.mlflow``: the API server creates one run per pipeline run and passes
    its id as ``parentRunId`` in the JSON env ``KFP_MLFLOW_CONFIG``) and it lives on our
    tracking server; else None (we open our own)."""
    raw = os.environ.get(KFP_MLFLOW_ENV, "").strip()
    if not raw:
        return None
    try:
        run_id = json.loads(raw).get("parentRunId") or None
    except (json.JSONDecodeError, AttributeError):
        log.warning("%s is not a JSON object; opening our own parent run", KFP_MLFLOW_ENV)
        return None
    if run_id is None:
        return None
    try:
        client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - KFP's MLflow may be another server than MLFLOW_TRACKING_URI
        log.warning("KFP's MLflow parent run %s is not on %s (%s); opening our own parent run",
                    run_id, client.tracking_uri, type(err).__name__)
        return None
    return run_id


def open_pipeline_run(job: str, job_name: str, params: dict[str, Any]) -> str:
    """The parent MLflow run of the pipeline run with id ``job``: KFP's own when its MLflow
    integration opened one (``kfp_parent_run``), else ours, created once and named ``job_name``;
    a retried step finds it by the id."""
    client = tracking.client()
    tags = {PIPELINE_TAG: job, PIPELINE_NAME_TAG: job_name, "unitoken.kind": "pipeline"}
    adopted = kfp_parent_run(client)
    if adopted is not None:
        log_batched(client, adopted, params=params, tags=tags)  # same values on a retry: accepted again
        return adopted
    exp_id = ensure_experiment(client)
    run = _find_pipeline_run(client, exp_id, job)
    if run is not None:
        return run.info.run_id
    run_id = client.create_run(exp_id, run_name=readable_run_name(job_name or job), tags=tags).info.run_id
    log_batched(client, run_id, params=params)
    return run_id


def readable_run_name(job_name: str) -> str:
    """A pipeline run's name as the MLflow UI's run list can show it whole: KFP's
    ``unitoken-training-2026-12-06-17-19-38-925963`` -> ``training 12-06 17:19:38`` (the full
    name stays in the tag ``unitoken.pipeline_name``); other names as they are."""
    m = re.fullmatch(r"(?:unitoken-)?(.+?)-\d{4}-(\d{2}-\d{2})-(\d{2})-(\d{2})-(\d{2})(?:-\d+)?", job_name)
    return f"{m[1]} {m[2]} {m[3]}:{m[4]}:{m[5]}" if m else job_name


def pipeline_run_id(job: str) -> str:
    """The parent MLflow run that ``open_pipeline_run`` opened for the pipeline run ``job``, found
    by the id (a task inside a ``dsl.ParallelFor`` looks it up rather than take it as an input:
    kfp.local 2.17.3 replaces every upstream task output passed into a loop with the loop item).

    Raises:
        StepError: no such run (the open-run step did not run for this job).
    """
    client = tracking.client()
    adopted = kfp_parent_run(client)
    if adopted is not None:
        return adopted
    run = _find_pipeline_run(client, ensure_experiment(client), job)
    if run is None:
        raise StepError(f"no MLflow pipeline run tagged {PIPELINE_TAG}={job} on {client.tracking_uri}; "
                        "the open-run step opens it first")
    return run.info.run_id


def close_pipeline_run(job: str, state: str, error: str | None = None) -> str:
    """Mark the parent run FINISHED or FAILED from KFP's final status of the pipeline (KFP's
    own parent run too, when we adopted it: KFP sets the same terminal state later)."""
    client = tracking.client()
    run_id = kfp_parent_run(client)
    if run_id is None:
        run = _find_pipeline_run(client, ensure_experiment(client), job)
        if run is None:  # the pipeline failed before its first step could open the run
            return "none"
        run_id = run.info.run_id
    status = "FINISHED" if state.upper() in ("SUCCEEDED", "SUCCESS") else "FAILED"
    tags = {"unitoken.pipeline_state": state}
    if error:
        tags["unitoken.pipeline_error"] = error[:5000]
    log_batched(client, run_id, tags=tags)
    client.set_terminated(run_id, status)
    return status


class StepRun:
    """A nested MLflow run for one step (params, metrics, artifacts), FAILED if the step raises."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def params(self, params: dict[str, Any]) -> None:
        log_batched(self.client, self.run_id, params=params)

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        log_batched(self.client, self.run_id, metrics={k.replace("/", "."): v for k, v in metrics.items()}, step=step)

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Store a file with the run: retried with backoff; when the artifact store keeps failing
        the step fails (StepError) naming the file, and KFP's retry / a re-run takes it from there."""
        if not Path(path).is_file():
            return
        name = f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name
        try:
            with_artifact_retries(f"{name} of run {self.run_id}",
                                  lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))
        except ArtifactLogError as err:
            raise StepError(f"{err}. The step failed; check the tracking server's artifact store (S3), then retry "
                            "the step or re-run the pipeline (steps that finished are reused from the step "
                            "cache)") from err

    def tags(self, tags: dict[str, str]) -> None:
        log_batched(self.client, self.run_id, tags=tags)


class NullStepRun:
    """A step's run when nothing is tracked (``parent_run_id`` None): records nothing."""

    run_id = None

    def params(self, params: dict[str, Any]) -> None: ...

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...

    def artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def tags(self, tags: dict[str, str]) -> None: ...


@contextlib.contextmanager
def step_run(name: str, parent_run_id: str | None, params: dict[str, Any] | None = None
             ) -> Iterator[StepRun | NullStepRun]:
    """The step's nested MLflow run under ``parent_run_id`` ("": a top-level run; None: none)."""
    if parent_run_id is None:
        yield NullStepRun()
        return
    client = tracking.client()
    tags = {"unitoken.kind": "pipeline-step", "unitoken.step": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = StepRun(client, client.create_run(experiment_for(client, parent_run_id), run_name=name, tags=tags).info.run_id)
    run.params(params or {})
    try:
        yield run
    except BaseException as err:
        try:
            client.set_terminated(run.run_id, "FAILED")
        except Exception as mark:  # noqa: BLE001 - never hide the step's own error behind this one
            log.warning("could not mark MLflow run %s FAILED (%s) after: %s", run.run_id, type(mark).__name__, err)
        raise
    client.set_terminated(run.run_id, "FINISHED")


def cached_step(step: str, run_name: str, inputs, out: Path, cache: StepCache | None, parent_run_id: str,
                compute, hit_metrics=None) -> dict:
    """Reuse a verified cache entry for ``inputs()`` (``unitoken/pipeline/cache.py``) or compute.

    ``compute(tags)`` writes the step's output into ``out``, tags its MLflow run with ``tags``
    and returns (summary, MLflow run id); its output is then stored under the key. A hit copies
    the entry into ``out`` and records a nested run ``run_name`` tagged ``unitoken.cache=hit``
    with the key and the run (and pipeline run) that computed the output, so lineage points at
    the original. The returned summary carries ``cache`` (hit | miss | off) and ``cache_key``.
    """
    cache = cache or StepCache(None)
    out = Path(out)
    inputs = inputs() if cache.active else {}  # digests are computed only when a cache is in use
    key = cache_key(step, inputs, compute.__module__) if cache.active else ""
    meta = cache.lookup(step, key) if key else None
    if meta is not None:
        try:
            cache.restore(step, key, meta, out)
        except (OSError, CacheCorrupt) as err:  # replaced or evicted by another step mid-copy
            log.warning("cache entry %s/%s could not be restored (%s); recomputing", step, key[:12], err)
            shutil.rmtree(out, ignore_errors=True)  # no part of the copy is left for the computation to mix with
            meta = None
    if meta is not None:
        source = meta.get("mlflow_run_id") or "unknown"
        tags = {"unitoken.cache": "hit", "unitoken.cache_key": key, "unitoken.cache_source_run": source,
                "unitoken.cache_source_pipeline_run": meta.get("pipeline_run_id") or "unknown"}
        if step.startswith("stage"):
            tags |= {"unitoken.stage": step[5:], "unitoken.handoff_sha256": handoff_digest(out)}
        with step_run(run_name, parent_run_id, {f"cache.{k}": v for k, v in inputs.items()}) as run:
            run.tags(tags)
            if hit_metrics is not None:
                run.metrics(hit_metrics(out))
        return {**meta["summary"], "cache": "hit", "cache_key": key, "cache_source_run": source}
    state = "miss" if key else "off"
    tags = {"unitoken.cache": state} | ({"unitoken.cache_key": key} if key else {})
    summary, run_id = compute(tags)
    if key:
        cache.store(step, key, inputs, out, summary, run_id, parent_run_id or None)
    return {**summary, "cache": state, "cache_key": key}


def tag_run(run_id: str | None, tags: dict[str, str]) -> None:
    """Tags for a run created by the training tracker; a warning (not a failed stage) if MLflow is down."""
    if not run_id:
        return
    try:
        log_batched(tracking.client(), run_id, tags=tags)
    except Exception as err:  # noqa: BLE001 - the stage's output is complete and cached; say what is missing
        log.warning("could not tag MLflow run %s with %s (%s)", run_id, tags, err)
