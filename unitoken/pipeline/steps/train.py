"""A training stage as a pipeline step: ``train_stage`` runs it where ``RunsOn`` says (this process,
torchrun on this pod's GPUs, or a Kubeflow Trainer TrainJob over several nodes), checkpoints to
the work volume, and copies the verified hand-off into the output artifact (cached)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from unitoken.config import config_hash
from unitoken.files import sha256_file
from unitoken.model.handoff import handoff_digest, verify_handoff
from unitoken.pipeline.cache import StepCache, model_digest
from unitoken.pipeline.cluster import cluster_from_dict
from unitoken.pipeline.steps.runs import StepError, cached_step, tag_run
from unitoken.pipeline.trainjob import JOB_LABEL, TrainJobLauncher, trainjob_body
from unitoken.recipes import get_recipe
from unitoken.tracking.store import PARENT_RUN_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunsOn:
    """Where a stage runs: ``here`` (this process), ``torchrun`` (one process per GPU of this pod)
    or ``trainjob`` (a Kubeflow Trainer TrainJob over ``cluster_doc``'s nodes, named after the
    run's id ``job``; ``launcher`` replaces the Kubernetes client in tests)."""

    kind: str = "here"
    gpus: int = 1
    job: str = ""
    cluster_doc: dict = field(default_factory=dict)
    launcher: object = None

    @classmethod
    def pod(cls, num_nodes: int, gpus: int, job: str = "", cluster_doc: dict | None = None) -> RunsOn:
        """What a pipeline task asks for: several nodes -> a TrainJob, several GPUs -> torchrun."""
        if num_nodes > 1:
            return cls("trainjob", gpus, job, cluster_doc or {})
        return cls("torchrun", gpus) if gpus > 1 else cls()


def train_stage(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, out: Path, work: Path,
                parent_run_id: str | None, runs_on: RunsOn = RunsOn(), max_steps: int = 0,
                cache: StepCache | None = None) -> dict:
    """One stage where ``runs_on`` says; checkpoints go to ``work`` (the checkpoint volume on a
    cluster) so a retried step resumes instead of restarting, and the verified hand-off is copied
    into the output artifact ``out`` (cached: ``cached_step``)."""
    run = {"here": _train_here, "torchrun": train_processes, "trainjob": _train_on_trainer}[runs_on.kind]

    def compute(tags):
        info = run(stage, recipe, overrides, tokens, init, out, work, parent_run_id, max_steps, runs_on)
        tag_run(info["mlflow_run_id"], tags)
        return info, info["mlflow_run_id"]

    return cached_step(f"stage{stage}", f"stage{stage}", lambda: _stage_inputs(stage, recipe, overrides, tokens, init, max_steps),
                       out, cache, parent_run_id, compute)


def _train_here(stage, recipe, overrides, tokens, init, out, work, parent_run_id, max_steps, runs_on) -> dict:
    # torch and DeepSpeed are imported only where a stage trains in this process
    from unitoken.train.train import main as train_main

    result = train_main(stage, get_recipe(recipe, overrides), Path(tokens), Path(work), Path(init),
                        resume="auto", max_steps=max_steps or None, track=parent_run_id is not None,
                        show_progress=False, parent_run_id=parent_run_id or None)
    return publish_handoff(Path(work) / "handoff", Path(out)) | {
        "steps": result.steps, "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None, "seconds": round(result.seconds, 1),
        "mlflow_run_id": result.mlflow_run_id}


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
                    parent_run_id: str | None, max_steps: int, runs_on: RunsOn) -> dict:
    """One stage on this node's ``nproc`` GPUs: ``torchrun --standalone`` starts one rank per GPU
    (DeepSpeed's data parallelism; a single in-process rank would leave all but one GPU idle).

    Raises:
        StepError: torchrun failed; the message carries the tail of its output.
    """
    nproc = runs_on.gpus
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = train_command(stage, recipe, overrides, tokens, init, work, max_steps, launcher)
    if parent_run_id is None:
        command.append("--no-track")
    env = dict(os.environ, **{PARENT_RUN_ENV: parent_run_id}) if parent_run_id else dict(os.environ)
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
    return publish_handoff(Path(work) / "handoff", Path(out)) | {
        "steps": len(losses), "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "processes": nproc,
        "seconds": round(time.perf_counter() - start, 1)}


def tokens_digest(tokens: Path) -> str:
    """Identity of pre-tokenised data: its index.json names every shard with its digest."""
    return sha256_file(Path(tokens) / "index.json")


def _stage_inputs(stage: int, recipe: str, overrides: list[str], tokens: Path, init: Path, max_steps: int) -> dict:
    return {"stage": stage, "recipe": recipe, "recipe_sha256": config_hash(get_recipe(recipe, overrides)),
            "max_steps": max_steps, "tokens_sha256": tokens_digest(tokens),
            "init_sha256": model_digest(init)}


def publish_handoff(handoff: Path, out: Path) -> dict:
    """Copy a verified hand-off into an output artifact, and verify the copy (``out`` the
    hand-off itself: verified where it is, as the small study publishes its runs); its stage,
    digest and the MLflow run that trained it."""
    verify_handoff(handoff)
    if Path(out).resolve() != Path(handoff).resolve():
        shutil.copytree(handoff, out, dirs_exist_ok=True)
    doc = verify_handoff(out)
    return {"stage": doc["stage"], "handoff_sha256": handoff_digest(out), "mlflow_run_id": doc.get("mlflow_run_id")}


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
    text = "-".join(parts)
    base = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    base = re.sub(r"^[^a-z]+", "", base) or "unitoken"
    suffix = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{base[:limit - 7].rstrip('-')}-{suffix}"


def _train_on_trainer(stage, recipe, overrides, tokens, init, out, work, parent_run_id, max_steps, runs_on) -> dict:
    """Inputs are staged on the shared checkpoint volume (``work``), a Kubeflow Trainer TrainJob
    runs ``unitoken train`` under torchrun on every node, and the hand-off it leaves on the volume
    is verified and copied into the output artifact."""
    job = runs_on.job
    cluster = cluster_from_dict(runs_on.cluster_doc)
    step = f"train-stage{stage}"
    work = Path(work)
    staged = {"tokens": stage_input(Path(tokens), work / "inputs" / "tokens", tokens_digest(tokens)),
              "init": stage_input(Path(init), work / "inputs" / "init", model_digest(init))}
    command = train_command(stage, recipe, overrides, staged["tokens"], staged["init"], work, max_steps, ["torchrun"])
    body = trainjob_body(trainjob_name(job, stage), step, command, cluster, labels={JOB_LABEL: run_label(job)})
    if parent_run_id:
        body["spec"]["trainer"]["env"].append({"name": PARENT_RUN_ENV, "value": parent_run_id})
    launcher = runs_on.launcher or TrainJobLauncher(cluster.namespace)
    timeout = cluster.resources(step).timeout_s or 14 * 24 * 3600
    name, reason = launcher.run(body, timeout)
    return publish_handoff(work / "handoff", Path(out)) | {"trainjob": name, "reason": reason}


def trainjob_name(job: str, stage: int) -> str:
    """The base name of a run's stage TrainJob (attempts append ``-a<N>``): short, since the
    Trainer derives JobSet, Job and pod names from it, and unique per run through the run's id."""
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
