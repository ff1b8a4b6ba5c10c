"""Multi-node stages on Kubeflow Trainer v2: create a ``TrainJob``, follow it, cancel it.

A training step whose ``num_nodes`` > 1 does not train in its own pod: it creates a TrainJob
(``trainer.kubeflow.org/v1alpha1``) that references our training runtime
(``k8s/base/training-runtime.yaml``: torch-distributed, DeepSpeed inside ``unitoken train``),
with ``numNodes``, resources per node, and the same node selector, tolerations, checkpoint
volume, env, secrets and image pull secrets as the step. The step then watches the job until
its ``Complete`` or ``Failed`` condition, and fails with the job's reason. When the step is
cancelled (SIGTERM from KFP) or runs past its timeout, it deletes the TrainJob (foreground
propagation: the JobSet and pods go with it) before failing.

Retries: every attempt of a step looks for the TrainJobs of its run and stage first (labels
``unitoken.ai/job`` and ``unitoken.ai/step``). A running one (the previous attempt's pod died,
its job did not) is adopted and watched; a complete one is used as it is; otherwise a new job
named ``...-a<N>`` starts, resuming from the checkpoints on the shared volume. Failed jobs stay
for their logs. A 409 on create (another attempt created that name first) adopts that job.

Uses the ``kubernetes`` client only; tests run it against a loopback HTTP stub of the API.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator

from unitoken.pipeline.cluster import ClusterConfig

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# every API verb TrainJobLauncher uses on trainjobs: the RBAC the step's service account needs
# (k8s/base/rbac.yaml; `unitoken pipeline rehearse` checks the Role grants them)
VERBS = ("create", "get", "list", "watch", "delete")
JOB_LABEL, STEP_LABEL = "unitoken.ai/job", "unitoken.ai/step"


class TrainJobFailed(RuntimeError):
    """The TrainJob ended in Failed (the message carries its reason), or could not be followed."""


class Cancelled(BaseException):
    """The step was cancelled (SIGTERM/SIGINT) while the TrainJob ran."""


def trainjob_body(name: str, stage_step: str, command: list[str], cluster: ClusterConfig,
                  labels: dict[str, str] | None = None) -> dict:
    """The TrainJob for one stage step, with that step's resources and placement."""
    r = cluster.resources(stage_step)
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if r.gpus:
        limits[r.gpu_resource] = str(r.gpus)
    if r.cpu:
        requests["cpu"] = limits["cpu"] = str(r.cpu)
    if r.memory:
        requests["memory"] = limits["memory"] = str(r.memory)
    env = [{"name": k, "value": v} for k, v in sorted(cluster.env.items())]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": s.name, "key": key}}}
            for s in cluster.secrets for key, var in sorted(s.env.items())]
    job_labels = {"app.kubernetes.io/part-of": "unitoken", STEP_LABEL: stage_step, **(labels or {})}
    if cluster.queue:
        job_labels["kueue.x-k8s.io/queue-name"] = cluster.queue
    if r.workload_priority_class:  # Kueue reads a WorkloadPriorityClass here, not a PriorityClass
        job_labels["kueue.x-k8s.io/priority-class"] = r.workload_priority_class
    pod_spec: dict = {"nodeSelector": dict(r.node_selector), "tolerations": list(r.tolerations)}
    if cluster.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in cluster.image_pull_secrets]
    if cluster.checkpoint_pvc:
        pod_spec["volumes"] = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": cluster.checkpoint_pvc}}]
        pod_spec["containers"] = [{"name": "node", "volumeMounts": [
            {"name": "checkpoints", "mountPath": cluster.checkpoint_mount}]}]
    spec: dict = {
        "runtimeRef": {"name": cluster.trainer_runtime, "kind": "TrainingRuntime", "apiGroup": GROUP},
        "trainer": {"image": cluster.image, "command": command, "env": env, "numNodes": r.num_nodes,
                    "resourcesPerNode": {"limits": limits, "requests": requests}},
        "runtimePatches": [{"manager": "unitoken.ai/pipeline", "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod_spec}}}}]}}}}],
    }
    if r.timeout_s:
        spec["activeDeadlineSeconds"] = int(r.timeout_s)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": cluster.namespace, "labels": job_labels}, "spec": spec}


def job_state(obj: dict) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", reason text) from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "Running", ""


class TrainJobLauncher:
    """Create / watch / cancel TrainJobs in one namespace (``api_client``: a configured
    ``kubernetes.client.ApiClient``; default: in-cluster config, else the kubeconfig)."""

    def __init__(self, namespace: str, api_client=None, watch_timeout_s: int = 60) -> None:
        from kubernetes import client

        if api_client is None:
            from kubernetes import config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = client.CustomObjectsApi(api_client)
        self.namespace, self.watch_timeout_s = namespace, watch_timeout_s

    def create(self, body: dict) -> dict:
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def list(self, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        found = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, label_selector=selector)
        return sorted(found.get("items") or [], key=lambda o: o["metadata"].get("creationTimestamp") or "")

    def cancel(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                     propagation_policy="Foreground")
        except ApiException as err:
            if err.status != 404:  # already gone is what we wanted
                raise

    def wait(self, name: str, timeout_s: float) -> str:
        """Follow the job until Complete (returns its reason) or Failed (raises).

        Raises:
            TrainJobFailed: the job failed, or disappeared.
            TimeoutError: ``timeout_s`` passed first.
        """
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                obj = self.get(name)
            except ApiException as err:
                if err.status == 404:
                    raise TrainJobFailed(f"TrainJob {self.namespace}/{name} was deleted while the step waited") from None
                raise
            state, reason = job_state(obj)
            if state == "Complete":
                return reason
            if state == "Failed":
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} failed: {reason}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"TrainJob {self.namespace}/{name} still running after {timeout_s:.0f}s")
            version = (obj.get("metadata") or {}).get("resourceVersion")
            stream = watch.Watch().stream(
                self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                field_selector=f"metadata.name={name}", resource_version=version,
                timeout_seconds=max(1, int(min(remaining, self.watch_timeout_s))))
            for event in stream:
                state, reason = job_state(event["object"])
                log.info("TrainJob %s: %s %s", name, event["type"], state)
                if event["type"] == "DELETED" or state != "Running":
                    break  # re-read the object above: one place decides

    def start(self, body: dict) -> tuple[str, str]:
        """This attempt's job: ("adopted", name) for a running or complete job of the same run and
        step, else ("created", name) for a new one named ``<base>-a<N>``; a 409 adopts the job."""
        from kubernetes.client.exceptions import ApiException

        meta = body["metadata"]
        mine = {k: meta["labels"][k] for k in (JOB_LABEL, STEP_LABEL)}
        earlier = self.list(mine)
        for obj in earlier:
            if job_state(obj)[0] in ("Running", "Complete"):
                log.info("adopting TrainJob %s/%s of an earlier attempt", self.namespace, obj["metadata"]["name"])
                return "adopted", obj["metadata"]["name"]
        name = f"{meta['name']}-a{len(earlier) + 1}"
        try:
            self.create({**body, "metadata": {**meta, "name": name}})
        except ApiException as err:
            if err.status != 409:
                raise
            theirs = (self.get(name)["metadata"].get("labels") or {})
            if any(theirs.get(k) != v for k, v in mine.items()):
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} exists and belongs to another run or step "
                                     f"({theirs.get(JOB_LABEL)}, {theirs.get(STEP_LABEL)}); fix: delete it") from None
            log.info("TrainJob %s/%s exists already (another attempt created it): adopting it", self.namespace, name)
            return "adopted", name
        log.info("created TrainJob %s/%s (%s nodes)", self.namespace, name, body["spec"]["trainer"]["numNodes"])
        return "created", name

    def run(self, body: dict, timeout_s: float) -> tuple[str, str]:
        """Start (or adopt) the job, wait for it; on cancellation or timeout delete it, then re-raise.

        Returns (the job's name, its completion reason)."""
        _, name = self.start(body)
        try:
            with _signals_cancel():
                return name, self.wait(name, timeout_s)
        except (Cancelled, TimeoutError, KeyboardInterrupt):
            self.cancel(name)
            raise


@contextlib.contextmanager
def _signals_cancel() -> Iterator[None]:
    """SIGTERM (KFP cancelling the step, pod deletion) raises Cancelled in the waiting thread."""
    def handler(signum, frame):  # noqa: ARG001
        raise Cancelled(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the caller handles cancellation
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
