"""What each pipeline step does, as plain functions over local paths (issue 7).

The KFP components in ``components/`` are thin: KFP hands them artifact paths and parameters,
they call one function here. The same code therefore runs under ``kfp.local`` (``make demo``),
in a pod on a cluster, and in tests without KFP. Nothing here imports ``kfp``.

MLflow: the pipeline run is the parent run (``open_pipeline_run``), found again by the tag
``unitoken.pipeline_job``; every step is a nested run (``mlflow.parentRunId``). Training stages
create their own nested run through ``MLflowTracker`` (which reads ``MLFLOW_PARENT_RUN_ID``).
A ``parent_run_id`` of None runs a step with no MLflow at all: the small study
(``studies/small_study/``) runs these steps on a GPU machine that has no MLflow.
"""

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

from unitoken.files import scoped_env
from unitoken.pipeline.cache import (CacheCorrupt, StepCache, cache_key, dataset_digest, model_digest,
                                     write_dataset_digest)
from unitoken.train.tracking import log_batched

log = logging.getLogger(__name__)

PIPELINE_TAG = "unitoken.pipeline_job"            # the KFP run's id: unique, the key
PIPELINE_NAME_TAG = "unitoken.pipeline_job_name"  # its display name: for people, not unique


class StepError(RuntimeError):
    """A pipeline step cannot do its work; the message says why and what to change."""


# --------------------------------------------------------------------------- MLflow runs


def _client():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from unitoken.train.tracking import default_tracking_uri

    return MlflowClient(tracking_uri=default_tracking_uri())


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
    from unitoken.train.tracking import ensure_experiment

    client = _client()
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
    from unitoken.train.tracking import ensure_experiment

    client = _client()
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
    from unitoken.train.tracking import ensure_experiment

    client = _client()
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
        from unitoken.train.tracking import ArtifactLogError, with_artifact_retries

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
    from unitoken.train.tracking import experiment_for

    if parent_run_id is None:
        yield NullStepRun()
        return
    client = _client()
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


@contextlib.contextmanager
def parent_env(parent_run_id: str) -> Iterator[None]:
    """Code that tracks by itself (training, registration) nests under the pipeline run."""
    with scoped_env("MLFLOW_PARENT_RUN_ID", parent_run_id):
        yield


# --------------------------------------------------------------------------- data


def validate(data_uri: str, out: Path, parent_run_id: str, max_reject_fraction: float = 0.01) -> dict:
    """Validate the data at ``data_uri`` (a local directory/manifest, or ``s3://bucket/prefix``)
    into ``out`` (clean.jsonl, rejected.jsonl, report.json/html, dataset.json -> the data root).

    Data on S3 stays there: it is fetched into a temporary directory to be checked and digested,
    and ``dataset.json`` records the prefix, so the Dataset artifact holds the manifest and
    reports, never the corpus; later steps fetch what they need (a pre-tokenisation worker only
    the images of its shards). A local path (a shared volume on a cluster) is referenced where it is.

    Raises:
        StepError: no manifest, or more rows rejected than ``max_reject_fraction`` allows.
    """
    import tempfile

    from unitoken.data.remote import materialise, split_s3
    from unitoken.data.validate import validate_manifest

    if not 0 <= max_reject_fraction <= 1:
        raise StepError(f"max_reject_fraction={max_reject_fraction}: use a fraction in [0, 1]")
    remote = data_uri.startswith("s3://")
    recorded = "s3://" + "/".join(x for x in split_s3(data_uri) if x) if remote else None
    with tempfile.TemporaryDirectory(prefix="unitoken-validate-") as scratch:
        local = materialise(data_uri, Path(scratch) / "data")
        manifest = local / "manifest.jsonl" if local.is_dir() else local
        if not manifest.is_file():
            raise StepError(f"data_uri {data_uri}: no manifest.jsonl there; point it at a data directory or a manifest")
        with step_run("validate", parent_run_id, {"data_uri": data_uri, "max_reject_fraction": max_reject_fraction}) as run:
            res = validate_manifest(manifest, out, recorded_root=recorded)
            run.metrics({"input_rows": res.input_rows, "clean_rows": res.clean_rows,
                         "rejected_rows": res.rejected_rows, "reject_fraction": res.reject_fraction})
            # clean rows + every image: the caches' data identity (images read where they were checked)
            data_sha = write_dataset_digest(Path(out), manifest.resolve().parent if remote else None)
            run.tags({"unitoken.validation_report_sha256": res.report_sha256, "unitoken.data_sha256": data_sha})
            for name in ("report.json", "report.html", "rejected.jsonl"):
                run.artifact(Path(out) / name, "validation")
            if res.reject_fraction > max_reject_fraction:
                raise StepError(f"{res.rejected_rows} of {res.input_rows} rows rejected ({res.reject_fraction:.2%} > "
                                f"max_reject_fraction {max_reject_fraction:.2%}); the reasons are in rejected.jsonl")
    return {"input_rows": res.input_rows, "clean_rows": res.clean_rows, "rejected_rows": res.rejected_rows,
            "report_sha256": res.report_sha256, "data_sha256": data_sha}


def data_root(dataset: Path) -> Path:
    """A local directory with the validated manifest's images (and the synthetic scenes): the
    recorded data root, or for data on S3 the whole prefix fetched once into a directory named
    by the data digest (evaluation and the gate read the source manifest and its images)."""
    import tempfile

    from unitoken.data.manifest import data_location
    from unitoken.data.remote import materialise

    location = data_location(Path(dataset) / "clean.jsonl")
    if not location.startswith("s3://"):
        return Path(location)
    return materialise(location, Path(tempfile.gettempdir()) / "unitoken-data" / dataset_digest(dataset)[:32])


def tokenizer(dataset: Path, recipe: str, overrides: list[str], released: str, steps: int, out: Path,
              parent_run_id: str, batch_size: int = 32, lr: float = 1e-3, cache: StepCache | None = None) -> dict:
    """The recipe's VQ tokenizer: a released VQ-GAN directory (``released``) copied as is, or
    one trained on the validated images when the recipe names none (cached: ``cached_step``)."""
    from unitoken.config import config_hash
    from unitoken.recipes import get_recipe

    out = Path(out)
    if released:
        from unitoken.data.remote import materialise

        src = materialise(released, out)
        if not (src / "vqgan.ckpt").is_file() or not (src / "vqgan.yaml").is_file():
            raise StepError(f"tokenizer_uri {released}: expected a VQ-GAN directory (vqgan.yaml + vqgan.ckpt)")
        if src != out:
            shutil.copytree(src, out, dirs_exist_ok=True)
        return {"source": released}
    from unitoken.data.tokenizer_train import train_tokenizer

    cfg = get_recipe(recipe, overrides).model.vq
    def inputs():
        return {"data_sha256": dataset_digest(dataset), "vq_config_sha256": config_hash(cfg), "steps": steps,
                "batch_size": batch_size, "lr": lr, "device": _device()}

    def compute(tags):
        with step_run("tokenizer", parent_run_id, {"recipe": recipe, "steps": steps, "batch_size": batch_size,
                                                   "lr": lr}) as run:
            run.tags(tags)
            report = train_tokenizer(Path(dataset) / "clean.jsonl", out, cfg, steps=steps, batch_size=batch_size,
                                     lr=lr)
            run.metrics({k: report[k] for k in ("psnr", "codebook_usage") if isinstance(report.get(k), (int, float))})
            run.artifact(out / "report.json", "tokenizer")
            run.artifact(out / "reconstructions.png", "tokenizer")
        return {k: report.get(k) for k in ("psnr", "codebook_usage", "train_seconds")}, run.run_id

    return cached_step("tokenizer", "tokenizer", inputs, out, cache, parent_run_id, compute)


def init_model(recipe: str, overrides: list[str], tokenizer_dir: Path | None, base_model: str, out: Path,
               seed: int = 0) -> dict:
    """The model stage 1 (or the first stage run) starts from: a fresh one from the recipe with
    the tokenizer, or a registered model (``models:/NAME@ALIAS``, stage-scoped retraining)."""
    out = Path(out)
    if base_model:
        from unitoken.registry import load_uri

        shutil.copytree(load_uri(base_model), out, dirs_exist_ok=True)
        return {"source": base_model}
    from unitoken.model.io import init_model as build, save_model
    from unitoken.recipes import get_recipe

    cfg = get_recipe(recipe, overrides).model
    model, tok = build(cfg, [tokenizer_dir] if tokenizer_dir else [], seed=seed)
    save_model(model, tok, out, recipe=recipe)
    return {"source": f"recipe {recipe}", "parameters": model.num_parameters()["total"]}


def pretokenize_worker(dataset: Path, model_dir: Path, out: Path, parent_run_id: str | None, worker: int = 0,
                       num_workers: int = 1, shard_size: int = 1024, work: Path | None = None,
                       cache: StepCache | None = None) -> dict:
    """One pre-tokenisation worker: the shards of range ``worker`` of ``num_workers``
    (``unitoken.data.pretokenize.shard_ranges``) into ``out``; images on S3 are fetched for these
    shards only. With ``work`` (the checkpoint volume on a cluster) shards are built there, so a
    retried pod resumes at the shard that was cut off, then copied into ``out``.

    Cached per shard range (``cached_step``): the key is the data, the model's VQ-GAN (the model
    digest), the device type, the shard size and the range, so a re-run with the same layout
    reuses every worker's output; a new worker count gives new ranges and recomputes.
    """
    from unitoken.data.pretokenize import count_records, num_shards, pretokenize, shard_ranges
    from unitoken.model.io import load_model

    manifest = Path(dataset) / "clean.jsonl"
    first, last = shard_ranges(num_shards(count_records(manifest), shard_size), num_workers)[worker]
    name = f"pretokenize-w{worker}"
    params = {"worker": worker, "num_workers": num_workers, "shard_size": shard_size, "first_shard": first,
              "last_shard": last}

    def inputs():
        return {"data_sha256": dataset_digest(dataset), "model_sha256": model_digest(model_dir), "device": _device(),
                "shard_size": shard_size, "shards": [first, last]}

    def compute(tags):
        model, _ = load_model(model_dir)
        with step_run(name, parent_run_id, params) as run:
            run.tags(tags)
            target = Path(work) if work else Path(out)
            summary = pretokenize(manifest, model, target, shard_size=shard_size, worker=worker,
                                  num_workers=num_workers)
            if work:
                _publish_shards(target, Path(out))
            run.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        return summary, run.run_id

    return cached_step("pretokenize", name, inputs, out, cache, parent_run_id, compute)


def pretokenize(dataset: Path, model_dir: Path, out: Path, parent_run_id: str | None,
                cache: StepCache | None = None, shard_size: int = 1024) -> dict:
    """Pre-tokenisation on this pod alone: one worker over every shard, index.json included (the
    small study's step; the pipeline fans out instead, ``pretokenize_worker`` + ``pretokenize_merge``)."""
    return pretokenize_worker(dataset, model_dir, out, parent_run_id, shard_size=shard_size, cache=cache)


def _publish_shards(work: Path, out: Path) -> None:
    """A finished worker's output from its work directory into its output artifact (the same
    files as building there); the work directory goes (on a cluster it is the shared volume, and
    the output is what counts now)."""
    shutil.copytree(work, out, dirs_exist_ok=True)
    shutil.rmtree(work)


def pretokenize_merge(parts: list[Path], out: Path, parent_run_id: str | None,
                      worker_cache: list[str] | None = None) -> dict:
    """The workers' shards together in ``out`` with plan.json and index.json: the bytes one
    worker writes over the whole manifest. Its MLflow run ``pretokenize`` carries the totals and
    ``unitoken.cache`` = hit (every worker reused its output) | miss | partial | off."""
    from unitoken.data.pretokenize import merge

    states = sorted(set(worker_cache or []))
    cache_state = states[0] if len(states) == 1 else ("partial" if states else "off")
    with step_run("pretokenize", parent_run_id, {"workers": len(parts)}) as run:
        run.tags({"unitoken.cache": cache_state, "unitoken.cache_workers": ",".join(worker_cache or [])})
        summary = merge([Path(p) for p in parts], Path(out))
        run.metrics(summary)
        run.artifact(Path(out) / "index.json", "pretokenized")
    return {**summary, "cache": cache_state}


# --------------------------------------------------------------------------- training


def train_stage(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, out: Path, work: Path,
                parent_run_id: str, max_steps: int = 0, cache: StepCache | None = None, gpus: int = 1) -> dict:
    """One stage on this pod's devices; checkpoints go to ``work`` (the checkpoint volume on a
    cluster) so a retried step resumes instead of restarting, and the verified hand-off is
    copied into the output artifact ``out`` (cached: ``cached_step``). With ``gpus`` > 1 the
    stage runs under torchrun, one process per GPU (``train_processes``)."""
    from unitoken.recipes import get_recipe
    from unitoken.train.train import main as train_main

    def compute(tags):
        if gpus > 1:
            info = train_processes(stage, recipe, overrides, tokens, init, out, work, parent_run_id, max_steps, gpus)
            _tag_run(info["mlflow_run_id"], tags)
            return info, info["mlflow_run_id"]
        with parent_env(parent_run_id):
            result = train_main(stage, get_recipe(recipe, overrides), Path(tokens), Path(work), Path(init),
                                resume="auto", max_steps=max_steps or None, track=parent_run_id is not None,
                                show_progress=False)
        _tag_run(result.mlflow_run_id, tags)
        return publish_handoff(Path(work) / "handoff", Path(out)) | {
            "steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 1),
            "mlflow_run_id": result.mlflow_run_id}, result.mlflow_run_id

    return cached_step(f"stage{stage}", f"stage{stage}", lambda: _stage_inputs(stage, recipe, overrides, tokens, init, max_steps),
                       out, cache, parent_run_id, compute)


def train_command(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, work: Path,
                  max_steps: int, launcher: list[str]) -> list[str]:
    """``unitoken train`` under ``launcher`` (torchrun and its flags): the one command line of a
    stage on several processes, whether on this pod (``--standalone``) or on TrainJob nodes."""
    command = [*launcher, "-m", "unitoken.cli", "train", "--stage", str(stage), "--recipe", recipe,
               "--data", str(tokens), "--init", str(init), "--out", str(work), "--resume", "auto"]
    for o in overrides:
        command += ["--set", o]
    if max_steps:
        command += ["--max-steps", str(max_steps)]
    return command


def train_processes(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, out: Path, work: Path,
                    parent_run_id: str, max_steps: int, nproc: int) -> dict:
    """One stage on this node's ``nproc`` GPUs: ``torchrun --standalone`` starts one rank per GPU
    (DeepSpeed's data parallelism; a single in-process rank would leave all but one GPU idle).

    Raises:
        StepError: torchrun failed; the message carries the tail of its output.
    """
    import subprocess
    import sys
    import time

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = train_command(stage, recipe, overrides, tokens, init, work, max_steps, launcher)
    if parent_run_id is None:
        command.append("--no-track")
    env = dict(os.environ, MLFLOW_PARENT_RUN_ID=parent_run_id) if parent_run_id else dict(os.environ)
    Path(work).mkdir(parents=True, exist_ok=True)
    log_path = Path(work) / f"torchrun-{int(time.time())}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        log.info("stage %s on %s processes: %s (log %s)", stage, nproc, " ".join(command), log_path)
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except BaseException:  # cancelled (SIGTERM from KFP): the ranks go with the step
            proc.terminate()
            proc.wait(timeout=60)
            raise
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise StepError(f"stage {stage}: torchrun with {nproc} processes exited {code}; last lines of {log_path}:\n{tail}")
    from unitoken.train.train import read_losses

    losses = read_losses(Path(work) / "metrics.jsonl")  # the loop's own reader of its log
    info = publish_handoff(Path(work) / "handoff", Path(out))
    run_id = json.loads((Path(out) / "handoff.json").read_text()).get("mlflow_run_id")
    return info | {"steps": len(losses), "first_loss": losses[0] if losses else None,
                   "final_loss": losses[-1] if losses else None, "processes": nproc,
                   "seconds": round(time.perf_counter() - start, 1), "mlflow_run_id": run_id}


def tokens_digest(tokens: Path) -> str:
    """Identity of pre-tokenised data: its index.json names every shard with its digest."""
    from unitoken.files import sha256_file

    return sha256_file(Path(tokens) / "index.json")


def _stage_inputs(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, max_steps: int) -> dict:
    from unitoken.config import config_hash
    from unitoken.recipes import get_recipe

    return {"stage": stage, "recipe": recipe, "recipe_sha256": config_hash(get_recipe(recipe, overrides)),
            "max_steps": max_steps, "tokens_sha256": tokens_digest(tokens),
            "init_sha256": model_digest(init)}


def publish_handoff(handoff: Path, out: Path) -> dict:
    """Copy a verified hand-off into an output artifact, and verify the copy (``out`` the
    hand-off itself: verified where it is, as the small study publishes its runs)."""
    from unitoken.train.checkpoint import handoff_digest, verify_handoff

    verify_handoff(handoff)
    if Path(out).resolve() != Path(handoff).resolve():
        shutil.copytree(handoff, out, dirs_exist_ok=True)
    doc = verify_handoff(out)
    return {"stage": doc["stage"], "handoff_sha256": handoff_digest(out)}


# --------------------------------------------------------------------------- evaluation, gate, registry


def evaluate(model_dir: Path, dataset: Path, suites: str, limit: int, out: Path, parent_run_id: str | None,
             label: str, cfg_scale: float | None = None, top_k: int | None = None, seed: int = 0,
             cache: StepCache | None = None, tokens: Path | None = None, heldout_limit: int = 500,
             temperature: float = 1.0, batch_size: int = 64) -> dict:
    """Run the evaluation suites, and with ``tokens`` (the pre-tokenised data) the held-out loss
    per task on its test split; metrics go to a nested run named ``eval-<label>``, the losses as
    ``heldout_loss/<task>`` (cached: ``cached_step``; a hit logs the cached metrics on its run, so
    scores read the same). ``cfg_scale`` / ``top_k`` left at None take the model's recipe's;
    ``temperature`` is the image sampling temperature, ``batch_size`` items per forward pass."""
    from unitoken.eval.runner import evaluate as run_eval
    from unitoken.recipes import sampling_defaults

    sampling, _ = sampling_defaults(model_dir)
    cfg_scale = sampling.cfg if cfg_scale is None else cfg_scale
    top_k = sampling.top_k if top_k is None else top_k
    device = _device()
    names = [s.strip() for s in suites.split(",") if s.strip()]
    def inputs():
        held = {"tokens_sha256": tokens_digest(tokens), "heldout_limit": heldout_limit} if tokens else {}
        return {"model_sha256": model_digest(model_dir), "data_sha256": dataset_digest(dataset), "suites": names,
                "limit": limit, "cfg_scale": cfg_scale, "top_k": top_k, "temperature": temperature,
                "batch_size": batch_size, "seed": seed, "device": device, **held}

    def compute(tags):
        with step_run(f"eval-{label}", parent_run_id, {"suites": suites, "limit": limit, "model": label}) as run:
            run.tags(tags)
            report = run_eval(model_dir, names, out, data=data_root(dataset), limit=limit or None,
                              cfg_scale=cfg_scale, top_k=top_k, temperature=temperature, seed=seed, device=device,
                              batch_size=batch_size, heldout_tokens=tokens, heldout_limit=heldout_limit)
            run.metrics(eval_metrics(report))
            for name in ("report.json", "report.html"):
                run.artifact(Path(out) / name, f"eval-{label}")
        return {k: v for k, v in eval_metrics(report).items() if k.endswith("/overall") or
                k.startswith("heldout_loss/")}, run.run_id

    def hit_metrics(out_dir: Path) -> dict:
        return eval_metrics(json.loads((out_dir / "report.json").read_text()))

    return cached_step("evaluate", f"eval-{label}", inputs, out, cache, parent_run_id, compute, hit_metrics)


def eval_metrics(report: dict) -> dict:
    """An evaluation's scores, each suite's chance level and 95 % interval (``<suite>/chance``,
    ``<suite>/ci95_low``, ``<suite>/ci95_high``), plus its held-out losses (``heldout_loss/<task>``
    and per source ``heldout_loss/<task>/<source>``; lower is better). Only the scores are in
    ``report["metrics"]``, which the gate reads. A task's mean loss mixes its sources:
    understanding's is mostly captions and dialogues, whose answers are long and free, over
    short VQA answers (the small study's run 6: 6-14 nats per token against 0.13-0.18), so each
    source is logged on its own too."""
    extra = {}
    for suite, v in (report.get("suites") or {}).items():
        extra[f"{suite}/chance"] = v["chance"]
        if v.get("ci95"):
            extra[f"{suite}/ci95_low"], extra[f"{suite}/ci95_high"] = v["ci95"]
    for task, v in (report.get("heldout") or {}).items():
        if isinstance(v, dict):
            extra[f"heldout_loss/{task}"] = v["mean"]
            extra |= {f"heldout_loss/{task}/{src}": x for src, x in v.get("categories", {}).items()}
    return report["metrics"] | extra


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device() -> str:
    return "cuda" if _cuda() else "cpu"


# --------------------------------------------------------------------------- step cache


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
    key = cache_key(step, inputs) if cache.active else ""
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
            from unitoken.train.checkpoint import handoff_digest

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


def _tag_run(run_id: str | None, tags: dict[str, str]) -> None:
    """Tags for a run created by the training tracker; a warning (not a failed stage) if MLflow is down."""
    if not run_id:
        return
    try:
        log_batched(_client(), run_id, tags=tags)
    except Exception as err:  # noqa: BLE001 - the stage's output is complete and cached; say what is missing
        log.warning("could not tag MLflow run %s with %s (%s)", run_id, tags, err)


def gate(candidate_eval: Path, dataset: Path, model_name: str, policy_yaml: str, out: Path, parent_run_id: str,
         recipe: str = "", overrides: list[str] | None = None) -> dict:
    """Gate the candidate against the registered champion (evaluated now, on the same items and
    settings, from ``dataset``: paths recorded by another pod do not exist in this one), or
    against the policy's floors alone when ``model_name`` has no champion. The policy is
    ``policy_yaml`` when given, else the default with ``recipe``'s floors (``Recipe.gate``)."""
    from unitoken.eval.gate import GatePolicy, decide, write_decision
    from unitoken.eval.runner import evaluate_like

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if policy_yaml.strip():
        policy_file = out / "policy.yaml"
        policy_file.write_text(policy_yaml)
        policy, source = GatePolicy.from_yaml(policy_file), "the pipeline's gate_policy parameter"
    elif recipe:
        from unitoken.recipes import get_recipe

        policy, source = GatePolicy.from_recipe(get_recipe(recipe, overrides).gate), f"recipe {recipe}"
    else:
        policy, source = GatePolicy(), "the default policy"
    champion_version, champion_eval = _champion(model_name), None
    if champion_version is not None:
        from unitoken.registry import load_uri

        champion_eval = out / "champion-eval"
        evaluate_like(candidate_eval, load_uri(f"models:/{model_name}/{champion_version}"), champion_eval,
                      data=data_root(dataset), device=_device())
    with step_run("gate", parent_run_id, {"champion_version": champion_version or "none"}) as run:
        decision = decide(candidate_eval, champion_eval, policy)
        decision["champion_version"] = champion_version or "none"
        decision["policy_source"] = source
        write_decision(decision, out / "decision.json")
        run.metrics({"passed": float(decision["passed"])})
        run.tags({"unitoken.gate_checks": gate_summary(decision)[:5000]})
        run.artifact(out / "decision.json", "gate")
    return {"passed": bool(decision["passed"]), "champion_version": champion_version or "none",
            "reasons": decision.get("reasons", [])}


def gate_summary(decision: dict) -> str:
    """The decision in a few lines: its policy, then PASS/FAIL and the reason of every check."""
    lines = [f"policy: {decision.get('policy_source', 'unknown')}"]
    lines += [f"{'PASS' if c['passed'] else 'FAIL'} {c['reason']}" for c in decision["checks"]]
    return "\n".join(lines)


def _champion(model_name: str) -> str | None:
    client = _client()
    try:
        aliases = client.get_registered_model(model_name).aliases
    except Exception as err:  # noqa: BLE001 - a name never registered has no champion
        if "RESOURCE_DOES_NOT_EXIST" in str(err) or "not found" in str(err).lower():
            return None
        raise
    return str(aliases["champion"]) if "champion" in aliases else None


def register(model_dir: Path, eval_dir: Path, decision: Path, model_name: str, parent_run_id: str,
             promote: bool) -> dict:
    """Register the gated model (alias challenger); with ``promote``, move champion to it by
    compare-and-swap against the champion the gate compared with (a concurrent promotion wins).

    A hand-off the model already has as a version (a re-run with unchanged inputs) registers
    nothing and moves no alias: the step's run ``register-NAME`` records which version it is
    (tag ``unitoken.duplicate_of``) and the result names that version (``alias`` None)."""
    from unitoken import registry

    with parent_env(parent_run_id):
        info = registry.register(Path(model_dir), Path(eval_dir), Path(decision), model_name)
        log.info(registry.registration_note(info))
        if info["duplicate"]:
            with step_run(f"register-{model_name}", parent_run_id, {"handoff_sha256": info["handoff_sha256"]}) as run:
                run.tags({"unitoken.duplicate_of": str(info["version"]),
                          "mlflow.note.content": registry.registration_note(info)})
            info["alias"] = None
        elif promote:
            expect_champion = json.loads(Path(decision).read_text()).get("champion_version", "none")
            registry.promote(model_name, info["version"], "champion", expect_current=expect_champion,
                             reason=f"pipeline {parent_run_id}: gate passed")
            info["alias"] = "champion"
        else:
            info["alias"] = "challenger"
    summarise_pipeline_run(parent_run_id, info, Path(model_dir), Path(eval_dir), Path(decision))
    return info


def summarise_pipeline_run(parent_run_id: str, info: dict, model_dir: Path, eval_dir: Path, decision: Path) -> None:
    """What the pipeline run's page in the MLflow UI says first: a Markdown description linking the
    registered version, its logged model, each stage's run and the gate's verdict, and the
    evaluation's headline scores as the run's metrics."""
    from unitoken.train.checkpoint import ancestry

    client = _client()
    exp = client.get_run(parent_run_id).info.experiment_id
    gate = json.loads(decision.read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    scores = {k: float(v) for k, v in report.get("metrics", {}).items() if k.endswith("/overall")}
    version, name = info["version"], info["name"]
    facts = [f"**Registered**: [{name} v{version}](#/models/{name}/versions/{version})"
             + (f" (alias {info['alias']})" if info.get("alias") else " (already registered: nothing new)"),
             f"**Logged model**: [{info.get('model_id')}](#/experiments/{exp}/models/{info.get('model_id')})"
             if info.get("model_id") else "**Logged model**: -",
             "**Stages**: " + ", ".join(
                 f"[stage {a['stage']}](#/experiments/{exp}/runs/{a['mlflow_run_id']})" if a.get("mlflow_run_id")
                 else f"stage {a['stage']}" for a in ancestry(model_dir) if a.get("stage")),
             f"**Gate**: {'passed' if gate.get('passed') else 'failed'}"
             + (f" ({'; '.join(gate.get('reasons', []))})" if gate.get("reasons") else "")]
    table = ["| score | value |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in sorted(scores.items()))]
    log_batched(client, parent_run_id, metrics=scores,
                tags={"mlflow.note.content": "\n\n".join(facts) + "\n\n" + "\n".join(table)})


# --------------------------------------------------------------------------- multi-node stages


def ratio_overrides(stage: int, mixture_ratio: str) -> list[str]:
    """``understanding:generation`` (e.g. "2:1") as overrides of the stage's data ratio."""
    if not mixture_ratio:
        return []
    try:
        und, gen = (float(x) for x in mixture_ratio.split(":"))
    except ValueError:
        raise StepError(f"mixture_ratio={mixture_ratio!r}: expected UNDERSTANDING:GENERATION, e.g. 1:1 or 2:1") from None
    if und < 0 or gen < 0 or und + gen == 0:
        raise StepError(f"mixture_ratio={mixture_ratio!r}: both parts >= 0 and not both 0")
    return [f"train.stage{stage}.understanding_ratio={und}", f"train.stage{stage}.generation_ratio={gen}"]


def dns_name(*parts: str, limit: int = 63) -> str:
    """A Kubernetes object name (RFC 1035 label) from free text, unique by a short hash suffix."""
    import hashlib
    import re

    text = "-".join(parts)
    base = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    base = re.sub(r"^[^a-z]+", "", base) or "unitoken"
    suffix = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{base[:limit - 7].rstrip('-')}-{suffix}"


def train_stage_on_trainer(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, out: Path,
                           work: Path, parent_run_id: str, job: str, cluster_doc: dict, max_steps: int = 0,
                           launcher=None, cache: StepCache | None = None) -> dict:
    """One stage on several nodes: inputs are staged on the shared checkpoint volume (``work``),
    a Kubeflow Trainer TrainJob runs ``unitoken train`` under torchrun on every node, and the
    hand-off it leaves on the volume is verified and copied into the output artifact (cached:
    ``cached_step``)."""

    def compute(tags):
        info = _train_on_trainer(stage, recipe, overrides, tokens, init, out, work, parent_run_id, job, cluster_doc,
                                 max_steps, launcher)
        run_id = json.loads((Path(out) / "handoff.json").read_text()).get("mlflow_run_id")
        _tag_run(run_id, tags)
        return info, run_id

    return cached_step(f"stage{stage}", f"stage{stage}", lambda: _stage_inputs(stage, recipe, overrides, tokens, init, max_steps),
                       out, cache, parent_run_id, compute)


def _train_on_trainer(stage, recipe, overrides, tokens, init, out, work, parent_run_id, job, cluster_doc, max_steps,
                      launcher) -> dict:
    from unitoken.pipeline.cluster import cluster_from_dict
    from unitoken.pipeline.trainjob import JOB_LABEL, TrainJobLauncher, trainjob_body

    cluster = cluster_from_dict(cluster_doc)
    step = f"train-stage{stage}"
    work = Path(work)
    staged = {"tokens": stage_input(Path(tokens), work / "inputs" / "tokens", tokens_digest(tokens)),
              "init": stage_input(Path(init), work / "inputs" / "init", model_digest(init))}
    command = train_command(stage, recipe, overrides, staged["tokens"], staged["init"], work, max_steps, ["torchrun"])
    body = trainjob_body(trainjob_name(job, stage), step, command, cluster, labels={JOB_LABEL: run_label(job)})
    if parent_run_id:
        body["spec"]["trainer"]["env"].append({"name": "MLFLOW_PARENT_RUN_ID", "value": parent_run_id})
    launcher = launcher or TrainJobLauncher(cluster.namespace)
    timeout = cluster.resources(step).timeout_s or 14 * 24 * 3600
    name, reason = launcher.run(body, timeout)
    return publish_handoff(work / "handoff", Path(out)) | {"trainjob": name, "reason": reason}


def trainjob_name(job: str, stage: int) -> str:
    """The base name of a run's stage TrainJob (attempts append ``-a<N>``): short, since the
    Trainer derives JobSet, Job and pod names from it, and unique per run through the run's id."""
    import hashlib

    return f"unitoken-s{stage}-{hashlib.sha256(job.encode()).hexdigest()[:10]}"


def run_label(job: str) -> str:
    """The run's id as a label value (at most 63 characters of [A-Za-z0-9._-])."""
    return dns_name(job) if len(job) > 63 or not job.replace("-", "").isalnum() else job


def stage_input(src: Path, dest: Path, digest: str) -> Path:
    """Copy ``src`` to ``dest`` on the shared volume once; a later attempt reuses the copy only
    when its recorded digest is ``digest`` (an incomplete or different copy is replaced)."""
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    stamp.unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    stamp.write_text(digest + "\n")
    return dest
