"""The whole pipeline through kfp.local on the tiny recipe, as `make demo` runs it: every step a
subprocess, sqlite MLflow, a registered and promoted model with its lineage; then stage-scoped
retraining from the champion on new data; then a run that fails and says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LOCAL_FAST, PLANTED, local_env, local_unitoken

pytestmark = pytest.mark.slow
STEPS = {"validate", "tokenizer", "pretokenize-w0", "pretokenize", "stage1", "stage2", "stage3", "eval-stage1",
         "eval-stage2", "eval-stage3", "gate", "register-unitoken"}


FAST = LOCAL_FAST


@pytest.fixture
def home(local_home):
    return local_home


def _env(home: Path) -> dict:
    return local_env(home)


def _unitoken(home: Path, *args: str) -> subprocess.CompletedProcess:
    return local_unitoken(home, *args)


def _mlflow(home: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=_env(home)["MLFLOW_TRACKING_URI"])


def _pipeline_runs(client):
    exp = client.get_experiment_by_name("unitoken")
    return client.search_runs([exp.experiment_id], filter_string="tags.`unitoken.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


def _children(client, parent):
    exp = client.get_experiment_by_name("unitoken")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture
def first_run(local_run):
    return local_run


def test_local_pipeline_registers_a_model_with_its_whole_lineage(home, first_run):
    """One command: every step ran as a nested MLflow run of the pipeline run, the gate passed,
    the model is registered and champion, and its lineage verifies from data to version."""
    assert "model: models:/unitoken/1" in first_run.stdout
    assert "gate: PASSED" in first_run.stdout
    assert "mlflow ui --backend-store-uri" in first_run.stdout
    client = _mlflow(home)
    (parent,) = _pipeline_runs(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["unitoken.pipeline_state"] == "SUCCEEDED"
    assert parent.data.params["recipe"] == "tiny" and parent.data.params["stages"] == "1,2,3"
    assert parent.data.params["data_uri"] == str((home / ".unitoken" / "pipeline" / "data").resolve())
    children = {r.info.run_name: r for r in _children(client, parent.info.run_id)}
    assert STEPS <= set(children), sorted(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["validate"].data.metrics["clean_rows"] > 0
    assert "shapes-vqa.overall" in children["eval-stage3"].data.metrics
    # held-out loss per task on the test split: the trained model's is below stage 1's (random LLM)
    for task in ("understanding", "generation"):
        first, last = (children[f"eval-stage{n}"].data.metrics[f"heldout_loss.{task}"] for n in (1, 3))
        assert 0 < last < first, (task, first, last)
    metrics = children["eval-stage3"].data.metrics  # and per source, e.g. the stage-2 VQA answers
    assert metrics["heldout_loss.understanding.synth-vqa"] > 0 and metrics["heldout_loss.generation.synth-t2i"] > 0
    assert str(client.get_registered_model("unitoken").aliases["champion"]) == "1"

    lineage = _unitoken(home, "lineage", "models:/unitoken@champion", "--json")
    assert lineage.returncode == 0, lineage.stderr
    info = json.loads(lineage.stdout)
    assert info["ok"] and [e["stage"] for e in info["passport"] if e["kind"] == "stage"] == [1, 2, 3]
    data = next(e for e in info["passport"] if e["kind"] == "data")
    assert data["manifest_sha256"] and data["validation_report_sha256"]
    build = next(e for e in info["passport"] if e["kind"] == "build")
    assert build["pipeline_run_id"] == parent.info.run_id
    # artifacts flowed between steps: stage 2 started from stage 1's hand-off artifact
    artifacts = home / ".unitoken" / "pipeline" / "artifacts"
    job = next(artifacts.iterdir())
    s2 = json.loads((job / "train-stage2" / "handoff" / "handoff.json").read_text())
    assert s2["parent"] == str((job / "train-stage1" / "handoff").resolve())


@pytest.mark.extended
def test_stage_scoped_retraining_from_the_champion(home, first_run):
    """`--stages 3 --base-model models:/unitoken@champion` on new data: no tokenizer and no stages 1-2,
    the gate compares with champion v1, and v2's lineage carries v1's stages plus the new stage 3."""
    from unitoken.data.synth import synthesize

    synthesize(home / "new-data", 30, seed=7)
    proc = _unitoken(home, "pipeline", "run", "--local", "--stages", "3", "--base-model", "models:/unitoken@champion",
                     "--data", str(home / "new-data"), "--promote", *FAST, "--param", "eval_suites=shapes-vqa")
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "champion compared: 1" in proc.stdout
    client = _mlflow(home)
    latest = _pipeline_runs(client)[-1]
    names = {r.info.run_name for r in _children(client, latest.info.run_id)}
    assert {"validate", "pretokenize", "stage3", "eval-stage3", "gate"} <= names  # understanding-only gate here
    assert not {"tokenizer", "stage1", "stage2"} & names
    if proc.returncode == 0:
        info = json.loads(_unitoken(home, "lineage", "models:/unitoken/2", "--json").stdout)
        assert info["ok"] and [e["stage"] for e in info["passport"] if e["kind"] == "stage"] == [1, 2, 3, 3]


def test_planted_secrets_appear_nowhere(home, first_run):
    """Credentials in the environment of every step: not in the MLflow store (params, tags, metrics),
    not in any artifact or checkpoint, not in the step logs or the command's output."""
    needles = [v.encode() for v in PLANTED.values()]
    files = [p for p in (home / ".unitoken").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "pipeline.log" for p in files)
    assert len(files) > 50
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle.decode()} leaked into {path}"
    for needle in needles:
        assert needle.decode() not in first_run.stdout + first_run.stderr


@pytest.mark.extended  # 21 s; make test-all
def test_a_failing_pipeline_fails_clearly(home, first_run):
    """A data URI that does not exist: exit 1, the parent run FAILED with the error, nothing registered."""
    before = len(_mlflow(home).search_model_versions("name='unitoken'"))
    proc = _unitoken(home, "pipeline", "run", "--local", "--data", str(home / "nowhere"), *FAST)
    assert proc.returncode == 1
    assert "pipeline FAILED" in proc.stdout
    client = _mlflow(home)
    latest = _pipeline_runs(client)[-1]
    assert latest.info.status == "FAILED" and latest.data.tags["unitoken.pipeline_state"] == "FAILED"
    assert len(client.search_model_versions("name='unitoken'")) == before
    log = (home / ".unitoken" / "pipeline" / "pipeline.log").read_text()
    assert "no such file or directory" in log


@pytest.mark.extended
def test_rerun_with_unchanged_inputs_reuses_cached_steps(home, first_run):
    """The same command again: tokenizer, the pre-tokenisation worker, the three stages and their
    evaluations are cache hits whose runs name the first pipeline's runs (the merge is redone from
    the workers' outputs and says they all hit); validation and the gate run again."""
    proc = _unitoken(home, "pipeline", "run", "--local", "--scenes", "40", *FAST)
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]  # 3: no better than champion v1
    client = _mlflow(home)
    runs = _pipeline_runs(client)
    first = runs[0]
    before = {r.info.run_name: r for r in _children(client, first.info.run_id)}
    again = {r.info.run_name: r for r in _children(client, runs[-1].info.run_id)}
    cached = {"tokenizer", "pretokenize-w0", "stage1", "stage2", "stage3", "eval-stage1", "eval-stage2", "eval-stage3"}
    for name in cached:
        tags = again[name].data.tags
        assert tags["unitoken.cache"] == "hit", name
        assert tags["unitoken.cache_source_run"] == before[name].info.run_id, name
        assert tags["unitoken.cache_source_pipeline_run"] == first.info.run_id, name
    assert again["pretokenize"].data.tags["unitoken.cache"] == "hit"  # the merge of workers that all hit
    assert "unitoken.cache" not in again["validate"].data.tags and "gate" in again
    assert again["eval-stage3"].data.metrics == before["eval-stage3"].data.metrics
    assert "hit" in proc.stdout
