"""Run the pipeline: locally through ``kfp.local`` (the embedded default), or on a KFP server.

    unitoken pipeline run --local [--recipe tiny]             (what `make demo` runs)
    unitoken pipeline compile --out FILE [--stages 3] [--cluster cluster.yaml]
    unitoken pipeline submit --host URL [--cluster ...] --param data_uri=s3://...
    unitoken pipeline schedule --host URL --cron "0 0 3 * * 0" [...]   (KFP recurring run, 6-field cron)
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from pipelines.unitoken_training import build_pipeline, compile_pipeline  # noqa: F401  (the CLI compiles through launch)


def run_local(data_uri: str, root: Path, params: dict, stages: tuple[int, ...] = (1, 2, 3),
              pretokenize_workers: int = 1) -> dict:
    """Run the whole pipeline in subprocesses of this Python (``kfp.local``), then read back
    what it recorded in MLflow: the parent run, every step's nested run, the registered model.

    Returns: {"job", "state", "seconds", "parent_run_id", "steps": [...], "scores": {label: {suite:
    {"score", "chance", "ci95"}}}, "heldout": {label: {task: loss}}, "gate": {"passed",
    "champion_version", "checks"}, "model_uri", "duplicate_of"}.
    """
    from kfp import local

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "artifacts"),
               raise_on_error=False)
    pipeline = build_pipeline(stages, checkpoint_root=str(root / "checkpoints"),
                              pretokenize_workers=pretokenize_workers)
    start = time.perf_counter()
    pipeline(data_uri=data_uri, **params)
    seconds = time.perf_counter() - start
    job = _job_name(root / "artifacts")
    return {"seconds": round(seconds, 1), **summarize(job, params.get("model_name", "unitoken"))}


def _job_name(artifacts: Path) -> str:
    """kfp.local names the job <pipeline>-<timestamp>; the newest directory under the root is it."""
    jobs = sorted((p for p in artifacts.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return jobs[-1].name


def summarize(job: str, model_name: str) -> dict:
    """What a pipeline job recorded in MLflow, found by the job's name on its parent run
    (kfp.local names every job <pipeline>-<timestamp>: unique here, unlike a server's display names)."""
    from unitoken.pipeline.steps import PIPELINE_NAME_TAG
    from unitoken.tracking import store as tracking

    client = tracking.client()
    exp = tracking.ensure_experiment(client)
    parents = client.search_runs([exp], filter_string=f"tags.`{PIPELINE_NAME_TAG}` = '{job}'", max_results=1)
    if not parents:
        return {"job": job, "state": "NOT STARTED", "steps": [], "scores": {}, "heldout": {}, "gate": None,
                "model_uri": None, "duplicate_of": None}
    parent = parents[0]
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=200)
    steps, scores, heldout, gate, model_uri, duplicate_of = [], {}, {}, None, None, None
    for run in children:
        name = run.info.run_name
        secs = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        steps.append({"name": name, "status": run.info.status, "seconds": round(secs, 1), "run_id": run.info.run_id,
                      "cache": run.data.tags.get("unitoken.cache", "")})
        m = run.data.metrics
        if name.startswith("eval-"):
            scores[name[5:]] = {k.removesuffix(".overall"): _score(m, k.removesuffix(".overall"))
                                for k in m if k.endswith(".overall")}
            heldout[name[5:]] = {k.split(".")[1]: v for k, v in m.items()
                                 if k.startswith("heldout_loss.") and k.count(".") == 1}
        if name == "gate":
            gate = {"passed": bool(m.get("passed")), "champion_version": run.data.params.get("champion_version"),
                    "checks": run.data.tags.get("unitoken.gate_checks", "")}
        if name.startswith("register-"):
            duplicate_of = run.data.tags.get("unitoken.duplicate_of")
            mv = [v for v in client.search_model_versions(f"name='{model_name}'")
                  if v.tags.get("unitoken.registration_run") == run.info.run_id]
            if duplicate_of:
                model_uri = f"models:/{model_name}/{duplicate_of}"
            elif mv:
                model_uri = f"models:/{model_name}/{mv[0].version}"
    return {"job": job, "state": parent.data.tags.get("unitoken.pipeline_state", parent.info.status),
            "error": parent.data.tags.get("unitoken.pipeline_error"), "parent_run_id": parent.info.run_id,
            "experiment_id": exp,
            "steps": steps, "scores": scores, "heldout": heldout, "gate": gate, "model_uri": model_uri,
            "duplicate_of": duplicate_of}


def _score(metrics: dict, suite: str) -> dict:
    """A suite's score with its chance level and 95 % interval (None where not logged)."""
    low, high = metrics.get(f"{suite}.ci95_low"), metrics.get(f"{suite}.ci95_high")
    return {"score": metrics[f"{suite}.overall"], "chance": metrics.get(f"{suite}.chance"),
            "ci95": None if low is None else (low, high)}


# --------------------------------------------------------------------------- a KFP server


def parse_params(pairs: list[str]) -> dict:
    """``key=value`` pipeline arguments; values that parse as JSON (numbers, booleans) are typed."""
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--param {pair!r}: expected NAME=VALUE")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value) if value[:1] in "-0123456789tf[{" else value
        except json.JSONDecodeError:
            params[key] = value
    return params


class Unreachable(ConnectionError):
    """The Kubeflow Pipelines API did not answer."""


def _client(host: str, client=None):
    """A KFP client for ``host`` (its constructor calls the API's healthz).

    Raises:
        Unreachable: nothing answers at ``host``, in one line naming it and the fix (urllib3's
            retry warnings and the MaxRetryError traceback are not shown).
    """
    if client is not None:
        return client
    import logging

    import kfp
    import urllib3

    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one warning per retry otherwise
    try:
        return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN") or None)
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise Unreachable(f"the Kubeflow Pipelines API at {host} does not answer ({type(reason).__name__}); "
                          "fix: check --host (e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80` "
                          "and --host http://127.0.0.1:8080)") from None


def submit(host: str, package: Path, params: dict, experiment: str = "unitoken", run_name: str | None = None,
           service_account: str | None = None, client=None) -> str:
    """Start one run of a compiled pipeline as ``service_account``; returns the run id."""
    c = _client(host, client)
    run = c.create_run_from_pipeline_package(str(package), arguments=params, experiment_name=experiment,
                                             run_name=run_name, service_account=service_account)
    return run.run_id


def run_link(host: str, run_id: str) -> str:
    """The run's page in the KFP UI (the address the SDK itself prints for a new run)."""
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


CRON = re.compile(r"^\S+( \S+){5}$")


def schedule(host: str, package: Path, params: dict, cron: str, name: str, experiment: str = "unitoken",
             max_concurrency: int = 1, service_account: str | None = None, catch_up: bool = False,
             client=None) -> str:
    """A KFP recurring run (scheduled retraining); ``cron`` has 6 fields, seconds first.

    ``no_catchup`` is always sent: by default (``catch_up`` False) a schedule paused or created
    with a past start runs once for the latest missed time, not once per missed interval (each
    would be a full retraining on the GPU pools)."""
    if not CRON.match(cron.strip()):
        raise ValueError(f"--cron {cron!r}: KFP takes 6 fields, seconds first, e.g. '0 0 3 * * 0' (Sundays 03:00)")
    c = _client(host, client)
    exp = c.create_experiment(experiment)
    job = c.create_recurring_run(experiment_id=exp.experiment_id, job_name=name, cron_expression=cron,
                                 pipeline_package_path=str(package), params=params,
                                 max_concurrency=max_concurrency, no_catchup=not catch_up,
                                 service_account=service_account, enabled=True)
    return job.recurring_run_id

