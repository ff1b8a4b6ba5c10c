"""The component path of a single-node stage with `gpus: 2` starts one process per device
(torchrun, gloo on the CPU here) and publishes the hand-off they trained (issue 19)."""

from __future__ import annotations

import json

import pytest

from tests.train.test_world_size import work  # noqa: F401 - the tiny pre-tokenised data set (module fixture)
from unitoken.pipeline import steps


@pytest.mark.extended  # ~80 s on 2 cores; make test-all (make test's two-rank training: tests/train/test_world_size.py)
def test_a_two_gpu_step_trains_with_two_ranks(work, tmp_path, monkeypatch):  # noqa: F811
    """steps.train_stage on RunsOn("torchrun", gpus=2): two ranks under torchrun (the stage's MLflow run says
    world_size 2), the per-step log is the global one, the hand-off is verified and published."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parent = steps.open_pipeline_run("uuid-multi-gpu", "two ranks", {})
    info = steps.train_stage(1, "tiny", ["train.dropout=0"], work / "p", work / "m", tmp_path / "handoff",
                             tmp_path / "work", parent, steps.RunsOn("torchrun", gpus=2), max_steps=2)
    assert info["processes"] == 2 and info["steps"] == 2 and info["stage"] == 1
    assert (tmp_path / "handoff" / "handoff.json").is_file()
    ds = json.loads((tmp_path / "work" / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 2
    run = MlflowClient(uri).get_run(info["mlflow_run_id"])
    assert run.data.params["world_size"] == "2" and run.data.tags["mlflow.parentRunId"] == parent
