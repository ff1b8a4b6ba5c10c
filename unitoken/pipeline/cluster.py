"""Where and how each pipeline step runs on Kubernetes: the ``cluster`` block (YAML).

Applied at compile time (``pipelines/unitoken_training.py``): GPU steps get the accelerator,
node selector, tolerations and Kueue labels; CPU steps get CPU/memory only; training steps
mount the checkpoint volume; every step gets the image, plain env and secret-backed env (S3,
MLflow), and runs as the image's non-root user (Pod Security "restricted"). A stage whose
``num_nodes`` > 1 launches a Kubeflow Trainer ``TrainJob`` with the same placement
(``unitoken/pipeline/trainjob.py``); the step's own pod only watches it and is sized by
``launcher``. A single-node stage with ``gpus`` > 1 starts one process per GPU (torchrun).

Example (``examples/cluster.yaml`` has a complete one)::

    image: ghcr.io/acme/unitoken@sha256:...
    namespace: unitoken
    checkpoint_pvc: unitoken-checkpoints
    env: {MLFLOW_TRACKING_URI: "http://mlflow.unitoken.svc.cluster.local:5000"}
    secrets:
      - {name: unitoken-s3, env: {access-key: AWS_ACCESS_KEY_ID, secret-key: AWS_SECRET_ACCESS_KEY}}
    gpu: {gpus: 1, node_selector: {nvidia.com/gpu.product: NVIDIA-H200}, workload_priority_class: unitoken-training}
    steps:
      train-stage2: {gpus: 8, num_nodes: 4, cpu: "96", memory: 1000Gi}
    pretokenize: {workers: 32, parallelism: 16}  # 32 shard ranges, 16 GPU pods at a time
    node_pools:
      h200: {node_selector: {nvidia.com/gpu.product: NVIDIA-H200}, gpus: 8, cpu: "112", memory: 1800Gi, nodes: 4}

Priority: KFP 2.17's platform spec has no ``priorityClassName`` for task pods. GPU steps carry
the Kueue labels ``kueue.x-k8s.io/queue-name`` and ``kueue.x-k8s.io/priority-class``; the latter
names a Kueue ``WorkloadPriorityClass`` (``workload_priority_class``; k8s/components/kueue), not a
scheduling PriorityClass. TrainJob pods get their scheduling PriorityClass from the training
runtime (Trainer v2.2's ``runtimePatches`` cannot set ``priorityClassName``).

Validation is pydantic v2; every error becomes one ``ConfigError`` line naming the field
(``cluster.steps.train-stage2.gpus``) and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from unitoken.config import ConfigError
from unitoken.pipeline.cache import MAX_GIB_ENV, max_bytes_from_env

CPU_STEPS = ("open-run", "validate-data", "init-model", "pretokenize-merge", "register-model", "close-run")
GPU_STEPS = ("train-tokenizer", "pretokenize", "train-stage1", "train-stage2", "train-stage3", "evaluate", "gate")
TRAIN_STEPS = ("train-stage1", "train-stage2", "train-stage3")


def quantity(value: Any) -> str | None:
    """A Kubernetes quantity as a string ("8", "500m", "64Gi"), checked by the kubernetes client."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; fix: e.g. \"8\", \"500m\", \"64Gi\"")
    from kubernetes.utils import parse_quantity

    try:
        parse_quantity(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a Kubernetes quantity; fix: e.g. \"8\", \"500m\", \"64Gi\"") from None
    return str(value)


def str_map(v: Any) -> Any:
    """Label and env values as strings (YAML reads 8 and 0.5 as numbers); booleans, nulls and
    nested values are refused rather than guessed."""
    if isinstance(v, dict):
        bad = [k for k, x in v.items() if isinstance(x, (bool, dict, list)) or x is None]
        if bad:
            raise ValueError(f"{bad[0]!r} needs a string value")
        return {str(k): str(x) for k, x in v.items()}
    return v


class _Strict(BaseModel):
    """Unknown fields are refused with the list of known ones (pydantic's own message names neither)."""

    model_config = ConfigDict(frozen=True, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping of {sorted(cls.model_fields)}")
        unknown = sorted(set(map(str, data)) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; fix: use one of {sorted(cls.model_fields)}")
        return data


StrMap = Annotated[dict[str, str], BeforeValidator(str_map)]
Quantity = Annotated[str, BeforeValidator(quantity)]


class StepResources(_Strict):
    """What one step's pod (or each TrainJob node) asks for and where it may run."""

    cpu: Quantity | None = None
    memory: Quantity | None = None
    gpus: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: StrMap = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    workload_priority_class: str | None = None   # Kueue WorkloadPriorityClass (label on pods and TrainJobs)
    num_nodes: int = Field(1, ge=1)
    timeout_s: int | None = Field(None, ge=1)
    retries: int = Field(0, ge=0)
    shm: Quantity = "64Gi"                            # in-memory /dev/shm of a multi-GPU pod (NCCL, data workers)

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict]) -> list[dict]:
        for t in v:
            if "key" not in t and t.get("operator") != "Exists":
                raise ValueError(f"{t!r} needs a key (or operator: Exists)")
        return v


class SecretEnv(_Strict):
    name: str = Field(min_length=1)
    env: StrMap  # secret key -> environment variable


class NodePool(_Strict):
    """One pool of identical nodes: what a pod there can be given (allocatable, not capacity)."""

    node_selector: StrMap = Field(default_factory=dict)  # the labels every node of the pool carries
    taints: list[dict[str, Any]] = Field(default_factory=list)
    gpus: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    cpu: Quantity
    memory: Quantity
    nodes: int = Field(1, ge=1)


class PretokenizeConfig(_Strict):
    """The pre-tokenisation fan-out: ``workers`` pods (a ``dsl.ParallelFor``), each on the
    ``pretokenize`` step's resources (one GPU by default) building a contiguous range of shards,
    at most ``parallelism`` at a time (KFP's ``ParallelFor(parallelism=...)``; default: all)."""

    workers: int = Field(1, ge=1)
    parallelism: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _at_most_workers(self) -> PretokenizeConfig:
        if self.parallelism is not None and self.parallelism > self.workers:
            raise ValueError(f"parallelism={self.parallelism} > workers={self.workers}: at most `workers` pods "
                             f"can run at once; fix: set parallelism <= {self.workers}, or raise workers")
        return self

    @property
    def limit(self) -> int:
        """Pods at a time, as the ParallelFor takes it."""
        return self.parallelism or self.workers


def _cpu_defaults() -> StepResources:
    return StepResources(cpu="2", memory="8Gi")


def _gpu_defaults() -> StepResources:
    return StepResources(cpu="8", memory="64Gi", gpus=1,
                         tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


def _launcher_defaults() -> StepResources:
    return StepResources(cpu="1", memory="2Gi")


class ClusterConfig(_Strict):
    image: str = Field("ghcr.io/unitoken/unitoken:0.1.0", min_length=1)
    image_pull_secrets: list[str] = Field(default_factory=list)
    namespace: str = Field("unitoken", min_length=1)
    service_account: str = Field("unitoken-pipeline", min_length=1)  # the KFP run's account (k8s/base/rbac.yaml)
    run_as_user: int = Field(10001, ge=0)   # the image's non-root user (Dockerfile); 0: the rehearsal refuses
    run_as_group: int = Field(10001, ge=0)
    checkpoint_pvc: str | None = None
    checkpoint_mount: str = "/mnt/checkpoints"
    env: StrMap = Field(default_factory=dict)
    secrets: list[SecretEnv] = Field(default_factory=list)
    queue: str | None = None
    trainer_runtime: str = "unitoken-deepspeed"
    # `pipeline submit` prints the run's plan (`unitoken plan`) and refuses one above this many
    # GPU-hours without --yes (None: no confirmation asked)
    confirm_gpu_hours: float | None = Field(None, ge=0)
    cpu: StepResources = Field(default_factory=_cpu_defaults)
    gpu: StepResources = Field(default_factory=_gpu_defaults)
    launcher: StepResources = Field(default_factory=_launcher_defaults)  # the pod watching a TrainJob
    steps: dict[str, StepResources] = Field(default_factory=dict)      # per-step overrides of gpu / cpu
    node_pools: dict[str, NodePool] = Field(default_factory=dict)
    pretokenize: PretokenizeConfig = Field(default_factory=PretokenizeConfig)

    @field_serializer("steps")
    def _dump_steps(self, steps: dict[str, StepResources]) -> dict:
        # only what each step overrides: the dump loads back to the same config
        return {k: r.model_dump(exclude_unset=True) for k, r in steps.items()}

    def resources(self, step: str) -> StepResources:
        """The resources of one step: the GPU or CPU defaults with the step's overrides."""
        if step not in CPU_STEPS + GPU_STEPS:
            raise ConfigError(f"cluster.steps: unknown step {step!r}; fix: use one of {', '.join(CPU_STEPS + GPU_STEPS)}")
        base = self.gpu if step in GPU_STEPS else self.cpu
        override = self.steps[step].model_dump(exclude_unset=True) if step in self.steps else {}
        return StepResources.model_validate(base.model_dump() | override)

    def is_gpu(self, step: str) -> bool:
        return self.resources(step).gpus > 0

    def to_json(self) -> dict:
        """The form a step receives at run time (``cluster_from_dict`` reads it back)."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        for step in self.steps:
            if step not in CPU_STEPS + GPU_STEPS:
                raise ValueError(f"steps: unknown step {step!r}; fix: use one of {', '.join(CPU_STEPS + GPU_STEPS)}")
        for step in CPU_STEPS + GPU_STEPS:
            r = self.resources(step)
            where = f"steps.{step}" if step in self.steps else ("gpu" if step in GPU_STEPS else "cpu")
            if step in CPU_STEPS and (r.gpus or r.node_selector or r.tolerations or r.workload_priority_class):
                raise ValueError(f"{where}: a CPU step takes no gpus/node_selector/tolerations/workload_priority_class; "
                                 "fix: remove them (GPU settings belong to GPU steps)")
            if r.num_nodes > 1 and step not in TRAIN_STEPS:
                raise ValueError(f"steps.{step}.num_nodes={r.num_nodes}: only training stages run on several "
                                 "nodes; fix: set num_nodes on train-stage1/2/3")
            if r.num_nodes > 1 and not self.checkpoint_pvc:
                raise ValueError(f"steps.{step}.num_nodes={r.num_nodes}: multi-node stages share data and "
                                 "checkpoints through the checkpoint volume; fix: set cluster.checkpoint_pvc")
        if self.launcher.gpus:
            raise ValueError(f"launcher.gpus={self.launcher.gpus}: the pod that watches a TrainJob trains nothing; "
                             "fix: give it cpu/memory only (the TrainJob's nodes get the GPUs)")
        clash = sorted({k for s in self.secrets for k in s.env.values()} & set(self.env))
        if clash:
            raise ValueError(f"env.{clash[0]} is also set from a secret; fix: keep credentials in secrets only")
        if MAX_GIB_ENV in self.env:  # every cached step would fail on it at run time: say so at compile time
            try:
                max_bytes_from_env({MAX_GIB_ENV: self.env[MAX_GIB_ENV]})
            except ValueError as err:
                raise ValueError(f"env.{err}") from None
        return self


def _where(loc: tuple, root: str) -> str:
    text = root
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _config_error(err: ValidationError, root: str) -> ConfigError:
    """pydantic's first error as one line: ``cluster.gpu.memory: 'lots' is not ...; fix: ...``."""
    first = err.errors(include_url=False)[0]
    loc, kind = tuple(first["loc"]), first["type"]
    msg = first["msg"].removeprefix("Value error, ")
    where = _where(loc, root)
    if kind == "value_error":
        # whole-config checks name their own field ("steps.gate: ..."); field checks are placed by loc
        own_field = not loc and not msg.startswith(("unknown field", "expected"))
        return ConfigError(f"{where}.{msg}" if own_field else f"{where}: {msg}")
    if kind == "missing":
        return ConfigError(f"{where}: required; fix: add it")
    return ConfigError(f"{where}={first['input']!r}: {msg}")


def cluster_from_dict(doc: Any, where: str = "cluster") -> ClusterConfig:
    """Validate a ``cluster:`` mapping.

    Raises:
        ConfigError: an unknown field, a bad value, or GPU settings on a CPU step; the message
            names the field and the fix.
    """
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping")
    try:
        return ClusterConfig.model_validate(doc)
    except ValidationError as err:
        raise _config_error(err, where) from None


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """Read and validate a cluster YAML (the whole file, or its ``cluster:`` block)."""
    if path is None:
        return ClusterConfig()
    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a cluster config is a mapping")
    return cluster_from_dict(doc.get("cluster", doc), "cluster")


def validate_cluster(cfg: ClusterConfig) -> ClusterConfig:
    """Re-check a config built in code (``ClusterConfig(...)`` validates already; kept for callers)."""
    return cluster_from_dict(cfg.to_json())
