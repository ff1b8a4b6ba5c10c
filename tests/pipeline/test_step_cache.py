"""Content-addressed step caching (unitoken/pipeline/cache.py) at the step-function level: the
tiny recipe on a dozen synthetic scenes, MLflow in a sqlite store, each step as the pipeline
component calls it. The training-stage case starts DeepSpeed, so it runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unitoken.pipeline import steps
from unitoken.pipeline.cache import StepCache, tree_files

ROOT = Path(__file__).resolve().parents[2]
EVAL = dict(suites="shapes-vqa", limit=2)  # generation suites cost seconds per item on the CPU


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def mlflow_home(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store)


def _runs(client, parent):
    exp = client.get_experiment_by_name("unitoken").experiment_id
    return {r.info.run_name: r for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")}


def _front(tmp, name, data, cache, tokenizer=False, evaluate=False):
    """validate -> [tokenizer ->] init -> pretokenize [-> evaluate the init model], as one pipeline
    run (without ``tokenizer`` the model keeps the recipe's initial VQ: training one costs ~5-9 s)."""
    out = tmp / name
    parent = steps.open_pipeline_run(f"{tmp.name}-{name}", name, {})
    steps.validate(str(data), out / "dataset", parent)
    res = {}
    if tokenizer:
        res["tokenizer"] = steps.tokenizer(out / "dataset", "tiny", [], "", 3, out / "tok", parent, batch_size=4,
                                           cache=cache)
    steps.init_model("tiny", [], out / "tok" if tokenizer else None, "", out / "model")
    res["pretokenize"] = steps.pretokenize_worker(out / "dataset", out / "model", out / "shards", parent, cache=cache)
    steps.pretokenize_merge([out / "shards"], out / "tokens", parent, [res["pretokenize"]["cache"]])
    if evaluate:
        res["evaluate"] = steps.evaluate(out / "model", out / "dataset", EVAL["suites"], EVAL["limit"], out / "eval",
                                         parent, "init", cache=cache)
    return parent, out, res


def test_rerun_reuses_expensive_steps_and_changed_data_recomputes(tmp_path, mlflow_home, monkeypatch):
    """Unchanged inputs: pre-tokenisation is a cache hit (the code that computes it is not
    called), its output byte-identical, and the hit is a nested MLflow run naming the key and the
    run that computed it. One changed image (a new data digest) gives another key and a
    recompute; --no-cache recomputes too. (Evaluation, tokenizer and stage: the extended test.)"""
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "data", 12)
    cache = StepCache(tmp_path / "cache")
    first_parent, first, res1 = _front(tmp_path, "job-1", tmp_path / "data", cache)
    assert {r["cache"] for r in res1.values()} == {"miss"}
    first_runs = _runs(mlflow_home, first_parent)

    # a re-run must not train, encode or evaluate anything
    import unitoken.data.pretokenize

    def refuse(*a, **k):
        raise AssertionError("recomputed although the inputs are unchanged")

    with monkeypatch.context() as m:
        m.setattr(unitoken.data.pretokenize, "pretokenize", refuse)
        parent, second, res2 = _front(tmp_path, "job-2", tmp_path / "data", cache)
    assert {r["cache"] for r in res2.values()} == {"hit"}
    assert res2["pretokenize"]["cache_key"] == res1["pretokenize"]["cache_key"]
    assert tree_files(second / "tokens") == tree_files(first / "tokens")
    runs = _runs(mlflow_home, parent)
    _assert_hit_runs(runs, first_runs, first_parent, ["pretokenize-w0"])
    assert runs["pretokenize"].data.tags["unitoken.cache"] == "hit"  # the merge: every worker was a hit

    # one image changed: another data digest, another key, computed again (pre-tokenisation with
    # the same model stands for every step: they all key on the digest)
    image = tmp_path / "data" / json.loads((tmp_path / "data" / "manifest.jsonl").read_text().splitlines()[0])["image"][0]
    from PIL import Image

    img = Image.open(image).convert("RGB")
    img.putpixel((0, 0), (255 - img.getpixel((0, 0))[0], 0, 0))
    img.save(image)
    steps.validate(str(tmp_path / "data"), tmp_path / "changed", parent)
    res3 = steps.pretokenize_worker(tmp_path / "changed", first / "model", tmp_path / "tokens3", parent, cache=cache)
    assert res3["cache"] == "miss" and res3["cache_key"] != res1["pretokenize"]["cache_key"]

    # --no-cache: computed again although an entry exists
    res4 = steps.pretokenize_worker(tmp_path / "changed", first / "model", tmp_path / "tokens4", parent,
                                    cache=StepCache(tmp_path / "cache", reuse=False))
    assert res4["cache"] == "miss" and res4["cache_key"] == res3["cache_key"]


def _assert_hit_runs(runs, first_runs, first_parent, names):
    for name in names:
        tags = runs[name].data.tags
        assert runs[name].info.status == "FINISHED"
        assert tags["unitoken.cache"] == "hit" and tags["unitoken.cache_key"] == first_runs[name].data.tags["unitoken.cache_key"]
        assert tags["unitoken.cache_source_run"] == first_runs[name].info.run_id
        assert tags["unitoken.cache_source_pipeline_run"] == first_parent


def _entry_with(tmp_path, client, n=[0]):
    """A cached output of a small step through the same code path the pipeline's steps use."""
    calls = []

    def compute(tags):
        calls.append(tags)
        (out / "sub").mkdir(parents=True, exist_ok=True)
        (out / "a.bin").write_bytes(b"payload" * 100)
        (out / "sub" / "b.json").write_text('{"x": 1}')
        return {"value": 42}, "run-that-computed"

    n[0] += 1
    out = tmp_path / f"out{n[0]}"
    cache = StepCache(tmp_path / "cache")
    res = steps.cached_step("toy", "toy", lambda: {"data_sha256": "d1"}, out, cache, "", compute)
    return cache, res, calls


@pytest.mark.parametrize("damage", ["flip-byte", "delete-file", "extra-file", "truncated-record", "no-record"])
def test_corrupt_or_incomplete_entries_are_never_reused(tmp_path, mlflow_home, damage):
    """A cached output whose files no longer match its record (changed, missing, added) or whose
    record is truncated or missing is not reused: the step recomputes and its store replaces the
    entry; a clean entry is reused."""
    cache, res, calls = _entry_with(tmp_path, mlflow_home)
    assert res["cache"] == "miss" and len(calls) == 1
    entry = tmp_path / "cache" / "toy" / res["cache_key"]
    again = steps.cached_step("toy", "toy", lambda: {"data_sha256": "d1"}, tmp_path / "o2", cache, "",
                              lambda tags: calls.append(tags) or ({}, None))
    assert again["cache"] == "hit" and again["value"] == 42 and len(calls) == 1
    if damage == "flip-byte":
        data = bytearray((entry / "output" / "a.bin").read_bytes())
        data[10] ^= 1
        (entry / "output" / "a.bin").write_bytes(bytes(data))
    elif damage == "delete-file":
        (entry / "output" / "sub" / "b.json").unlink()
    elif damage == "extra-file":
        (entry / "output" / "stray.txt").write_text("x")
    elif damage == "truncated-record":
        (entry / "cache.json").write_text((entry / "cache.json").read_text()[:40])
    else:
        (entry / "cache.json").unlink()
    out = tmp_path / "o3"

    def recompute(tags):
        calls.append(tags)
        out.mkdir()
        (out / "fresh").write_text("1")
        return {"value": 7}, "r2"

    res = steps.cached_step("toy", "toy", lambda: {"data_sha256": "d1"}, out, cache, "", recompute)
    assert res["cache"] == "miss" and res["value"] == 7 and len(calls) == 2
    assert calls[-1]["unitoken.cache"] == "miss"
    assert json.loads((entry / "cache.json").read_text())["summary"] == {"value": 7}  # replaced by the fresh output
    assert not [p for p in (tmp_path / "cache" / "toy").iterdir() if p.name.startswith(".tmp")]


def test_a_killed_writer_leaves_no_entry(tmp_path, mlflow_home, monkeypatch):
    """The entry appears only by the final rename: a writer that dies before it leaves debris
    that is never read as an entry (the next run computes and stores)."""
    import unitoken.pipeline.cache as cache_mod

    real = Path.rename

    def die(self, target):
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed before the rename")
        return real(self, target)

    monkeypatch.setattr(cache_mod.Path, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        _entry_with(tmp_path, mlflow_home)
    monkeypatch.setattr(cache_mod.Path, "rename", real)
    toy = tmp_path / "cache" / "toy"
    assert [p.name[:5] for p in toy.iterdir()] == [".tmp-"]
    _, res, calls = _entry_with(tmp_path, mlflow_home)
    assert res["cache"] == "miss" and len(calls) == 1


def test_keys_follow_every_input(tmp_path):
    """The key changes with the data, the recipe overrides, the step and the code; not with paths."""
    from unitoken.pipeline.cache import cache_key, code_digest

    base = {"data_sha256": "d", "recipe_sha256": "r"}
    assert cache_key("stage1", base) == cache_key("stage1", dict(reversed(list(base.items()))))
    others = [cache_key("stage1", {**base, "data_sha256": "e"}), cache_key("stage1", {**base, "recipe_sha256": "s"}),
              cache_key("stage2", base)]
    assert len({cache_key("stage1", base), *others}) == 4
    from unitoken.config import config_hash
    from unitoken.recipes import get_recipe

    assert config_hash(get_recipe("tiny", ["train.seed=1"])) != config_hash(get_recipe("tiny", []))
    assert len(code_digest()) == 64


STEP_MODULES = ["unitoken.pipeline.steps.data", "unitoken.pipeline.steps.train", "unitoken.pipeline.steps.evaluate"]


def test_the_code_in_the_key_is_the_code_a_step_runs(tmp_path):
    """A --help text (the CLI) or the rehearsal changes no step's key; a change to model code
    changes every step's that runs it, and a change to training code the stage's (and not the
    data steps')."""
    import shutil

    from unitoken.pipeline.cache import code_digest

    root = Path(__file__).resolve().parents[2]
    copy = tmp_path / "src"
    shutil.copytree(root / "unitoken", copy / "unitoken", ignore=shutil.ignore_patterns("__pycache__"))

    def digests():
        code_digest.cache_clear()
        return {m: code_digest(m, copy) for m in STEP_MODULES}

    def edit(rel: str, old: str, new: str) -> None:
        path = copy / "unitoken" / rel
        text = path.read_text()
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1))

    before = digests()
    edit("cli/train.py", '"""', '"""Edited help. ')
    edit("pipeline/rehearse.py", '"""', '"""Edited. ')
    assert digests() == before
    edit("model/loss.py", '"""', '"""Edited model code. ')
    after_model = digests()
    assert all(after_model[m] != before[m] for m in STEP_MODULES)
    edit("train/batching.py", '"""', '"""Edited training code. ')
    after_train = digests()
    assert after_train["unitoken.pipeline.steps.train"] != after_model["unitoken.pipeline.steps.train"]
    assert after_train["unitoken.pipeline.steps.data"] == after_model["unitoken.pipeline.steps.data"]
    code_digest.cache_clear()


STAGE_DRIVER = """
import json, sys
from pathlib import Path
from unitoken.pipeline import steps
from unitoken.pipeline.cache import StepCache
a = json.loads(sys.argv[1])
res = steps.train_stage(1, "tiny", a["overrides"], Path(a["tokens"]), Path(a["init"]), Path(a["out"]),
                        Path(a["work"]), a["parent"], max_steps=2, cache=StepCache(a["cache"]))
print("RESULT " + json.dumps(res))
"""


@pytest.mark.extended
def test_stage_rerun_reuses_the_handoff_and_a_changed_override_retrains(tmp_path, mlflow_home):
    """The VQ tokenizer, an evaluation and stage 1 computed once; the same inputs again give the
    same tokenizer, the same scores and the same verified hand-off without computing (its MLflow run points at the training run, which the hand-off also names, so the
    registry's lineage is intact); another override trains again."""
    from unitoken.data.synth import synthesize
    from unitoken.model.handoff import verify_handoff

    synthesize(tmp_path / "data", 12)
    cache = tmp_path / "cache"
    first_parent, first, res1 = _front(tmp_path, "job-t", tmp_path / "data", StepCache(cache), tokenizer=True,
                                       evaluate=True)
    parent, front, res2 = _front(tmp_path, "job-s", tmp_path / "data", StepCache(cache), tokenizer=True,
                                 evaluate=True)
    assert {r["cache"] for r in res1.values()} == {"miss"} and {r["cache"] for r in res2.values()} == {"hit"}
    for step, sub in (("tokenizer", "tok"), ("evaluate", "eval")):
        assert tree_files(front / sub) == tree_files(first / sub), step
    runs, first_runs = _runs(mlflow_home, parent), _runs(mlflow_home, first_parent)
    _assert_hit_runs(runs, first_runs, first_parent, ["tokenizer", "pretokenize-w0", "eval-init"])
    assert runs["eval-init"].data.metrics == first_runs["eval-init"].data.metrics  # scores read the same
    assert {k: v for k, v in res2["evaluate"].items() if not k.startswith("cache")} == \
        {k: v for k, v in res1["evaluate"].items() if not k.startswith("cache")}

    def stage(name, overrides):
        args = {"overrides": overrides, "tokens": str(front / "tokens"), "init": str(front / "model"),
                "out": str(tmp_path / name / "handoff"), "work": str(tmp_path / name / "work"), "parent": parent,
                "cache": str(cache)}
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", STAGE_DRIVER, json.dumps(args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        return json.loads(line[7:])

    first = stage("a", [])
    assert first["cache"] == "miss" and (tmp_path / "a" / "work" / "handoff" / "handoff.json").is_file()
    again = stage("b", [])
    assert again["cache"] == "hit" and not (tmp_path / "b" / "work").exists()  # nothing trained
    doc = verify_handoff(tmp_path / "b" / "handoff")
    assert doc["mlflow_run_id"] == first["mlflow_run_id"] == again["cache_source_run"]
    assert tree_files(tmp_path / "b" / "handoff") == tree_files(tmp_path / "a" / "handoff")
    runs = mlflow_home.search_runs([mlflow_home.get_experiment_by_name("unitoken").experiment_id],
                                   f"tags.`mlflow.parentRunId` = '{parent}' and attributes.run_name = 'stage1'")
    by_cache = {r.data.tags.get("unitoken.cache"): r for r in runs}
    assert set(by_cache) == {"miss", "hit"}
    assert by_cache["miss"].info.run_id == first["mlflow_run_id"]
    assert by_cache["hit"].data.tags["unitoken.handoff_sha256"] == by_cache["miss"].data.tags["unitoken.handoff_sha256"]
    changed = stage("c", ["train.seed=5"])
    assert changed["cache"] == "miss" and changed["cache_key"] != first["cache_key"]


def test_compiled_pipeline_turns_kfp_caching_off_and_takes_use_cache(tmp_path):
    """Every task of the compiled pipeline has KFP's cache off (it would key on URIs, not
    contents), and ``use_cache`` is a pipeline parameter (default true) that reaches each cached step."""
    import yaml

    from pipelines.unitoken_training import compile_pipeline

    doc = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml").read_text())
    assert doc["root"]["inputDefinitions"]["parameters"]["use_cache"]["defaultValue"] is True
    tasks = {k: v for c in [doc["root"], *doc["components"].values()] for k, v in c.get("dag", {}).get("tasks", {}).items()}
    executed = {k: v for k, v in tasks.items() if "componentRef" in v and not k.startswith(("condition", "exit-handler", "for-loop"))}
    assert len(executed) == 15  # the pretokenize workers (one ParallelFor task) and their merge among them
    assert all(not v.get("cachingOptions", {}).get("enableCache") for v in executed.values())
    takes = {k for k, v in executed.items() if "use_cache" in v.get("inputs", {}).get("parameters", {})}
    assert takes == {"train-tokenizer", "pretokenize", "train-stage1", "train-stage2", "train-stage3", "evaluate-stage1",
                     "evaluate-stage2", "evaluate-stage3"}


def test_on_a_cluster_every_cached_step_mounts_the_cache_volume(tmp_path):
    """With a checkpoint PVC the cache root is on it, and every step that reads or writes the cache
    mounts it (a path on the pod's own, read-only, filesystem would never be reused)."""
    import yaml

    from pipelines.unitoken_training import compile_pipeline
    from unitoken.pipeline.cluster import load_cluster

    cluster = load_cluster(ROOT / "examples" / "cluster.yaml")
    doc, spec = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", cluster=cluster).read_text())
    tasks = {k: v for c in [doc["root"], *doc["components"].values()] for k, v in c.get("dag", {}).get("tasks", {}).items()}
    platform = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    cached = {k: v for k, v in tasks.items() if "use_cache" in v.get("inputs", {}).get("parameters", {})}
    assert len(cached) == 8
    for name, task in cached.items():
        mounts = platform[f"exec-{task['componentRef']['name'][5:]}"].get("pvcMount", [])
        assert [m["mountPath"] for m in mounts] == [cluster.checkpoint_mount], name
        params = task["inputs"]["parameters"]
        root = params["cache_root"]["runtimeValue"]["constant"] if "cache_root" in params else \
            params["checkpoint_root"]["runtimeValue"]["constant"] + "/cache"
        assert root == cluster.checkpoint_mount.rstrip("/") + "/cache", name
