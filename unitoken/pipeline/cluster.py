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
from unitoken.pipeline.cache import MAX_GIB_ENV, max_bytes_from_env

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
    if r.timeout_s is not None and r.timeout_s < 1:
        raise ConfigError(f"{where}.timeout_s={r.timeout_s}: must be >= 1 (seconds), or null for none")
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


_STR, _OPT_STR, _INT, _OPT_INT = "a string", "a string or null", "an integer", "an integer or null"
_RESOURCE_TYPES = {"cpu": "quantity", "memory": "quantity", "gpus": _INT, "gpu_resource": _STR,
                   "node_selector": "str-map", "tolerations": "list-of-maps", "priority_class": _OPT_STR,
                   "num_nodes": _INT, "timeout_s": _OPT_INT, "retries": _INT}
_CLUSTER_TYPES = {"image": _STR, "image_pull_secrets": "list-of-str", "namespace": _STR, "checkpoint_pvc": _OPT_STR,
                  "checkpoint_mount": _STR, "env": "str-map", "queue": _OPT_STR, "trainer_runtime": _STR}


def _typed(where: str, value, kind: str):
    ok = {
        _STR: isinstance(value, str) and value != "",
        _OPT_STR: value is None or isinstance(value, str),
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _OPT_INT: value is None or isinstance(value, int) and not isinstance(value, bool),
        "quantity": value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool),
        "str-map": isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                   and not isinstance(v, bool) for k, v in value.items()),
        "list-of-str": isinstance(value, list) and all(isinstance(x, str) for x in value),
        "list-of-maps": isinstance(value, list) and all(isinstance(x, dict) for x in value),
    }[kind]
    if not ok:
        expected = {"str-map": "a mapping of string to string", "list-of-str": "a list of strings",
                    "list-of-maps": "a list of mappings", "quantity": "a Kubernetes quantity"}.get(kind, kind)
        raise ConfigError(f"{where}={value!r}: expected {expected}")
    if kind == "str-map":
        return {k: str(v) for k, v in value.items()}
    return str(value) if kind == "quantity" and value is not None else value


def _resources(where: str, doc) -> dict:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping of {sorted(_RESOURCE_TYPES)}")
    extra = sorted(set(map(str, doc)) - set(_RESOURCE_TYPES))
    if extra:
        raise ConfigError(f"{where}: unknown field {extra[0]!r}; fix: use one of {sorted(_RESOURCE_TYPES)}")
    return {k: _typed(f"{where}.{k}", v, _RESOURCE_TYPES[k]) for k, v in doc.items()}


def cluster_from_dict(doc: dict, where: str = "cluster") -> ClusterConfig:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(map(str, doc)) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; fix: use one of {sorted(known)}")
    kwargs = {k: _typed(f"{where}.{k}", v, _CLUSTER_TYPES[k]) for k, v in doc.items() if k in _CLUSTER_TYPES}
    for block in ("cpu", "gpu"):
        if block in doc:
            kwargs[block] = dataclasses.replace(getattr(ClusterConfig(), block), **_resources(f"{where}.{block}", doc[block] or {}))
    steps = doc.get("steps") or {}
    if not isinstance(steps, dict):
        raise ConfigError(f"{where}.steps: expected a mapping of step name to resources")
    kwargs["steps"] = {str(step): _resources(f"{where}.steps.{step}", override or {}) for step, override in steps.items()}
    if "secrets" in doc:
        if not isinstance(doc["secrets"], list):
            raise ConfigError(f"{where}.secrets: expected a list of {{name: SECRET, env: {{key-in-secret: ENV_VAR}}}}")
        secrets = []
        for i, s in enumerate(doc["secrets"] or []):
            if not isinstance(s, dict) or set(s) != {"name", "env"}:
                raise ConfigError(f"{where}.secrets[{i}]: expected {{name: SECRET, env: {{key-in-secret: ENV_VAR}}}}")
            secrets.append(SecretEnv(_typed(f"{where}.secrets[{i}].name", s["name"], _STR),
                                     _typed(f"{where}.secrets[{i}].env", s["env"], "str-map")))
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
    if MAX_GIB_ENV in cfg.env:  # every cached step would fail on it at run time: say so at compile time
        try:
            max_bytes_from_env({MAX_GIB_ENV: cfg.env[MAX_GIB_ENV]})
        except ValueError as err:
            raise ConfigError(f"cluster.env.{err}") from None
    return cfg
