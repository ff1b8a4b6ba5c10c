"""k8s/ renders (base, dev and prod overlays) with `kubectl kustomize`; built-in kinds validate
against the Kubernetes 1.37 schemas, CRDs (TrainingRuntime, Kueue) are checked structurally;
every pod meets the "restricted" Pod Security profile; no overlay owns the namespace; secrets
and image digests are never committed placeholders; NetworkPolicies and RBAC are least privilege;
the champion's serving Deployment serves the pipeline's registered model through MLflow."""

from __future__ import annotations

import copy
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes.utils import parse_quantity

from unitoken.pipeline.cluster import GPU_STEPS, load_cluster
from unitoken.pipeline.manifests import (
    check_images,
    check_overlay,
    check_secret_env,
    render,
    secret_env_files,
)
from unitoken.pipeline.podsecurity import restricted_violations

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
LAYERS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.37.0"
CRD_GROUPS = ("trainer.kubeflow.org", "kueue.x-k8s.io")
CLUSTER_SCOPED = {"PriorityClass", "ClusterQueue", "ResourceFlavor", "WorkloadPriorityClass"}
# the volume types the "restricted" profile admits (hostPath and the rest are refused)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Each layer rendered once (overlays from their .env.example files when the real ones are absent)."""
    return {name: render(path)[0] for name, path in LAYERS.items()}


def _find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _pod_templates(doc: dict) -> list[dict]:
    """The pod templates (metadata + spec) of a workload object."""
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [doc["spec"]["template"]]
    if doc["kind"] == "TrainingRuntime":
        return [j["template"]["spec"]["template"] for j in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def _restricted_violations(pod: dict) -> list[str]:
    """What a pod spec breaks of the "restricted" profile (plus our read-only root filesystem rule)."""
    problems = [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    problems += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod_ctx = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})

        def effective(key: str, ctx: dict = ctx):
            return ctx.get(key, pod_ctx.get(key))
        if effective("runAsNonRoot") is not True:
            problems.append(f"{c['name']}: runAsNonRoot")
        if effective("runAsUser") in (None, 0):
            problems.append(f"{c['name']}: runAsUser")
        if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']}: seccompProfile")
        if ctx.get("allowPrivilegeEscalation") is not False or ctx.get("privileged"):
            problems.append(f"{c['name']}: privilege escalation")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']}: capabilities")
        if any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{c['name']}: hostPort")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: readOnlyRootFilesystem")
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a matchLabels selector ({} = every pod) selects pods with these labels."""
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))])


# ---------------------------------------------------------------------------------------------
# layout and house style


def test_every_manifest_says_how_to_apply_check_and_clean():
    """Each YAML file under k8s/ opens with a comment block naming its Apply / Check / Clean commands."""
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        head = _header(f)
        assert head.startswith("# "), f
        for word in ("Apply:", "Check:", "Clean:"):
            assert word in head, f"{f.relative_to(ROOT)}: no {word} in its first comment block"


def test_overlays_say_their_clean_leaves_the_namespace():
    """An overlay's Clean line deletes its objects and says the namespace stays."""
    for name in OVERLAYS:
        clean = next(line for line in _header(LAYERS[name] / "kustomization.yaml").splitlines() if "Clean:" in line)
        assert f"kubectl delete -k k8s/overlays/{name}" in clean and "leaves the namespace alone" in clean


def test_base_header_documents_the_pod_security_labels():
    """The base says which label the profile namespace needs and the one command that sets it."""
    head = _header(LAYERS["base"] / "kustomization.yaml")
    assert "kubectl label --overwrite ns unitoken pod-security.kubernetes.io/enforce=restricted" in head


# ---------------------------------------------------------------------------------------------
# schemas


@pytest.mark.parametrize("layer", LAYERS)
def test_built_in_kinds_validate_against_the_schemas(rendered, layer):
    """Every object of a built-in kind passes strict 1.37 schema validation (CRDs are checked below)."""
    import kubernetes_validate

    docs = [d for d in rendered[layer] if d["apiVersion"].split("/")[0] not in CRD_GROUPS]
    assert {"ConfigMap", "StatefulSet", "Deployment", "Service", "PersistentVolumeClaim", "ServiceAccount", "Role",
            "RoleBinding", "PriorityClass", "NetworkPolicy"} <= {d["kind"] for d in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest(rendered):
    """The schema check can fail: a string replica count is refused."""
    import kubernetes_validate

    deploy = copy.deepcopy(_find(rendered["dev"], "Deployment", "mlflow"))
    deploy["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


def test_training_runtime_structure(rendered):
    """The runtime TrainJobs reference: torch policy, a `node` job whose container is `node`
    (runtimePatches target it), the trainer ancestor label, the GPU priority class, no pull secret."""
    docs = rendered["dev"]
    rt = _find(docs, "TrainingRuntime", "unitoken-deepspeed")
    assert rt["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert "torch" in rt["spec"]["mlPolicy"] and rt["spec"]["mlPolicy"]["numNodes"] == 1
    job = rt["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert job["name"] == "node"
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert pod["priorityClassName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "PriorityClass"}
    assert pod["serviceAccountName"] == "unitoken-trainer" and "imagePullSecrets" not in pod


@pytest.mark.parametrize("layer", OVERLAYS)
def test_kueue_objects_structure(rendered, layer):
    """v1beta2 ResourceFlavor h200 (the H200 pool), ClusterQueue unitoken covering cpu, memory and GPUs
    for this namespace only, LocalQueue unitoken-gpu, and the two WorkloadPriorityClasses."""
    docs = rendered[layer]
    kueue = [d for d in docs if d["apiVersion"].startswith("kueue.x-k8s.io/")]
    assert {d["apiVersion"] for d in kueue} == {"kueue.x-k8s.io/v1beta2"}
    flavor = _find(docs, "ResourceFlavor", "h200")
    assert flavor["spec"]["nodeLabels"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    cq = _find(docs, "ClusterQueue", "unitoken")["spec"]
    assert cq["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "unitoken"}}
    [group] = cq["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    assert [f["name"] for f in group["flavors"]] == ["h200"]
    assert [r["name"] for r in group["flavors"][0]["resources"]] == group["coveredResources"]
    assert _find(docs, "LocalQueue", "unitoken-gpu")["spec"] == {"clusterQueue": "unitoken"}
    assert {d["metadata"]["name"]: d["value"] for d in kueue if d["kind"] == "WorkloadPriorityClass"} == {
        "unitoken-training": 100000, "unitoken-evaluation": 50000}


def test_the_cluster_configs_queue_and_priorities_exist(rendered):
    """examples/cluster.yaml's queue and every workload_priority_class it names are rendered objects."""
    cluster = load_cluster(ROOT / "examples" / "cluster.yaml")
    docs = rendered["dev"]
    assert _find(docs, "LocalQueue", cluster.queue)
    classes = {d["metadata"]["name"] for d in docs if d["kind"] == "WorkloadPriorityClass"}
    named = {cluster.resources(step).workload_priority_class for step in GPU_STEPS} - {None}
    assert named and named <= classes


def test_the_cluster_queue_holds_the_largest_step(rendered):
    """The ClusterQueue's quota admits every GPU step of examples/cluster.yaml (all nodes at once)."""
    cluster = load_cluster(ROOT / "examples" / "cluster.yaml")
    [flavor] = _find(rendered["dev"], "ClusterQueue", "unitoken")["spec"]["resourceGroups"][0]["flavors"]
    quota = {r["name"]: parse_quantity(r["nominalQuota"]) for r in flavor["resources"]}
    for step in GPU_STEPS:
        r = cluster.resources(step)
        need = {"cpu": parse_quantity(r.cpu), "memory": parse_quantity(r.memory), r.gpu_resource: r.gpus}
        for name, amount in need.items():
            assert amount * r.num_nodes <= quota[name], f"{step}: {name} {amount} x {r.num_nodes} nodes"


# ---------------------------------------------------------------------------------------------
# namespace and Pod Security


@pytest.mark.parametrize("layer", LAYERS)
def test_no_namespace_object_is_rendered(rendered, layer):
    """No layer renders a Namespace, so `kubectl delete -k` can never delete the profile's namespace."""
    assert not [d for d in rendered[layer] if d["kind"] == "Namespace"]


@pytest.mark.parametrize("layer", OVERLAYS)
def test_overlays_place_every_namespaced_object_in_unitoken(rendered, layer):
    """Namespaced objects land in `unitoken`; cluster-scoped ones (Kueue's included) carry no namespace."""
    for doc in rendered[layer]:
        expected = None if doc["kind"] in CLUSTER_SCOPED else "unitoken"
        assert doc["metadata"].get("namespace") == expected, (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("layer", OVERLAYS)
def test_pods_meet_the_restricted_profile(rendered, layer):
    """Every pod template (Deployment, StatefulSets incl. SeaweedFS, TrainingRuntime) is admitted by
    "restricted": non-root, RuntimeDefault seccomp, no escalation, ALL dropped, no host access."""
    templates = {d["metadata"]["name"]: t for d in rendered[layer] for t in _pod_templates(d)}
    expected = {"mlflow", "postgres", "unitoken-deepspeed", "champion"} | ({"seaweedfs"} if layer == "dev" else set())
    assert set(templates) == expected
    for name, template in templates.items():
        assert _restricted_violations(template["spec"]) == [], name


def test_the_restricted_check_catches_a_root_pod(rendered):
    """The helper above can fail: a root, privileged container with a hostPath volume is reported."""
    pod = copy.deepcopy(_find(rendered["dev"], "StatefulSet", "seaweedfs")["spec"]["template"]["spec"])
    pod["securityContext"]["runAsUser"] = 0
    pod["containers"][0]["securityContext"]["privileged"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert _restricted_violations(pod) == ["volume host", "seaweedfs: runAsUser", "seaweedfs: privilege escalation"]


# ---------------------------------------------------------------------------------------------
# secrets and images


def test_no_committed_file_holds_a_secret():
    """No file under k8s/ (but the git-ignored secret env files) has a CHANGE-ME or a Secret object."""
    ignored = set(K8S.glob("overlays/*/secrets/*.env"))
    for f in sorted(p for p in K8S.rglob("*") if p.is_file() and p not in ignored):
        text = f.read_text()
        assert "change-me" not in text.lower(), f
        if f.suffix == ".yaml":
            assert not [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "Secret"], f


@pytest.mark.parametrize("layer", OVERLAYS)
def test_overlays_generate_the_secrets_the_pods_read(rendered, layer):
    """Every secretKeyRef of an overlay's pods names a generated Secret (fixed name) and one of its keys."""
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in rendered[layer] if d["kind"] == "Secret"}
    assert set(secrets) == {"unitoken-s3", "unitoken-mlflow", "unitoken-postgres"}
    for doc in rendered[layer]:
        for template in _pod_templates(doc):
            for c in template["spec"]["containers"]:
                for var in c.get("env", []):
                    if ref := var.get("valueFrom", {}).get("secretKeyRef"):
                        assert ref["key"] in secrets[ref["name"]], (doc["metadata"]["name"], var["name"])


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_committed_examples_are_refused_as_secrets(layer, tmp_path):
    """An env file copied from its .env.example without editing fails the placeholder check."""
    for path in secret_env_files(LAYERS[layer]):
        real = tmp_path / path.name
        shutil.copyfile(path.with_name(path.name + ".example"), tmp_path / (path.name + ".example"))
        shutil.copyfile(path.with_name(path.name + ".example"), real)
        errors = check_secret_env(real)
        assert errors and all(str(real.name) in e and "example value" in e for e in errors), errors


def test_the_secret_check_names_each_placeholder(tmp_path):
    """CHANGE-ME, an empty value, a missing key and a database user unfit for a URI are each refused,
    naming the file and the key."""
    (tmp_path / "postgres.env.example").write_text("username=mlflow\npassword=example-pw\ndatabase=mlflow\n")
    env = tmp_path / "postgres.env"
    env.write_text("# real values\nusername=ml@flow\npassword=CHANGE-ME\n")
    errors = check_secret_env(env)
    assert len(errors) == 3
    assert any("database missing" in e for e in errors)
    assert any("password is a placeholder" in e for e in errors)
    assert any("username 'ml@flow'" in e and "URI" in e for e in errors)
    assert all("postgres.env" in e for e in errors)
    env.write_text("username=mlflow\npassword=\ndatabase=mlflow\n")
    assert [e for e in check_secret_env(env) if "password is a placeholder ('')" in e]


def test_the_secret_check_accepts_real_values(tmp_path):
    """A filled-in file passes: the example's user and database names may stay, the password may not."""
    (tmp_path / "postgres.env.example").write_text("username=mlflow\npassword=example-pw\ndatabase=mlflow\n")
    env = tmp_path / "postgres.env"
    env.write_text("username=mlflow\npassword=p@ss:w/rd%40\ndatabase=mlflow\n")
    assert check_secret_env(env) == []
    assert "missing" in check_secret_env(tmp_path / "s3.env")[0]


def test_render_warns_about_each_missing_secret_file(tmp_path):
    """Without the git-ignored env files an overlay still renders, with one warning per file and its fix."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    docs, warnings = render(tmp_path / "k8s" / "overlays" / "dev")
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} == {
        "unitoken-s3", "unitoken-mlflow", "unitoken-postgres"}
    assert len(warnings) == 3
    for name, warning in zip(("s3", "mlflow", "postgres"), warnings):
        assert f"secrets/{name}.env: missing" in warning and "cp " in warning and f"{name}.env.example" in warning


def test_prod_images_are_pinned_by_digest(rendered):
    """Every container image prod runs is pinned by @sha256 digest; dev may use tags."""
    assert not [e for e in check_images(rendered["prod"], require_digests=True) if "not pinned" in e]
    assert [e for e in check_images(rendered["dev"], require_digests=True) if "not pinned" in e]


def test_the_committed_prod_digests_are_refused_as_placeholders(rendered):
    """The release gate refuses the committed all-zero digests, naming each object and image."""
    errors = check_images(rendered["prod"])
    assert sorted(e.split(":")[0] for e in errors) == [
        "Deployment/champion", "Deployment/mlflow", "StatefulSet/postgres", "TrainingRuntime/unitoken-deepspeed"]
    real = copy.deepcopy(rendered["prod"])
    for doc in real:
        for template in _pod_templates(doc):
            for c in template["spec"]["containers"]:
                c["image"] = c["image"].split("@")[0] + "@sha256:" + "0123456789abcdef" * 4
    assert check_images(real, require_digests=True) == []


# ---------------------------------------------------------------------------------------------
# config, storage, network, RBAC


def test_mlflow_gets_the_database_password_outside_the_uri(rendered):
    """MLflow's backend URI names no password; libpq reads it from PGPASSWORD (the postgres secret)."""
    container = _find(rendered["dev"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v for v in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql://$(PG_USER)@postgres:5432/$(PG_DB)"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "unitoken-postgres", "key": "password"}
    assert not any("PASSWORD" in a for a in container["command"] + container["args"])


def test_each_overlay_sets_the_s3_endpoint(rendered):
    """The base's endpoint never resolves (.invalid); dev points at the SeaweedFS Service, prod at HTTPS."""
    endpoint = {layer: _find(rendered[layer], "ConfigMap", "unitoken-config")["data"]["AWS_ENDPOINT_URL"]
                for layer in LAYERS}
    assert urlsplit(endpoint["base"]).hostname.endswith(".invalid")
    service = _find(rendered["dev"], "Service", "seaweedfs-s3")
    assert urlsplit(endpoint["dev"]).netloc == (
        f"seaweedfs-s3.{service['metadata']['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}")
    assert urlsplit(endpoint["prod"]).scheme == "https" and not endpoint["prod"].endswith(".invalid")


def test_checkpoint_volume_storage_class_is_the_overlays(rendered):
    """The base PVC is RWX with no class; prod names an RWX class; dev asks for less space."""
    pvc = {layer: _find(rendered[layer], "PersistentVolumeClaim", "unitoken-checkpoints")["spec"] for layer in LAYERS}
    assert pvc["base"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in pvc["base"]
    assert pvc["prod"]["storageClassName"]
    size = {layer: parse_quantity(spec["resources"]["requests"]["storage"]) for layer, spec in pvc.items()}
    assert size["dev"] < size["base"] == size["prod"]


@pytest.mark.parametrize("layer", OVERLAYS)
def test_network_policies_select_the_right_pods(rendered, layer):
    """Postgres takes 5432 from MLflow only; MLflow 5000, SeaweedFS 8333 and the champion's server 8080
    from this namespace's pods; each policy selects exactly one workload, so other pods (KFP steps,
    trainers) stay unrestricted."""
    docs = rendered[layer]
    labels = {d["metadata"]["name"]: t.get("metadata", {}).get("labels", {}) for d in docs for t in _pod_templates(d)}
    expected = {"postgres": ("postgres", {"app.kubernetes.io/name": "mlflow"}, 5432),
                "mlflow": ("mlflow", {}, 5000), "champion": ("champion", {}, 8080)}
    if layer == "dev":
        expected["seaweedfs"] = ("seaweedfs", {}, 8333)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == set(expected)
    for name, (target, source, port) in expected.items():
        spec = policies[name]
        assert spec["policyTypes"] == ["Ingress"]
        assert [w for w, lab in labels.items() if _selects(spec["podSelector"], lab)] == [target]
        [rule] = spec["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        assert rule["from"] == [{"podSelector": {"matchLabels": source} if source else {}}]


def test_rbac_is_least_privilege(rendered):
    """The pipeline's account manages TrainJobs and reads only KFP's launcher ConfigMap and artifact
    Secret by name, records Argo task results; the trainer account has no access; nothing cluster-wide."""
    docs = rendered["dev"]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {d["metadata"]["name"]: d["rules"] for d in docs if d["kind"] == "Role"}
    assert roles == {
        "unitoken-trainjobs": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                                "verbs": ["create", "get", "list", "watch", "delete"]}],
        "unitoken-kfp-run": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlpipeline-minio-artifact"],
             "verbs": ["get"]},
            {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}]}
    bindings = {d["roleRef"]["name"]: d["subjects"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {role: [{"kind": "ServiceAccount", "name": "unitoken-pipeline", "namespace": "unitoken"}]
                        for role in roles}
    trainer = _find(docs, "ServiceAccount", "unitoken-trainer")
    assert trainer["automountServiceAccountToken"] is False


def test_the_release_gate_lists_every_problem(tmp_path, capsys):
    """`python -m unitoken.pipeline.manifests <overlay> --require-digests` exits 1 naming missing env files
    and placeholder digests."""
    from unitoken.pipeline.manifests import main

    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    assert main([str(tmp_path / "k8s" / "overlays" / "prod"), "--require-digests"]) == 1
    out = capsys.readouterr().out
    assert all(f"secrets/{name}.env: missing" in out for name in ("s3", "mlflow", "postgres"))
    assert out.count("placeholder digest") == 4


# ---------------------------------------------------------------------------------------------
# serving the champion (k8s/components/serving)


@pytest.fixture(scope="module")
def registered_name() -> str:
    """The name the pipeline registers its model under (its `model_name` default, from the compiled IR)."""
    from pipelines.unitoken_training import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", (1, 2, 3), None)
        ir = next(yaml.safe_load_all(Path(package).read_text()))
    return ir["root"]["inputDefinitions"]["parameters"]["model_name"]["defaultValue"]


def _champion(docs: list[dict]) -> tuple[dict, dict]:
    """The serving Deployment's pod spec and its one container."""
    pod = _find(docs, "Deployment", "champion")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def _flags(args: list[str]) -> dict[str, str]:
    """The `--flag value` pairs of a command line whose every flag takes a value."""
    assert len(args) % 2 == 0 and all(a.startswith("-") for a in args[::2]), args
    return dict(zip(args[::2], args[1::2]))


def _container_port(container: dict, ref: int | str) -> int:
    """A probe's or Service's port (number or name), resolved against the container's ports."""
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    number = ports[ref] if isinstance(ref, str) else ref
    assert number in ports.values(), (ref, ports)
    return number


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_champion_is_served_by_mlflow(rendered, registered_name, layer):
    """The serving Deployment runs `mlflow models serve` on the pipeline's registered model at alias
    champion, in the image's own environment (--env-manager local), on all addresses, one worker,
    the container's port, from the same image as MLflow and the pipeline."""
    _, c = _champion(rendered[layer])
    assert c["command"] == ["mlflow", "models", "serve"]
    flags = _flags(c["args"])
    assert flags["-m"] == f"models:/{registered_name}@champion" == "models:/unitoken@champion"
    assert (flags["--env-manager"], flags["--host"], flags["--workers"]) == ("local", "0.0.0.0", "1")
    assert [int(flags["--port"])] == [p["containerPort"] for p in c["ports"]]
    mlflow = _find(rendered[layer], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == mlflow["image"]


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_champion_pod_is_restricted_with_a_writable_tmp(rendered, layer):
    """The serving pod passes the restricted checker as uid/gid 10001 on a read-only root; /tmp, where
    MLflow downloads the model and HOME and the caches point, is an emptyDir; no telemetry, no hub."""
    pod, c = _champion(rendered[layer])
    assert restricted_violations(pod) == [] and _restricted_violations(pod) == []
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)
    [tmp] = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp)
    env = {v["name"]: v.get("value") for v in c["env"]}
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME"):
        assert env[key] == "/tmp" or env[key].startswith("/tmp/"), key
    assert (env["MLFLOW_DISABLE_TELEMETRY"], env["HF_HUB_OFFLINE"]) == ("true", "1")


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_champion_probes_wait_for_the_model(rendered, layer):
    """Startup and readiness GET /ping, liveness GET /health, on the server's port; the startup probe
    allows at least 10 minutes (downloading and loading a 7B model) before liveness may restart it."""
    _, c = _champion(rendered[layer])
    port = int(_flags(c["args"])["--port"])
    probes = {name: c[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {name: (p["httpGet"]["path"], _container_port(c, p["httpGet"]["port"])) for name, p in probes.items()} == {
        "startupProbe": ("/ping", port), "readinessProbe": ("/ping", port), "livenessProbe": ("/health", port)}
    startup = probes["startupProbe"]
    assert startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) >= 600


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_champion_service_targets_the_server(rendered, layer):
    """Service champion (ClusterIP, port 80) selects the serving pods alone and targets the server's
    port; MLflow's Service does not select them."""
    docs = rendered[layer]
    _, c = _champion(docs)
    svc = _find(docs, "Service", "champion")["spec"]
    assert svc.get("type", "ClusterIP") == "ClusterIP"
    [port] = svc["ports"]
    assert port["port"] == 80 and _container_port(c, port["targetPort"]) == int(_flags(c["args"])["--port"])
    labels = {d["metadata"]["name"]: t.get("metadata", {}).get("labels", {}) for d in docs for t in _pod_templates(d)}
    assert [w for w, lab in labels.items() if _selects({"matchLabels": svc["selector"]}, lab)] == ["champion"]
    assert _selects(_find(docs, "Deployment", "champion")["spec"]["selector"], labels["champion"])
    assert not _selects({"matchLabels": _find(docs, "Service", "mlflow")["spec"]["selector"]}, labels["champion"])


@pytest.mark.parametrize("layer", OVERLAYS)
def test_the_champion_reaches_mlflow_through_an_allowed_host(rendered, layer):
    """The serving pod reads MLFLOW_TRACKING_URI from unitoken-config (the value the pipeline's cluster
    config gives its steps): the mlflow Service by a host:port MLflow's Host check admits. MLflow
    proxies artifacts, so the pod reads only MLflow's credentials, no S3 keys."""
    docs = rendered[layer]
    _, c = _champion(docs)
    ref = next(v for v in c["env"] if v["name"] == "MLFLOW_TRACKING_URI")["valueFrom"]["configMapKeyRef"]
    config = _find(docs, "ConfigMap", ref["name"])["data"]
    assert config[ref["key"]] == load_cluster(ROOT / "examples" / "cluster.yaml").env["MLFLOW_TRACKING_URI"]
    uri = urlsplit(config[ref["key"]])
    allowed = [h.strip() for h in config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    assert any(fnmatch(uri.netloc, pattern) for pattern in allowed), (uri.netloc, allowed)
    service = _find(docs, "Service", "mlflow")
    assert uri.hostname.split(".")[:2] == [service["metadata"]["name"], service["metadata"]["namespace"]]
    assert uri.port == service["spec"]["ports"][0]["port"]
    server = _find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert "--no-serve-artifacts" not in server["command"] + server["args"]
    assert "MLFLOW_ARTIFACTS_DESTINATION" in {v["name"] for v in server["env"]}
    refs = {v["valueFrom"]["secretKeyRef"]["name"] for v in c["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert refs == {"unitoken-mlflow"}


def test_the_champion_gets_one_gpu_in_prod_and_the_cpu_in_dev(rendered):
    """prod: one GPU, placed like the cluster config's GPU steps (node selector, tolerations); dev: CPU
    only, with no GPU placement."""
    gpu = load_cluster(ROOT / "examples" / "cluster.yaml").resources("evaluate")
    pod, c = _champion(rendered["prod"])
    assert c["resources"]["requests"][gpu.gpu_resource] == c["resources"]["limits"][gpu.gpu_resource] == 1
    assert pod["nodeSelector"] == gpu.node_selector and pod["tolerations"] == gpu.tolerations
    pod, c = _champion(rendered["dev"])
    assert not [k for part in c["resources"].values() for k in part if k.endswith("/gpu")]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_dev_secrets_are_generated_and_the_dev_overlay_renders_as_the_readme_writes_it(tmp_path):
    """`python -m unitoken.pipeline.manifests k8s/overlays/dev --generate-dev-secrets` (README) writes
    the three env files with fresh random secrets, after which the dev overlay passes the secret
    check and renders with no warning; a second run keeps them; prod refuses to be generated."""
    from unitoken.pipeline.manifests import generate_dev_secrets, main

    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    dev, prod = tmp_path / "k8s" / "overlays" / "dev", tmp_path / "k8s" / "overlays" / "prod"
    assert main([str(dev), "--generate-dev-secrets"]) == 0
    files = secret_env_files(dev)
    assert all(p.is_file() and oct(p.stat().st_mode & 0o777) == "0o600" for p in files)
    assert [e for p in files for e in check_secret_env(p)] == []
    first = {p.name: p.read_text() for p in files}
    assert generate_dev_secrets(dev) == [] and {p.name: p.read_text() for p in files} == first
    assert first["postgres.env"].startswith("# ") and "username=mlflow" in first["postgres.env"]
    docs, warnings = render(dev)
    assert warnings == [] and {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"} >= {"unitoken-s3"}
    with pytest.raises(ValueError, match="not a dev overlay; fix: production secrets are yours to set"):
        generate_dev_secrets(prod)
    assert any("missing" in e for e in check_overlay(prod))
