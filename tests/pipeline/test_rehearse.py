"""`unitoken pipeline rehearse`: what a cluster would see for one run, checked offline; it passes
for the example config and fails, naming the cause, for a config that breaks each rule."""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from unitoken.config import ConfigError
from unitoken.pipeline.cluster import cluster_from_dict
from unitoken.pipeline.podsecurity import restricted_violations
from unitoken.pipeline.rehearse import launcher_findings, rehearse, task_pod

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
OVERLAY = ROOT / "k8s" / "overlays" / "prod"


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())["cluster"]


def _rehearse(cluster, overlay: Path | None, package: Path | None = None):
    """``rehearse`` as the CLI runs it: on ``package``, else on the pipeline compiled for ``cluster``."""
    from pipelines.unitoken_training import compile_pipeline

    if package is not None:
        return rehearse(cluster, overlay, package)
    with tempfile.TemporaryDirectory() as tmp:
        return rehearse(cluster, overlay, compile_pipeline(Path(tmp) / "pipeline.yaml", (1, 2, 3), cluster))


def _failures(doc: dict, overlay: Path | None = OVERLAY, package: Path | None = None) -> list:
    found, _ = _rehearse(cluster_from_dict(doc), overlay, package)
    return [f for f in found if not f.ok]


def test_the_example_config_passes_from_the_cli():
    """The command users run: exit 0 for examples/cluster.yaml with the prod overlay, every rule seen."""
    done = subprocess.run([sys.executable, "-m", "unitoken.cli", "pipeline", "rehearse", "--cluster", str(EXAMPLE),
                           "--k8s", str(OVERLAY)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for rule in ("schema", "restricted", "fit", "launcher", "rbac", "run-key", "mlflow-host"):
        assert rule in done.stdout, rule
    assert "0 failed" in done.stdout


def test_a_root_task_is_refused(tmp_path):
    """run_as_user 0: every task pod breaks the restricted profile, and the CLI exits 1 saying so."""
    doc = _example() | {"run_as_user": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"cluster": doc}))
    done = subprocess.run([sys.executable, "-m", "unitoken.cli", "pipeline", "rehearse", "--cluster",
                           str(tmp_path / "c.yaml"), "--k8s", str(OVERLAY)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "runAsUser" in done.stdout and "FAIL" in done.stdout


def test_task_pods_without_a_security_context_are_refused(tmp_path):
    """The compiled pipeline before this fix (no set_security_context): KFP hardens the main
    container but leaves runAsNonRoot unset, so `restricted` refuses every task pod."""
    from pipelines.unitoken_training import compile_pipeline

    package = compile_pipeline(tmp_path / "p.yaml", (1, 2, 3), cluster_from_dict(_example()))
    docs = list(yaml.safe_load_all(package.read_text()))
    for executor in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        executor.pop("securityContext")
    package.write_text(yaml.safe_dump_all(docs))
    failed = [f for f in _failures(_example(), package=package) if f.rule == "restricted"]
    assert failed and all("runAsNonRoot" in f.detail and "main" in f.detail for f in failed)
    assert {f.subject for f in failed} >= {"task open-run", "task train-stage1", "task register-model"}


def test_a_launcher_asking_for_gpus_is_refused():
    """A GPU on the pod that only watches a TrainJob: the config says which field and why; and the
    rule itself fails a watcher pod rendered with GPU placement (as compiled before this fix)."""
    with pytest.raises(ConfigError, match=r"launcher.gpus=1.*trains nothing"):
        cluster_from_dict(_example() | {"launcher": {"gpus": 1, "cpu": "1"}})
    container = {"image": "x", "resources": {"resourceCpuLimit": "96", "accelerator": {"resourceType": "nvidia.com/gpu",
                                                                                         "resourceCount": "8"}}}
    pod = task_pod("train-stage2", container, {"nodeSelector": {"labels": {"pool": "h200"}}}, "sa")
    [finding] = launcher_findings("task train-stage2", pod["spec"], "nvidia.com/gpu")
    assert not finding.ok and "nvidia.com/gpu=8" in finding.detail


def test_a_step_asking_more_gpus_than_its_pool_has_is_refused():
    """16 GPUs on one node of an 8-GPU pool: the fit rule names the step and what the node has."""
    doc = copy.deepcopy(_example())
    doc["steps"]["train-stage1"]["gpus"] = 16
    failed = [f for f in _failures(doc) if f.rule == "fit"]
    assert [f.subject for f in failed] == ["task train-stage1"]
    assert "nvidia.com/gpu=16, a node has 8" in failed[0].detail


def test_a_multi_node_stage_larger_than_its_pool_is_refused():
    """num_nodes above the pool's node count: the TrainJob's nodes cannot all be placed."""
    doc = copy.deepcopy(_example())
    doc["steps"]["train-stage2"]["num_nodes"] = 6
    failed = [f for f in _failures(doc) if f.rule == "fit"]
    assert [f.subject for f in failed] == ["TrainJob train-stage2 node"] and "needs 6 nodes" in failed[0].detail


def test_a_reused_run_key_is_refused(tmp_path):
    """A package keyed by the run's display name (as compiled before this fix): the run-key rule
    names each task whose checkpoints, TrainJobs and MLflow parent two runs would share."""
    from pipelines.unitoken_training import compile_pipeline

    package = compile_pipeline(tmp_path / "p.yaml", (1, 2, 3), cluster_from_dict(_example()))
    package.write_text(package.read_text().replace("{{$.pipeline_job_uuid}}", "{{$.pipeline_job_name}}"))
    failed = [f for f in _failures(_example(), package=package) if f.rule == "run-key"]
    assert {f.subject for f in failed} == {"open-run", "close-run", "pretokenize", "train-stage1", "train-stage2",
                                           "train-stage3"}  # pretokenize: its workers' run directory and MLflow parent
    assert all("pipeline_job_name" in f.detail for f in failed)


def test_rbac_the_run_account_lacks_is_named(tmp_path):
    """A config naming an account the manifests do not define: each missing grant is listed."""
    failed = [f for f in _failures(_example() | {"service_account": "someone-else"}) if f.rule == "rbac"]
    details = " ".join(f.detail for f in failed)
    assert "no ServiceAccount someone-else" in details
    assert "cannot create trainjobs" in details and "cannot get configmaps/kfp-launcher" in details


def test_an_mlflow_host_the_server_refuses_is_named():
    """A tracking URI whose host:port is not in MLFLOW_SERVER_ALLOWED_HOSTS would get 403 in the cluster."""
    doc = copy.deepcopy(_example())
    doc["env"]["MLFLOW_TRACKING_URI"] = "http://mlflow.other-namespace.svc:5000"
    failed = [f for f in _failures(doc) if f.rule == "mlflow-host"]
    assert failed and "mlflow.other-namespace.svc:5000 is not in" in failed[0].detail


def test_pod_security_checker_on_known_pods():
    """The restricted checker admits a compliant pod and names each broken rule of a bad one."""
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "v", "emptyDir": {}}]}
    assert restricted_violations(good) == []
    bad = copy.deepcopy(good)
    bad["hostNetwork"] = True
    bad["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    bad["containers"][0]["securityContext"].update(privileged=True, runAsUser=0,
                                                   capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]})
    bad["initContainers"] = [{"name": "i"}]
    text = "\n".join(restricted_violations(bad))
    for rule in ("hostNamespaces", "restrictedVolumes", "privileged", "runAsUser", "capabilities: containers[c] adds",
                 "allowPrivilegeEscalation: initContainers[i]", "capabilities: initContainers[i] does not drop"):
        assert rule in text, rule


def test_without_manifests_the_pipeline_side_is_still_rehearsed():
    """No overlay: task pods, TrainJob structure and run keys are still checked, and nothing fails
    for want of the manifests (the TrainingRuntime-dependent rows are notes)."""
    found, _ = _rehearse(cluster_from_dict(_example()), None)
    assert not [f for f in found if not f.ok]
    assert {"schema", "restricted", "fit", "launcher", "run-key"} <= {f.rule for f in found}
    assert any(f.warning and "no --k8s overlay" in f.detail for f in found)
