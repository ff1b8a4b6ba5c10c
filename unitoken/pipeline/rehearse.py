"""Rehearse one cluster run offline: every pod and object the cluster would see, checked.

    unitoken pipeline rehearse --cluster examples/cluster.yaml --k8s k8s/overlays/prod

What is rendered (nothing is sent anywhere):
- the task pods of the compiled pipeline as KFP 2.17 and its Argo render them: Argo's ``init``
  and ``wait`` executor containers, KFP's ``kfp-launcher`` init container and the ``main`` user
  container with KFP's hardening and the platform spec applied (``task_pod``);
- each multi-node stage's TrainJob and the node pods the Trainer makes from the overlay's
  TrainingRuntime after the job's ``runtimePatches`` (``trainjob_pod``);
- the overlay's own workloads (MLflow, Postgres, SeaweedFS).

Rules: ``schema`` (Kubernetes 1.37, strict; TrainJobs structurally, against Trainer v2.2's
``runtimePatches`` fields), ``restricted`` (Pod Security, ``podsecurity.py``), ``fit`` (every pod
on a node pool of the config: selector, taints, GPUs, CPU, memory, node count), ``launcher``
(the pod watching a TrainJob asks no GPU), ``rbac`` (the run's service account may do what
KFP's launcher and our TrainJob launcher do; the trainer's may do nothing), ``run-key`` (names
that must differ between runs do), ``mlflow-host`` (the tracking URI's host is one MLflow
accepts). Facts about KFP/Argo rendering come from kubeflow/pipelines 2.17.0
(``backend/src/v2/compiler/argocompiler/security_context.go``, ``driver/k8s.go``) and KFP's
Argo configuration (``third-party/argo/.../workflow-controller-configmap-patch.yaml``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

import yaml

from unitoken.pipeline.cluster import ClusterConfig, NodePool
from unitoken.pipeline.podsecurity import restricted_violations

K8S_VERSION = "1.37.0"
RUN_A, RUN_B = "7d5c1c1e-0000-4000-8000-00000000000a", "7d5c1c1e-0000-4000-8000-00000000000b"
JOB_ID_PLACEHOLDER = "{{$.pipeline_job_uuid}}"
KFP_LAUNCHER_IMAGE = "ghcr.io/kubeflow/kfp-launcher:2.17.0"
ARGOEXEC_IMAGE = "quay.io/argoproj/argoexec:v4.0.5"
# KFP hardens every executor container but leaves runAsNonRoot to the task (user images may run as root)
KFP_HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}
# Argo's init/wait containers: what KFP's manifests configure as the executor's securityContext
ARGO_EXECUTOR = {"runAsNonRoot": True, "runAsUser": 65532, **KFP_HARDENED}
KFP_SCRATCH = ("kfp-launcher", "gcs-scratch", "s3-scratch", "minio-scratch", "dot-local-scratch",
               "dot-cache-scratch", "dot-config-scratch")
# what KFP's driver/launcher and Argo's executor do with the run's service account
KFP_RBAC = [("", "configmaps", "get", "kfp-launcher"), ("", "secrets", "get", "mlpipeline-minio-artifact"),
            ("argoproj.io", "workflowtaskresults", "create", None), ("argoproj.io", "workflowtaskresults", "patch", None)]
# Trainer v2.2 runtimePatches: the pod and container fields a TrainJob may patch
PATCH_POD_FIELDS = {"serviceAccountName", "volumes", "initContainers", "containers", "imagePullSecrets",
                    "securityContext", "nodeSelector", "affinity", "tolerations", "schedulingGates"}
PATCH_CONTAINER_FIELDS = {"name", "env", "volumeMounts", "securityContext"}


@dataclass(frozen=True)
class Finding:
    rule: str
    subject: str
    ok: bool
    detail: str = ""
    warning: bool = False  # reported, not a failure


# --------------------------------------------------------------------------- rendering


def _quantity_map(res: dict) -> tuple[dict, dict]:
    """requests, limits of a KFP container ``resources`` block (strings as written)."""
    req = {k: res[f"resource{kind}Request"] for k, kind in (("cpu", "Cpu"), ("memory", "Memory"))
           if f"resource{kind}Request" in res}
    lim = {k: res[f"resource{kind}Limit"] for k, kind in (("cpu", "Cpu"), ("memory", "Memory"))
           if f"resource{kind}Limit" in res}
    accel = res.get("accelerator") or {}
    if accel.get("resourceType"):
        lim[accel["resourceType"]] = str(accel.get("resourceCount") or accel.get("count") or 1)
    return req, lim


def task_pod(task: str, container: dict, k8s: dict, service_account: str, run: str = RUN_A) -> dict:
    """One task's Pod as KFP 2.17's driver and Argo build it from the compiled executor."""
    req, lim = _quantity_map(container.get("resources") or {})
    env = [{"name": e["name"], "value": str(e.get("value", ""))} for e in container.get("env") or []]
    env += [{"name": kv["envVar"], "valueFrom": {"secretKeyRef": {"name": s["secretName"], "key": kv["secretKey"]}}}
            for s in k8s.get("secretAsEnv") or [] for kv in s["keyToEnv"]]
    volumes = [{"name": n, "emptyDir": {}} for n in KFP_SCRATCH]
    mounts = [{"name": "kfp-launcher", "mountPath": "/kfp-launcher"}]
    for i, p in enumerate(k8s.get("pvcMount") or []):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": p["constant"]}})
        mounts.append({"name": f"pvc-{i}", "mountPath": p["mountPath"]})
    for e in k8s.get("emptyDirMounts") or []:
        volumes.append({"name": e["volumeName"], "emptyDir": {k: e[k] for k in ("medium", "sizeLimit") if e.get(k)}})
        mounts.append({"name": e["volumeName"], "mountPath": e["mountPath"]})
    sc = dict(KFP_HARDENED)  # the driver applies the task's securityContext to main only
    for key, value in (k8s.get("securityContext") or {}).items():
        sc[key] = int(value) if key in ("runAsUser", "runAsGroup") else value
    main = {"name": "main", "image": container["image"], "command": list(container.get("command") or []),
            "args": list(container.get("args") or []), "env": env, "volumeMounts": mounts,
            "resources": {k: v for k, v in (("requests", req), ("limits", lim)) if v}, "securityContext": sc}
    argo = [{"name": n, "image": ARGOEXEC_IMAGE, "securityContext": dict(ARGO_EXECUTOR)} for n in ("init", "wait")]
    launcher = {"name": "kfp-launcher", "image": KFP_LAUNCHER_IMAGE, "securityContext": {**KFP_HARDENED,
                "runAsNonRoot": True}, "volumeMounts": [{"name": "kfp-launcher", "mountPath": "/kfp-launcher"}]}
    spec = {"serviceAccountName": service_account, "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [argo[0], launcher], "containers": [argo[1], main], "volumes": volumes,
            "restartPolicy": "Never"}
    if k8s.get("nodeSelector"):
        spec["nodeSelector"] = dict(k8s["nodeSelector"]["labels"])
    if k8s.get("tolerations"):
        spec["tolerations"] = [{k: v for k, v in t.items() if v not in (None, "")} for t in k8s["tolerations"]]
    if k8s.get("imagePullSecret"):
        spec["imagePullSecrets"] = [{"name": s["secretName"]} for s in k8s["imagePullSecret"]]
    if k8s.get("activeDeadlineSeconds"):
        spec["activeDeadlineSeconds"] = int(k8s["activeDeadlineSeconds"])
    labels = {"pipelines.kubeflow.org/v2_component": "true", **((k8s.get("podMetadata") or {}).get("labels") or {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{task}-{run[:8]}", "labels": labels},
            "spec": spec}


def _merge_named(base: list[dict], patch: list[dict]) -> list[dict]:
    out = {x["name"]: copy.deepcopy(x) for x in base}
    for x in patch:
        into = out.setdefault(x["name"], {})
        for key, value in x.items():
            into[key] = into.get(key, []) + value if isinstance(value, list) else value
    return list(out.values())


def trainjob_pod(job: dict, runtime: dict) -> dict:
    """A node pod of ``job`` as the Trainer makes it: the runtime's template, the job's
    runtimePatches merged in (lists by name), the trainer's image/command/env/resources on ``node``."""
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    spec = copy.deepcopy(rjob["template"]["spec"]["template"]["spec"])
    for patch in job["spec"].get("runtimePatches") or []:
        for pj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pspec = pj["template"]["spec"]["template"]["spec"]
            for key, value in pspec.items():
                if key in ("containers", "initContainers", "volumes"):
                    spec[key] = _merge_named(spec.get(key) or [], value)
                elif key == "tolerations":
                    spec[key] = (spec.get(key) or []) + value
                elif isinstance(value, dict):
                    spec[key] = {**(spec.get(key) or {}), **value}
                else:
                    spec[key] = value
    trainer = job["spec"]["trainer"]
    node = next(c for c in spec["containers"] if c["name"] == "node")
    node.update(image=trainer["image"], command=trainer["command"],
                env=(node.get("env") or []) + trainer.get("env", []))
    res = trainer.get("resourcesPerNode") or {}
    node["resources"] = {k: v for k, v in res.items() if v}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{job['metadata']['name']}-node-0-0"},
            "spec": spec}


def workload_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every pod template in rendered manifests."""
    out = []
    for d in objects:
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


# --------------------------------------------------------------------------- rules


def schema_findings(subject: str, obj: dict) -> list[Finding]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:  # a CRD (Trainer, Kueue): no schema in the 1.37 set
        return []
    except kubernetes_validate.ValidationError as err:
        return [Finding("schema", subject, False, str(err).splitlines()[0][:300])]
    return [Finding("schema", subject, True)]


def restricted_findings(subject: str, spec: dict) -> list[Finding]:
    bad = restricted_violations(spec)
    return [Finding("restricted", subject, False, b) for b in bad] or [Finding("restricted", subject, True)]


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and str(t.get("value", "")) == str(taint.get("value", "")):
            return True
    return False


def pod_requests(spec: dict) -> dict[str, float]:
    """What the scheduler reserves: the containers' sum, or the largest init container if more
    (requests default to limits where only limits are set)."""
    from kubernetes.utils import parse_quantity

    def one(c: dict) -> dict[str, float]:
        res = c.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: float(parse_quantity(str(v))) for k, v in merged.items()}

    total: dict[str, float] = {}
    for c in spec.get("containers") or []:
        for k, v in one(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers") or []:
        for k, v in one(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def misfit(spec: dict, pool: NodePool) -> str | None:
    """Why the pod cannot run on a node of ``pool``, or None if it can."""
    from kubernetes.utils import parse_quantity

    for key, value in (spec.get("nodeSelector") or {}).items():
        if pool.node_selector.get(key) != value:
            return f"node selector {key}={value} is not on the pool's nodes"
    for taint in pool.taints:
        if not _tolerates(spec.get("tolerations") or [], taint):
            return f"taint {taint.get('key')}:{taint.get('effect')} not tolerated"
    need = pod_requests(spec)
    have = {"cpu": float(parse_quantity(pool.cpu)), "memory": float(parse_quantity(pool.memory)),
            pool.gpu_resource: float(pool.gpus)}
    for res, amount in sorted(need.items()):
        if amount > have.get(res, 0.0):
            return f"asks {res}={amount:g}, a node has {have.get(res, 0.0):g}"
    return None


def fit_findings(subject: str, spec: dict, pools: dict[str, NodePool], nodes: int = 1) -> list[Finding]:
    if not pools:
        return [Finding("fit", subject, True, "skipped: the config describes no node_pools", warning=True)]
    reasons = {}
    for name, pool in pools.items():
        why = misfit(spec, pool) or (f"needs {nodes} nodes, the pool has {pool.nodes}" if nodes > pool.nodes else None)
        if why is None:
            return [Finding("fit", subject, True, f"pool {name}" + (f" x{nodes}" if nodes > 1 else ""))]
        reasons[name] = why
    return [Finding("fit", subject, False, "; ".join(f"{k}: {v}" for k, v in reasons.items()))]


def launcher_findings(subject: str, spec: dict, gpu_resource: str) -> list[Finding]:
    """The pod of a multi-node step stages inputs and watches its TrainJob: no GPU, no GPU node."""
    asks = pod_requests(spec).get(gpu_resource, 0)
    bad = asks > 0 or bool(spec.get("nodeSelector")) or bool(spec.get("tolerations"))
    detail = (f"asks {gpu_resource}={asks:g} and/or GPU placement; fix: the TrainJob's nodes get the GPUs, "
              "this pod only watches (cluster.launcher)") if bad else "a CPU pod"
    return [Finding("launcher", subject, not bad, detail)]


def _grants(rules: list[dict], group: str, resource: str, verb: str, name: str | None) -> bool:
    for r in rules:
        if (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", [])) and \
           (resource in r.get("resources", []) or "*" in r.get("resources", [])) and \
           (verb in r.get("verbs", []) or "*" in r.get("verbs", [])) and \
           (not r.get("resourceNames") or (name is not None and name in r["resourceNames"])):
            return True
    return False


def rbac_findings(objects: list[dict], cluster: ClusterConfig, trainjobs: bool, trainer_account: str | None) -> list[Finding]:
    from unitoken.pipeline.trainjob import GROUP, PLURAL, VERBS

    sa = cluster.service_account
    if sa == "default-editor":
        return [Finding("rbac", sa, True, "the Kubeflow profile's account (kubeflow-edit) grants KFP's needs; "
                        "TrainJobs need trainer.kubeflow.org in kubeflow-edit", warning=True)]

    def bound(account: str) -> list[dict]:
        roles = {d["metadata"]["name"]: d.get("rules") or [] for d in objects if d["kind"] == "Role"}
        return [rule for b in objects if b["kind"] == "RoleBinding"
                for s in b.get("subjects") or [] if s.get("kind") == "ServiceAccount" and s.get("name") == account
                for rule in roles.get(b["roleRef"]["name"], [])]

    out = []
    if not any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in objects):
        out.append(Finding("rbac", sa, False, f"no ServiceAccount {sa} in the manifests; fix: cluster.service_account "
                           "names one of k8s/base/rbac.yaml's, or default-editor"))
    rules = bound(sa)
    needs = list(KFP_RBAC) + ([(GROUP, PLURAL, v, None) for v in VERBS] if trainjobs else [])
    for group, resource, verb, name in needs:
        ok = _grants(rules, group, resource, verb, name)
        what = f"{verb} {resource}" + (f"/{name}" if name else "") + (f" ({group})" if group else "")
        out.append(Finding("rbac", sa, ok, what if ok else f"cannot {what}; fix: grant it in a Role bound to {sa}"))
    if trainer_account:
        extra = bound(trainer_account)
        out.append(Finding("rbac", trainer_account, not extra, "no API access" if not extra else
                           f"the training pods' account is granted {len(extra)} rules; fix: bind it to nothing"))
    return out


def run_key_findings(ir: dict, stages: tuple[int, ...]) -> list[Finding]:
    """Run-scoped names come from the run's id: every task's ``job`` input is the id placeholder
    (a display name is not unique), and what two runs derive from their ids differs."""
    from unitoken.pipeline.steps import dns_name, trainjob_name

    out = []
    for comp in [ir["root"], *ir["components"].values()]:
        for task, t in (comp.get("dag") or {}).get("tasks", {}).items():
            job = (t.get("inputs") or {}).get("parameters", {}).get("job")
            if job is None:
                continue
            value = (job.get("runtimeValue") or {}).get("constant")
            ok = value == JOB_ID_PLACEHOLDER
            out.append(Finding("run-key", task, ok, "the run's id" if ok else
                               f"keyed by {value!r}, which two runs can share (MLflow parent run, checkpoint "
                               "directory, staged inputs, TrainJob names collide); fix: recompile, the job input "
                               "must be dsl.PIPELINE_JOB_ID_PLACEHOLDER"))
    derived = {"checkpoint directory": (dns_name(RUN_A), dns_name(RUN_B))}
    derived |= {f"TrainJob stage {n}": (trainjob_name(RUN_A, n), trainjob_name(RUN_B, n)) for n in stages}
    for what, (a, b) in derived.items():
        out.append(Finding("run-key", what, a != b, f"{a} vs {b}"))
    return out


def mlflow_host_findings(cluster: ClusterConfig, objects: list[dict]) -> list[Finding]:
    """The steps' MLFLOW_TRACKING_URI names a host:port the MLflow server's Host check accepts."""
    uri = cluster.env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return [Finding("mlflow-host", "MLFLOW_TRACKING_URI", True, "not set in cluster.env", warning=True)]
    allowed = None
    for d in objects:
        if d["kind"] == "ConfigMap" and "MLFLOW_SERVER_ALLOWED_HOSTS" in (d.get("data") or {}):
            allowed = [h.strip() for h in d["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",") if h.strip()]
    if allowed is None:
        return [Finding("mlflow-host", uri, False, "no MLFLOW_SERVER_ALLOWED_HOSTS in the manifests: mlflow server "
                        "answers 403 to every in-cluster Host; fix: set it in the MLflow config")]
    url = urlparse(uri)
    host = f"{url.hostname}:{url.port or (443 if url.scheme == 'https' else 80)}"
    ok = any(fnmatch(host, pattern) for pattern in allowed)
    return [Finding("mlflow-host", uri, ok, f"{host} allowed" if ok else f"{host} is not in {allowed}")]


def trainjob_structure_findings(job: dict, runtimes: dict[str, dict]) -> list[Finding]:
    name, spec = job["metadata"]["name"], job["spec"]
    problems = []
    if runtimes and spec["runtimeRef"]["name"] not in runtimes:  # none: no manifests given
        problems.append(f"runtimeRef {spec['runtimeRef']['name']} is not among the manifests' TrainingRuntimes")
    if not isinstance(spec["trainer"].get("numNodes"), int) or spec["trainer"]["numNodes"] < 1:
        problems.append("trainer.numNodes must be a positive integer")
    if len(name) > 63:
        problems.append(f"name is {len(name)} characters (> 63)")
    for patch in spec.get("runtimePatches") or []:
        if not patch.get("manager"):
            problems.append("a runtimePatch needs a manager")
        for pj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pod = pj["template"]["spec"]["template"]["spec"]
            problems += [f"runtimePatches may not set pod field {k}" for k in sorted(set(pod) - PATCH_POD_FIELDS)]
            problems += [f"runtimePatches may not set container field {k}" for c in pod.get("containers") or []
                         for k in sorted(set(c) - PATCH_CONTAINER_FIELDS)]
    return [Finding("schema", f"TrainJob/{name}", False, p) for p in problems] or \
        [Finding("schema", f"TrainJob/{name}", True, "Trainer v2.2 fields")]


# --------------------------------------------------------------------------- the rehearsal


def _executors(ir: dict, platform: dict) -> list[tuple[str, str, dict, dict]]:
    """(task display name, step name, container, kubernetes platform spec) of every task."""
    out = []
    comps = ir["components"]
    for comp in [ir["root"]] + [c for c in comps.values() if "dag" in c]:
        for t in comp["dag"]["tasks"].values():
            label = comps[t["componentRef"]["name"]].get("executorLabel")
            if label:
                shown = t["taskInfo"]["name"]
                step = "evaluate" if shown.startswith("evaluate-stage") else shown
                out.append((shown, step, ir["deploymentSpec"]["executors"][label]["container"],
                            platform.get(label, {})))
    return out


def rehearse(cluster: ClusterConfig, overlay: Path | None, package: Path,
             stages: tuple[int, ...] = (1, 2, 3)) -> tuple[list[Finding], list[str]]:
    """Every finding for one run of the pipeline ``package`` (compiled for ``cluster``, with
    ``stages``), and the warnings of rendering ``overlay``."""
    from unitoken.pipeline.steps import dns_name, run_label, train_command, trainjob_name
    from unitoken.pipeline.trainjob import JOB_LABEL, trainjob_body

    warnings: list[str] = []
    objects: list[dict] = []
    if overlay is not None:
        from unitoken.pipeline.manifests import render

        objects, warnings = render(Path(overlay))
    docs = list(yaml.safe_load_all(Path(package).read_text()))
    ir = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    pools = cluster.node_pools
    found: list[Finding] = []
    for shown, step, container, k8s in _executors(ir, platform):
        pod = task_pod(shown, container, k8s, cluster.service_account)
        subject = f"task {shown}"
        found += schema_findings(subject, pod) + restricted_findings(subject, pod["spec"])
        found += fit_findings(subject, pod["spec"], pools)
        if step.startswith("train-stage") and cluster.resources(step).num_nodes > 1:
            found += launcher_findings(subject, pod["spec"], cluster.resources(step).gpu_resource)
    runtimes = {d["metadata"]["name"]: d for d in objects if d["kind"] == "TrainingRuntime"}
    multi = [n for n in stages if cluster.resources(f"train-stage{n}").num_nodes > 1]
    for n in multi:
        step, work = f"train-stage{n}", Path(cluster.checkpoint_mount) / dns_name(RUN_A) / f"stage{n}"
        command = train_command(n, "unitoken-7b", [], work / "inputs" / "tokens", work / "inputs" / "init", work, 0,
                                ["torchrun"])
        job = trainjob_body(f"{trainjob_name(RUN_A, n)}-a1", step, command, cluster, labels={JOB_LABEL: run_label(RUN_A)})
        found += trainjob_structure_findings(job, runtimes)
        runtime = runtimes.get(cluster.trainer_runtime)
        if runtime is None:
            found.append(Finding("schema", f"TrainJob/{job['metadata']['name']}", overlay is None,
                                 "skipped: no --k8s overlay to take the TrainingRuntime from" if overlay is None else
                                 f"TrainingRuntime {cluster.trainer_runtime} is not in {overlay}", warning=overlay is None))
            continue
        pod = trainjob_pod(job, runtime)
        subject = f"TrainJob {step} node"
        found += schema_findings(subject, pod) + restricted_findings(subject, pod["spec"])
        found += fit_findings(subject, pod["spec"], pools, nodes=cluster.resources(step).num_nodes)
    for subject, spec in workload_pods(objects):
        found += restricted_findings(subject, spec) + fit_findings(subject, spec, pools)
    for d in objects:
        found += schema_findings(f"{d['kind']}/{d['metadata']['name']}", d)
    if overlay is not None:
        trainer_sa = None
        if cluster.trainer_runtime in runtimes:
            rt = runtimes[cluster.trainer_runtime]["spec"]["template"]["spec"]["replicatedJobs"][0]
            trainer_sa = rt["template"]["spec"]["template"]["spec"].get("serviceAccountName")
        found += rbac_findings(objects, cluster, bool(multi), trainer_sa)
        found += mlflow_host_findings(cluster, objects)
    found += run_key_findings(ir, stages)
    if "@sha256:" not in cluster.image:
        found.append(Finding("image", cluster.image, True, "a tag, not a digest: pin by digest for production",
                             warning=True))
    return found, warnings


def print_findings(found: list[Finding], warnings: list[str], console) -> int:
    """The table: failures first, then a line per rule with how many subjects passed."""
    from rich.table import Table

    failed = [f for f in found if not f.ok]
    table = Table(title=f"cluster rehearsal: {len(found) - len(failed)} passed, {len(failed)} failed")
    for col in ("rule", "subject", "result", "detail"):
        table.add_column(col, overflow="fold")
    for f in failed:
        table.add_row(f.rule, f.subject, "[red]FAIL", f.detail)
    for f in (f for f in found if f.ok and f.warning):
        table.add_row(f.rule, f.subject, "[yellow]note", f.detail)
    for rule in dict.fromkeys(f.rule for f in found):
        passed = [f for f in found if f.rule == rule and f.ok and not f.warning]
        if passed:
            table.add_row(rule, f"{len(passed)} subjects", "[green]ok", passed[0].detail if len(passed) == 1 else "")
    console.print(table)
    for w in warnings:
        console.print(f"[yellow]note[/yellow] {w}")
    return 1 if failed else 0
