"""Where and how each pipeline step runs on Kubernetes: the ``cluster`` block (YAML).

Applied at compile time (``pipelines/unitoken_training.py``): GPU steps get the accelerator,
node selector, tolerations and priority; CPU steps get CPU/memory only; training steps mount
the checkpoint volume; every step gets the image, plain env and secret-backed env (S3, MLflow).
A stage whose ``num_nodes`` > 1 launches a Kubeflow Trainer ``TrainJob`` with the same
placement (``unitoken/pipeline/trainjob.py``).

Example (``examples/cluster.yaml`` has a complete one)::

    image: ghcr.io/acme/unitoken:0.1.0
    namespace: unitoken
    checkpoint_pvc: unitoken-checkpoints
    env: {MLFLOW_TRACKING_URI: "http://mlflow.unitoken.svc:5000"}
    secrets:
      - {name: unitoken-s3, env: {AWS_ACCESS_KEY_ID: access-key, AWS_SECRET_ACCESS_KEY: secret-key}}
    gpu: {gpus: 1, node_selector: {nvidia.com/gpu.product: NVIDIA-H200}, priority_class: unitoken-train}
    steps:
      stage2: {gpus: 8, num_nodes: 4, cpu: "96", memory: 1500Gi}

Priority: KFP 2.17's platform spec has no ``priorityClassName`` for task pods, so GPU steps
carry the Kueue labels ``kueue.x-k8s.io/queue-name`` / ``kueue.x-k8s.io/priority-class`` (used
when Kueue's pod integration manages the namespace); TrainJobs carry the same labels and their
runtime sets ``priorityClassName`` (``k8s/50-training-runtime.yaml``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from unitoken.config import ConfigError

CPU_STEPS = ("open-run", "validate-data", "init-model", "register-model", "close-run")
GPU_STEPS = ("train-tokenizer", "pretokenize", "train-stage1", "train-stage2", "train-stage3", "evaluate", "gate")
TRAIN_STEPS = ("train-stage1", "train-stage2", "train-stage3")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


@dataclass(frozen=True)
class StepResources:
    cpu: str | None = None
    memory: str | None = None
    gpus: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    priority_class: str | None = None
    num_nodes: int = 1
    timeout_s: int | None = None
    retries: int = 0


@dataclass(frozen=True)
class SecretEnv:
    name: str
    env: dict[str, str]  # secret key -> environment variable


@dataclass(frozen=True)
class ClusterConfig:
    image: str = "ghcr.io/unitoken/unitoken:0.1.0"
    image_pull_secrets: list[str] = field(default_factory=list)
    namespace: str = "unitoken"
    checkpoint_pvc: str | None = None
    checkpoint_mount: str = "/mnt/checkpoints"
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[SecretEnv] = field(default_factory=list)
    queue: str | None = None
    trainer_runtime: str = "unitoken-deepspeed"
    cpu: StepResources = field(default_factory=lambda: StepResources(cpu="2", memory="8Gi"))
    gpu: StepResources = field(default_factory=lambda: StepResources(
        cpu="8", memory="64Gi", gpus=1, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                                      "effect": "NoSchedule"}]))
    steps: dict[str, dict] = field(default_factory=dict)  # per-step overrides of `gpu` / `cpu`

    def resources(self, step: str) -> StepResources:
        """The resources of one step: the GPU or CPU defaults with the step's overrides."""
        if step not in CPU_STEPS + GPU_STEPS:
            raise ConfigError(f"cluster.steps: unknown step {step!r}; fix: use one of {', '.join(CPU_STEPS + GPU_STEPS)}")
        base = self.gpu if step in GPU_STEPS else self.cpu
        return dataclasses.replace(base, **self.steps.get(step, {}))

    def is_gpu(self, step: str) -> bool:
        return self.resources(step).gpus > 0


def _check_resources(where: str, r: StepResources, gpu_step: bool) -> None:
    for name in ("cpu", "memory"):
        value = getattr(r, name)
        if value is not None and not _QUANTITY.match(str(value)):
            raise ConfigError(f"{where}.{name}={value!r}: not a Kubernetes quantity; fix: e.g. \"8\", \"500m\", \"64Gi\"")
    if r.gpus < 0:
        raise ConfigError(f"{where}.gpus={r.gpus}: must be >= 0")
    if not gpu_step and (r.gpus or r.node_selector or r.tolerations or r.priority_class):
        raise ConfigError(f"{where}: a CPU step takes no gpus/node_selector/tolerations/priority_class; "
                          "fix: remove them (GPU settings belong to GPU steps)")
    if r.num_nodes < 1:
        raise ConfigError(f"{where}.num_nodes={r.num_nodes}: must be >= 1")
    if r.retries < 0:
        raise ConfigError(f"{where}.retries={r.retries}: must be >= 0")
    for t in r.tolerations:
        if not isinstance(t, dict) or "key" not in t and t.get("operator") != "Exists":
            raise ConfigError(f"{where}.tolerations: {t!r} needs a key (or operator: Exists)")


def load_cluster(path: str | Path | None) -> ClusterConfig:
    """Read and validate a cluster YAML (the whole file, or its ``cluster:`` block).

    Raises:
        ConfigError: an unknown field, a bad value, or GPU settings on a CPU step; the message
            names the field and the fix.
    """
    if path is None:
        return validate_cluster(ClusterConfig())
    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a cluster config is a mapping")
    return cluster_from_dict(doc.get("cluster", doc), str(path))


def cluster_from_dict(doc: dict, where: str = "cluster") -> ClusterConfig:
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; fix: use one of {sorted(known)}")
    res_fields = {f.name for f in dataclasses.fields(StepResources)}
    kwargs = dict(doc)
    for block in ("cpu", "gpu"):
        if block in kwargs:
            extra = sorted(set(kwargs[block] or {}) - res_fields)
            if extra:
                raise ConfigError(f"{where}.{block}: unknown field {extra[0]!r}; fix: use one of {sorted(res_fields)}")
            base = getattr(ClusterConfig(), block)
            kwargs[block] = dataclasses.replace(base, **(kwargs[block] or {}))
    for step, override in (kwargs.get("steps") or {}).items():
        extra = sorted(set(override or {}) - res_fields)
        if extra:
            raise ConfigError(f"{where}.steps.{step}: unknown field {extra[0]!r}; fix: use one of {sorted(res_fields)}")
    if "secrets" in kwargs:
        secrets = []
        for i, s in enumerate(kwargs["secrets"] or []):
            if not isinstance(s, dict) or set(s) != {"name", "env"} or not isinstance(s["env"], dict):
                raise ConfigError(f"{where}.secrets[{i}]: expected {{name: SECRET, env: {{key-in-secret: ENV_VAR}}}}")
            secrets.append(SecretEnv(s["name"], dict(s["env"])))
        kwargs["secrets"] = secrets
    return validate_cluster(ClusterConfig(**kwargs))


def validate_cluster(cfg: ClusterConfig) -> ClusterConfig:
    for step in cfg.steps:
        cfg.resources(step)  # raises on an unknown step name
    for step in CPU_STEPS + GPU_STEPS:
        r = cfg.resources(step)
        _check_resources(f"cluster.steps.{step}" if step in cfg.steps else f"cluster.{'gpu' if step in GPU_STEPS else 'cpu'}",
                         r, step in GPU_STEPS)
        if r.num_nodes > 1 and step not in TRAIN_STEPS:
            raise ConfigError(f"cluster.steps.{step}.num_nodes={r.num_nodes}: only training stages run on several "
                              "nodes; fix: set num_nodes on train-stage1/2/3")
        if r.num_nodes > 1 and not cfg.checkpoint_pvc:
            raise ConfigError(f"cluster.steps.{step}.num_nodes={r.num_nodes}: multi-node stages share data and "
                              "checkpoints through the checkpoint volume; fix: set cluster.checkpoint_pvc")
    names = [k for s in cfg.secrets for k in s.env.values()]
    clash = sorted(set(names) & set(cfg.env))
    if clash:
        raise ConfigError(f"cluster.env.{clash[0]} is also set from a secret; fix: keep credentials in secrets only")
    return cfg
