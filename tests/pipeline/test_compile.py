"""Every pipeline compiles, loads back, and carries the cluster settings where they belong."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from unitoken.config import ConfigError
from unitoken.pipeline.cluster import CPU_STEPS, GPU_STEPS, cluster_from_dict, load_cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
VARIANTS = [(1, 2, 3), (2, 3), (3,)]


def _compile(tmp_path, stages, cluster=None):
    from pipelines.unitoken_training import compile_pipeline

    out = compile_pipeline(tmp_path / f"p{''.join(map(str, stages))}.yaml", stages, cluster)
    docs = list(yaml.safe_load_all(out.read_text()))
    return out, docs[0], (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {})


def _tasks(spec) -> dict[str, str]:
    """step (display) name -> executor label, over every DAG in the pipeline."""
    comps = spec["components"]
    found = {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in comps.values() if "dag" in c]
    for dag in dags:
        for task in dag["tasks"].values():
            comp = comps[task["componentRef"]["name"]]
            if "executorLabel" in comp:
                found[task["taskInfo"]["name"]] = comp["executorLabel"]
    return found


@pytest.mark.parametrize("stages", VARIANTS)
def test_every_pipeline_compiles_and_loads_back(tmp_path, stages):
    """Plain compile of each stage variant; the kfp SDK reads the YAML back as a component."""
    from kfp import components

    out, spec, _ = _compile(tmp_path, stages)
    loaded = components.load_component_from_file(str(out))
    assert {"data_uri", "recipe", "mixture_ratio", "gate_policy", "base_model"} <= set(loaded.component_spec.inputs)
    names = set(_tasks(spec))
    assert {f"train-stage{n}" for n in stages} <= names
    assert not {f"train-stage{n}" for n in (1, 2, 3) if n not in stages} & names
    assert ("train-tokenizer" in names) == (stages[0] == 1)
    assert {"validate-data", "pretokenize", "gate", "register-model", "open-run", "close-run"} <= names


def test_bad_stage_lists_are_refused():
    """Stages must be consecutive and end at 3."""
    from pipelines.unitoken_training import build_pipeline

    for bad in [(1, 3), (2,), ()]:
        with pytest.raises(ValueError, match="consecutive"):
            build_pipeline(bad)


def test_every_component_module_compiles(tmp_path):
    """Each components/<name>/component.py holds one compilable component."""
    from kfp import compiler

    names = sorted(p.parent.name for p in (ROOT / "components").glob("*/component.py"))
    assert len(names) == 11
    for name in names:
        module = importlib.import_module(f"components.{name}.component")
        compiler.Compiler().compile(getattr(module, name), str(tmp_path / f"{name}.yaml"))
        assert yaml.safe_load((tmp_path / f"{name}.yaml").read_text())["deploymentSpec"]


def test_gpu_settings_on_gpu_steps_only(tmp_path):
    """Accelerators, node selectors, tolerations and priority labels land on GPU steps and never on CPU
    steps; the PVC on training steps; secrets, image and env on every step."""
    cluster = load_cluster(EXAMPLE)
    _, spec, platform = _compile(tmp_path, (1, 2, 3), cluster)
    executors = spec["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    seen_gpu = 0
    for step, label in tasks.items():
        base = step.removesuffix(f"-stage{step[-1]}") if step.startswith("evaluate-stage") else step
        container = executors[label]["container"]
        k8s = platform.get(label, {})
        accel = container.get("resources", {}).get("accelerator")
        assert container["image"] == cluster.image
        assert k8s["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}, step
        assert {e["name"] for e in container.get("env", [])} >= set(cluster.env)
        secrets = {s["secretName"]: {kv["envVar"] for kv in s["keyToEnv"]} for s in k8s.get("secretAsEnv", [])}
        assert secrets == {"unitoken-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "unitoken-mlflow": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}, step
        if base in CPU_STEPS:
            assert accel is None and "nodeSelector" not in k8s and "tolerations" not in k8s, step
            assert "podMetadata" not in k8s and "pvcMount" not in k8s, step
            assert container["resources"]["cpuLimit"] == 2.0, step
        else:
            assert base in GPU_STEPS, step
            r = cluster.resources(base)
            if r.num_nodes == 1:
                assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}, step
                assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu", step
                labels = k8s["podMetadata"]["labels"]
                assert labels["kueue.x-k8s.io/priority-class"] == r.workload_priority_class, step
                assert accel["resourceType"] == "nvidia.com/gpu" and int(accel["resourceCount"]) == r.gpus, step
                seen_gpu += 1
            else:  # the pod only watches its TrainJob, which gets the GPUs and the placement
                assert accel is None and "nodeSelector" not in k8s and "tolerations" not in k8s, step
                assert "podMetadata" not in k8s, step
                assert container["resources"]["resourceCpuLimit"] == cluster.launcher.cpu, step
                assert container["resources"]["resourceMemoryLimit"] == cluster.launcher.memory, step
            shm = [m for m in k8s.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
            assert bool(shm) == (r.gpus > 1 and r.num_nodes == 1), step
            assert not shm or shm[0]["medium"] == "Memory", step
        if base.startswith("train-stage"):
            assert k8s["pvcMount"][0]["constant"] == "unitoken-checkpoints", step
            assert k8s["pvcMount"][0]["mountPath"] == "/mnt/checkpoints", step
            assert int(k8s["activeDeadlineSeconds"]) == cluster.resources(base).timeout_s
    assert seen_gpu >= 6  # tokenizer, pretokenize, stage 1 and 3, evaluations, gate
    assert len(tasks) == len(executors) or set(tasks.values()) <= set(executors)
    policies = [t.get("retryPolicy") for c in spec["components"].values() if "dag" in c
                for name, t in c["dag"]["tasks"].items() if name.startswith("train-stage")]
    assert policies and all(p and p["maxRetryCount"] == 3 for p in policies)


def test_pretokenize_fans_out_with_the_parallelism_of_the_cluster_config(tmp_path):
    """Pre-tokenisation compiles to one ParallelFor over ``pretokenize.workers`` shard ranges whose
    parallelism limit is ``pretokenize.parallelism`` of examples/cluster.yaml; each worker is placed
    like the GPU step it was (accelerator, node selector, tolerations, checkpoint volume, retries),
    and pretokenize-merge, a CPU step, collects every worker's shards."""
    cluster = load_cluster(EXAMPLE)
    assert (cluster.pretokenize.workers, cluster.pretokenize.parallelism) == (32, 16)
    _, spec, platform = _compile(tmp_path, (1, 2, 3), cluster)
    dags = {"root": spec["root"]["dag"], **{k: c["dag"] for k, c in spec["components"].items() if "dag" in c}}
    loops = [(name, t) for dag in dags.values() for name, t in dag["tasks"].items() if "parameterIterator" in t]
    assert len(loops) == 1
    loop_name, loop = loops[0]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 16
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == list(range(32))
    body = dags[loop["componentRef"]["name"]]["tasks"]
    assert set(body) == {"pretokenize"}
    worker = body["pretokenize"]
    assert worker["inputs"]["parameters"]["worker"]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    assert worker["inputs"]["parameters"]["num_workers"]["runtimeValue"]["constant"] == 32
    assert worker["retryPolicy"]["maxRetryCount"] == cluster.resources("pretokenize").retries == 2
    executor = spec["components"]["comp-pretokenize"]["executorLabel"]
    k8s, r = platform[executor], cluster.resources("pretokenize")
    accel = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]["accelerator"]
    assert accel["resourceType"] == r.gpu_resource and int(accel["resourceCount"]) == r.gpus == 1
    assert k8s["nodeSelector"]["labels"] == r.node_selector and k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert [m["mountPath"] for m in k8s["pvcMount"]] == [cluster.checkpoint_mount]
    merge = next(t for dag in dags.values() for name, t in dag["tasks"].items() if name == "pretokenize-merge")
    assert merge["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]["producerTask"] == loop_name
    merge_exec = spec["components"][merge["componentRef"]["name"]]["executorLabel"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"][merge_exec]["container"]["resources"]
    assert "nodeSelector" not in platform[merge_exec]
    for doc, message in (({"pretokenize": {"workers": 4, "parallelism": 8}}, r"parallelism=8 > workers=4"),
                         ({"pretokenize": {"workers": 0}}, r"cluster.pretokenize.workers=0"),
                         ({"pretokenize": {"shards": 3}}, r"unknown field 'shards'")):
        with pytest.raises(ConfigError, match=message):
            cluster_from_dict(doc)


def test_without_a_cluster_config_nothing_is_scheduled(tmp_path):
    """The local/default compile carries no GPU, PVC or secret settings at all."""
    _, spec, platform = _compile(tmp_path, (1, 2, 3))
    assert platform == {}
    assert all("accelerator" not in e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values())


@pytest.mark.parametrize("doc, field", [
    ({"gpus": 1}, "unknown field 'gpus'"),
    ({"cpu": {"gpus": 1}}, "a CPU step takes no gpus"),
    ({"steps": {"validate-data": {"node_selector": {"a": "b"}}}}, "a CPU step takes no"),
    ({"steps": {"train-stage9": {}}}, "unknown step 'train-stage9'"),
    ({"steps": {"evaluate": {"num_nodes": 2}}, "checkpoint_pvc": "x"}, "only training stages run on several nodes"),
    ({"steps": {"train-stage2": {"num_nodes": 2}}}, "set cluster.checkpoint_pvc"),
    ({"gpu": {"memory": "lots"}}, "not a Kubernetes quantity"),
    ({"secrets": [{"name": "s"}]}, r"secrets\[0\]"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}, "secrets": [{"name": "s", "env": {"k": "AWS_SECRET_ACCESS_KEY"}}]},
     "keep credentials in secrets only"),
])
def test_bad_cluster_configs_name_the_field(doc, field):
    """Each bad cluster block is refused with the field and the fix."""
    with pytest.raises(ConfigError, match=field):
        cluster_from_dict(doc)


def test_example_cluster_round_trips():
    """The example file loads, and its dict form (what a multi-node step receives) loads again."""
    cluster = load_cluster(EXAMPLE)
    assert cluster_from_dict(cluster.to_json()) == cluster
    assert cluster.resources("train-stage2").num_nodes == 4
    assert cluster.resources("open-run").gpus == 0


class _FakeKfp:
    """Records what `submit`/`schedule` ask of kfp.Client (whose constructor needs a live server)."""

    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_package(self, package, arguments, experiment_name, run_name, service_account):
        self.calls.append(("run", package, arguments, experiment_name, run_name, service_account))
        return type("Run", (), {"run_id": "run-1"})()

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return type("Exp", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **kw):
        self.calls.append(("recurring", kw))
        return type("Job", (), {"recurring_run_id": "job-1"})()


def test_submit_and_schedule_pass_the_compiled_package_and_arguments(tmp_path):
    """submit starts one run of the compiled YAML; schedule creates a recurring run with a 6-field
    cron; a 5-field cron is refused with the fix before anything is sent."""
    from pipelines import launch

    package = launch.compile_pipeline(tmp_path / "p.yaml", (3,), load_cluster(EXAMPLE))
    params = launch.parse_params(["data_uri=s3://b/new", "base_model=models:/unitoken@champion", "promote=true",
                                  "eval_limit=20"])
    assert params == {"data_uri": "s3://b/new", "base_model": "models:/unitoken@champion", "promote": True,
                      "eval_limit": 20}
    fake = _FakeKfp()
    assert launch.submit("http://kfp", package, params, service_account="unitoken-pipeline", client=fake) == "run-1"
    assert fake.calls[0][1] == str(package) and fake.calls[0][2] == params
    assert fake.calls[0][5] == "unitoken-pipeline"
    assert launch.run_link("http://kfp/", "run-1") == "http://kfp/#/runs/details/run-1"
    assert launch.schedule("http://kfp", package, params, "0 0 3 * * 0", "weekly", client=fake) == "job-1"
    kw = fake.calls[-1][1]
    assert kw["cron_expression"] == "0 0 3 * * 0" and kw["experiment_id"] == "exp-1" and kw["params"] == params
    assert kw["max_concurrency"] == 1 and kw["pipeline_package_path"] == str(package)
    assert kw["no_catchup"] is True  # explicit: a paused schedule does not replay every missed week
    with pytest.raises(ValueError, match="6 fields, seconds first"):
        launch.schedule("http://kfp", package, params, "0 3 * * 0", "weekly", client=fake)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        launch.parse_params(["oops"])
