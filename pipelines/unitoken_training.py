"""The UniToken training pipeline: data -> tokenizer -> stages -> evaluation -> gate -> registry.

    python -m pipelines.unitoken_training --out unitoken_training.yaml [--stages 3] [--cluster cluster.yaml]
    unitoken pipeline compile --out FILE   (the same, from the CLI)

Which stages run is fixed when the pipeline is compiled (``stages``): ``(1, 2, 3)`` trains from
scratch; ``(3,)`` is stage-scoped retraining that starts from ``base_model`` (a registered
model) and runs stage 3 on new data. (A runtime choice would need ``dsl.OneOf`` over the
stages' hand-off artifacts, which ``kfp.local`` cannot resolve, so the local run and the
cluster would run different graphs.) The ``cluster`` config sets per-step placement at compile
time; the local runner ignores it.
"""

import argparse
import copy
import json
from pathlib import Path

from kfp import compiler, dsl
from kfp import kubernetes as k8s

from components.close_run.component import close_run
from components.evaluate.component import evaluate
from components.gate.component import gate
from components.init_model.component import init_model
from components.open_run.component import open_run
from components.pretokenize.component import pretokenize
from components.pretokenize_merge.component import pretokenize_merge
from components.register_model.component import register_model
from components.train_stage.component import train_stage
from components.train_tokenizer.component import train_tokenizer
from components.validate_data.component import validate_data
from unitoken.pipeline.cluster import (
    TRAIN_STEPS,
    ClusterConfig,
    PretokenizeConfig,
    validate_cluster,
)

# A run is keyed by its id (unique); its display name (PIPELINE_JOB_NAME_PLACEHOLDER on a KFP
# server) is not, and keys the MLflow parent run's name only, never a directory or object name.
JOB_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER
JOB_NAME = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
# steps that reuse their outputs from the step cache under the checkpoint volume (cache_root)
CACHED_STEPS = ("train-tokenizer", "pretokenize", "evaluate")


def named(component, name: str):
    """``component`` under the task name ``name`` (KFP names a task after its component, and the
    second task of one component ``train-stage-2``): each stage's task is then ``train-stage<N>``,
    the step name the cluster config, the logs and the UI share."""
    renamed = copy.copy(component)
    renamed.component_spec = copy.deepcopy(component.component_spec)
    renamed.component_spec.name = name
    renamed.name = name
    return renamed


def place(task, step: str, cluster: ClusterConfig | None):
    """Name the task after its step and, for a cluster, attach what ``cluster`` says about it."""
    task.set_display_name(step)
    # KFP's cache keys on parameter values and artifact URIs, not contents (a changed dataset
    # behind the same data_uri would be a false hit, and a hit leaves no MLflow record): off.
    # The expensive steps cache by content themselves (unitoken/pipeline/cache.py).
    task.set_caching_options(False)
    if cluster is None:
        return task
    r = cluster.resources(step)
    task.set_container_image(cluster.image)
    # Pod Security "restricted" refuses pods that may run as root; KFP adds only a seccomp profile
    k8s.set_security_context(task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_group,
                             run_as_non_root=True)
    for key, value in sorted(cluster.env.items()):
        task.set_env_variable(key, value)
    for secret in cluster.secrets:
        k8s.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=dict(secret.env))
    if cluster.image_pull_secrets:
        k8s.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if r.timeout_s:
        k8s.set_timeout(task, int(r.timeout_s))
    if step in TRAIN_STEPS + CACHED_STEPS and cluster.checkpoint_pvc:  # checkpoints and the step cache
        k8s.mount_pvc(task, pvc_name=cluster.checkpoint_pvc, mount_path=cluster.checkpoint_mount)
    if step in TRAIN_STEPS + ("pretokenize",) and r.retries:  # both resume from the checkpoint volume
        task.set_retry(num_retries=r.retries, backoff_duration="60s", backoff_factor=2.0)
    if r.num_nodes > 1:
        # the step's pod only stages inputs and watches its TrainJob, whose nodes get the GPUs
        # and the placement: a small CPU pod, never a GPU node reserved for watching
        return _size(task, cluster.launcher)
    _size(task, r)
    if r.gpus:
        task.set_accelerator_type(r.gpu_resource).set_accelerator_limit(r.gpus)
        for key, value in sorted(r.node_selector.items()):
            k8s.add_node_selector(task, key, value)
        for t in r.tolerations:
            k8s.add_toleration(task, key=t.get("key"), operator=t.get("operator", "Equal"), value=t.get("value"),
                               effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"))
        if cluster.queue:
            k8s.add_pod_label(task, "kueue.x-k8s.io/queue-name", cluster.queue)
        if r.workload_priority_class:  # Kueue reads a WorkloadPriorityClass here, not a PriorityClass
            k8s.add_pod_label(task, "kueue.x-k8s.io/priority-class", r.workload_priority_class)
    if r.gpus > 1:  # one process per GPU: NCCL and data workers share memory through /dev/shm
        k8s.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=r.shm)
    return task


def _size(task, r):
    if r.cpu:
        task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu)
    if r.memory:
        task.set_memory_request(r.memory).set_memory_limit(r.memory)
    return task


def pretokenize_fanout(dataset, model, shard_size, parent, job, checkpoint_root: str, use_cache,
                       cluster: ClusterConfig | None, workers: int, parallelism: int):
    """Pre-tokenisation as KFP's own fan-out: ``workers`` tasks in a ``dsl.ParallelFor`` (at most
    ``parallelism`` at a time), each building one contiguous range of shards on the
    ``pretokenize`` step's resources, then ``pretokenize-merge`` writes plan, shards and index
    (the bytes of one worker over everything). Returns the merge task (output ``tokens``)."""
    with dsl.ParallelFor(items=list(range(workers)), parallelism=parallelism,
                         name="pretokenize-workers") as worker:
        # No parent_run_id input: kfp.local 2.17.3 hands the loop item in place of any upstream
        # task output passed into a loop; the worker finds the parent MLflow run by the job id
        # (steps.pipeline_run_id), which open-run (upstream of validate-data) has opened.
        part = place(pretokenize(dataset=dataset, model=model, worker=worker, num_workers=workers,
                                 shard_size=shard_size, job=job, checkpoint_root=checkpoint_root,
                                 use_cache=use_cache), "pretokenize", cluster)
    return place(pretokenize_merge(parts=dsl.Collected(part.outputs["shards"]), parent_run_id=parent),
                 "pretokenize-merge", cluster)


def build_pipeline(stages: tuple[int, ...] = (1, 2, 3), cluster: ClusterConfig | None = None,
                   checkpoint_root: str = "", pretokenize_workers: int | None = None):
    """The pipeline function for ``stages`` (consecutive, ending at 3) placed by ``cluster``;
    pre-tokenisation fans out over ``cluster.pretokenize.workers`` pods (``pretokenize_workers``
    overrides it, e.g. for a local run; default 1)."""
    if not stages or list(stages) != list(range(stages[0], 4)):
        raise ValueError(f"stages={stages}: use consecutive stages ending at 3, e.g. 1,2,3 or 2,3 or 3")
    if cluster is not None:
        validate_cluster(cluster)
        checkpoint_root = checkpoint_root or (cluster.checkpoint_mount if cluster.checkpoint_pvc else "")
    fanout = cluster.pretokenize if cluster else PretokenizeConfig()
    if pretokenize_workers is not None:
        if pretokenize_workers < 1:
            raise ValueError(f"--pretokenize-workers {pretokenize_workers}: must be >= 1")
        fanout = PretokenizeConfig(workers=pretokenize_workers)
    cluster_json = json.dumps(cluster.to_json()) if cluster else "{}"
    # Step outputs are cached by content on the checkpoint volume (unitoken/pipeline/cache.py);
    # no checkpoint root (a cluster without a PVC): nothing is cached.
    cache_root = f"{checkpoint_root.rstrip('/')}/cache" if checkpoint_root else ""
    name = "unitoken-training" if stages[0] == 1 else f"unitoken-retrain-from-stage{stages[0]}"

    @dsl.pipeline(name=name, description=f"UniToken stages {', '.join(map(str, stages))}: validate -> "
                  "tokenize -> train -> evaluate -> gate -> register (MLflow lineage)")
    def unitoken_training(data_uri: str, recipe: str = "tiny", model_name: str = "unitoken",
                          overrides_json: str = "[]", mixture_ratio: str = "1:1", gate_policy: str = "",
                          base_model: str = "", tokenizer_uri: str = "", tokenizer_steps: int = 2000,
                          tokenizer_batch_size: int = 32, tokenizer_lr: float = 1e-3,
                          max_steps: int = 0, eval_suites: str = "shapes-vqa,shapes-geneval", eval_limit: int = 50,
                          max_reject_fraction: float = 0.01, promote: bool = False, use_cache: bool = True,
                          shard_size: int = 1024):
        closing = place(close_run(job=JOB_ID), "close-run", cluster)
        with dsl.ExitHandler(closing, name="unitoken-run"):
            # Step 1: the parent MLflow run every task nests under
            run = place(open_run(job=JOB_ID, job_name=JOB_NAME, stages=",".join(map(str, stages)), data_uri=data_uri, recipe=recipe,
                                 overrides_json=overrides_json, mixture_ratio=mixture_ratio, model_name=model_name,
                                 base_model=base_model, gate_policy=gate_policy), "open-run", cluster)
            parent = run.output
            # Step 2: great-expectations validation with quarantine
            data = place(validate_data(data_uri=data_uri, parent_run_id=parent,
                                       max_reject_fraction=max_reject_fraction), "validate-data", cluster)
            # Step 3: the model the first stage starts from (a new one with its tokenizer, or a registered one)
            if stages[0] == 1:
                tok = place(train_tokenizer(dataset=data.outputs["dataset"], recipe=recipe, overrides_json=overrides_json,
                                            tokenizer_uri=tokenizer_uri, steps=tokenizer_steps,
                                            batch_size=tokenizer_batch_size, lr=tokenizer_lr, parent_run_id=parent,
                                            cache_root=cache_root, use_cache=use_cache),
                            "train-tokenizer", cluster)
                init = init_model(recipe=recipe, overrides_json=overrides_json, base_model=base_model,
                                  tokenizer=tok.outputs["tokenizer"])
            else:
                init = init_model(recipe=recipe, overrides_json=overrides_json, base_model=base_model)
            place(init, "init-model", cluster)
            # Step 4: VQ pre-tokenisation with the model's tokenizer, fanned out over shard ranges
            tokens = pretokenize_fanout(data.outputs["dataset"], init.outputs["model"], shard_size, parent, JOB_ID,
                                        checkpoint_root, use_cache, cluster, fanout.workers, fanout.limit)
            # Step 5: the stages, each from the previous hand-off, each evaluated
            model = init.outputs["model"]
            for n in stages:
                r = cluster.resources(f"train-stage{n}") if cluster else None
                stage = place(named(train_stage, f"train-stage{n}")(stage=n, recipe=recipe, overrides_json=overrides_json,
                                          mixture_ratio=mixture_ratio, tokens=tokens.outputs["tokens"], init=model,
                                          parent_run_id=parent, job=JOB_ID, checkpoint_root=checkpoint_root,
                                          max_steps=max_steps, num_nodes=r.num_nodes if r else 1,
                                          gpus=r.gpus if r and r.num_nodes == 1 else 1,
                                          cluster_json=cluster_json, use_cache=use_cache), f"train-stage{n}", cluster)
                model = stage.outputs["handoff"]
                scored = place(named(evaluate, f"evaluate-stage{n}")(model=model, dataset=data.outputs["dataset"], tokens=tokens.outputs["tokens"],
                                        suites=eval_suites, limit=eval_limit, label=f"stage{n}", parent_run_id=parent,
                                        cache_root=cache_root, use_cache=use_cache), "evaluate", cluster)
                scored.set_display_name(f"evaluate-stage{n}")
            # Step 6: the two-track gate against the champion, then registration
            verdict = place(gate(candidate=scored.outputs["evaluation"], dataset=data.outputs["dataset"],
                                 model_name=model_name, policy_yaml=gate_policy, recipe=recipe,
                                 overrides_json=overrides_json, parent_run_id=parent), "gate", cluster)
            with dsl.If(verdict.outputs["Output"] == True, name="if-gate-passed"):  # noqa: E712 - a KFP condition
                place(register_model(model=model, evaluation=scored.outputs["evaluation"],
                                     decision=verdict.outputs["decision"], model_name=model_name, parent_run_id=parent,
                                     promote=promote),
                      "register-model", cluster)

    return unitoken_training


def compile_pipeline(out: Path, stages: tuple[int, ...] = (1, 2, 3), cluster: ClusterConfig | None = None,
                     pretokenize_workers: int | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(stages, cluster, pretokenize_workers=pretokenize_workers), str(out))
    return out


if __name__ == "__main__":
    from unitoken.pipeline.cluster import load_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("unitoken_training.yaml"))
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--cluster", type=Path)
    a = ap.parse_args()
    print(compile_pipeline(a.out, tuple(int(s) for s in a.stages.split(",")), load_cluster(a.cluster)))
