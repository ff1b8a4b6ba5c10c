"""Training building blocks: DeepSpeed config, optimizer groups and schedule, checkpoints, tracking."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny
from unitoken.recipes import get_recipe
from unitoken.train import checkpoint as ckpt
from unitoken.train.parallel import ds_config, validate_ds_config
from unitoken.train.start import build_optimizer


def test_ds_config_from_recipe():
    r = get_recipe("unitoken-7b")
    cfg = ds_config(r.train, r.train.stage2, world_size=8)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"]
    assert cfg["train_batch_size"] == 128 and cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_clipping"] == 4.0
    validate_ds_config(ds_config(r.train, r.train.stage2, world_size=1))  # DeepSpeed checks it as one process
    tiny = get_recipe("tiny")
    cfg = ds_config(tiny.train, tiny.train.stage1)
    assert cfg["zero_optimization"]["stage"] == 0 and not cfg["bf16"]["enabled"]


def test_7b_dry_run_on_meta_device():
    """CI builds the paper-scale model on the meta device and DeepSpeed parses its config."""
    from unitoken.cli import main

    assert main(["train", "--dry-run", "--stage", "1", "--recipe", "unitoken-7b"]) == 0


def test_optimizer_groups_and_schedule():
    """Stage 1: only vision+adapter in the optimizer, ViT at its own LR; warmup then cosine to 0."""
    model, _, _ = build_tiny()
    stage = get_recipe("unitoken-7b").train.stage1
    stage = type(stage)(**{**stage.__dict__, "max_steps": 100})
    model.freeze_except(stage.trainable)
    opt, sched = build_optimizer(model, stage)
    names = {g["name"]: g for g in opt.param_groups}
    assert {g["lr"] for n, g in names.items() if n.startswith("vision")} == {1e-5}
    assert {g["lr"] for n, g in names.items() if n.startswith("rest")} == {1e-3}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0 for n, g in names.items() if n.endswith("no_decay"))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"] / names[opt.param_groups[0]["name"]]["initial_lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and max(lrs) == pytest.approx(1.0) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone decay after warmup


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    tmp = ckpt.prepare_tmp(root, 10)
    (tmp / "partial").write_text("x")
    assert ckpt.complete_checkpoints(root) == []  # a half-written checkpoint is not a checkpoint
    ckpt.publish(root, 10, {"step": 10})
    (root / "step_000020").mkdir()  # a directory without meta.json: cut off before publishing
    assert ckpt.complete_checkpoints(root) == [(10, root / "step_000010")]
    for step in (30, 40, 50):
        ckpt.prepare_tmp(root, step)
        ckpt.publish(root, step, {"step": step})
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [40, 50]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    """A NaN weight makes the loss non-finite: the stage exits 1 naming the step."""
    from safetensors.torch import load_file, save_file

    from unitoken.cli import main as cli

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))
    assert cli(["data", "synth", "--out", str(tmp_path / "d"), "--n", "8"]) == 0
    assert cli(["data", "validate", str(tmp_path / "d" / "manifest.jsonl"), "--out", str(tmp_path / "v")]) == 0
    assert cli(["model", "init", "--recipe", "tiny", "--out", str(tmp_path / "m")]) == 0
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["lm_head.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert cli(["data", "pretokenize", str(tmp_path / "v" / "clean.jsonl"), "--model", str(tmp_path / "m"),
                "--out", str(tmp_path / "p")]) == 0
    proc = subprocess.run([sys.executable, "-m", "unitoken.cli", "train", "--stage", "1", "--recipe", "tiny", "--data",
                           "p", "--out", "s1", "--init", "m", "--no-track"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "FloatingPointError: stage 1: non-finite loss (nan) at step 1" in proc.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mlflow(root: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def _stop(proc):
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.faults_fast
def test_tracking_survives_server_outage(tmp_path):
    """Server killed mid-stage: logging never raises; metrics arrive, in order, once it is back."""
    from mlflow import MlflowClient

    from unitoken.tracking import MLflowTracker

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(tmp_path, port)
    try:
        tracker = MLflowTracker("stage2", tmp_path, tracking_uri=uri, min_flush_interval_s=0)
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 3.0}, step=1)
        _stop(server)
        for step in (2, 3, 4):
            tracker.log_metrics({"loss": 3.0 - step / 10}, step=step)  # must not raise
        assert len(tracker.queue) == 3 and tracker.failures >= 1
        server = _start_mlflow(tmp_path, port)
        tracker.log_metrics({"loss": 2.5}, step=5)
        tracker.close()
        hist = MlflowClient(tracking_uri=uri).get_metric_history(tracker.run_id, "loss")
        assert [(m.step, m.value) for m in hist] == [(1, 3.0), (2, 2.8), (3, 2.7), (4, 2.6), (5, 2.5)]
    finally:
        _stop(server)


def test_unreachable_tracking_writes_pending_then_replays(tmp_path):
    from mlflow import MlflowClient

    from unitoken.tracking import MLflowTracker, replay

    dead = f"http://127.0.0.1:{_free_port()}"
    tracker = MLflowTracker("stage1", tmp_path, tracking_uri=dead, final_wait_s=0.5, min_flush_interval_s=0)
    tracker.log_params({"lr": 0.001})
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.close()
    pending = tmp_path / "pending.jsonl"
    assert len(pending.read_text().splitlines()) == 4  # run header + params + metric + terminate
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay(pending, uri) == 3 and not pending.exists()
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("unitoken").experiment_id])
    assert run.data.params == {"lr": "0.001"} and run.data.metrics == {"loss": 1.5}
    assert run.info.status == "FINISHED"


def test_stage_run_nests_under_pipeline_parent(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from unitoken.tracking import MLflowTracker, parent_run_from_env

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("unitoken"), run_name="pipeline").info.run_id
    # the parent crosses a process boundary in the environment; the command reads it, the tracker takes it
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_RUN_ID", parent)
    assert parent_run_from_env() == parent
    tracker = MLflowTracker("stage3", tmp_path, tracking_uri=uri, parent_run_id=parent_run_from_env())
    tracker.close()
    run = client.get_run(tracker.run_id)
    assert tracker.run_id != parent and run.data.tags["mlflow.parentRunId"] == parent


def test_replay_sends_every_section_of_a_pending_file(tmp_path):
    """A stage closed twice while MLflow was down (a resume) leaves two sections in pending.jsonl;
    replay delivers both, not only the last."""
    from mlflow import MlflowClient

    from unitoken.tracking import MLflowTracker, replay

    dead = f"http://127.0.0.1:{_free_port()}"
    for loss in (1.5, 1.25):
        tracker = MLflowTracker("stage1", tmp_path, tracking_uri=dead, final_wait_s=0.2, min_flush_interval_s=0)
        tracker.log_metrics({"loss": loss}, step=int(loss * 4))
        tracker.close()
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert replay(tmp_path / "pending.jsonl", uri) == 4
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("unitoken").experiment_id])
    assert sorted(r.data.metrics["loss"] for r in runs) == [1.25, 1.5]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_prefetch_yields_the_inline_batches_with_their_stream_positions():
    """The prefetch thread calls the same draw function in the same order as inline drawing."""
    from unitoken.train.batching import BatchCounts, Drawn, MicroBatch, Prefetch

    def drawer():
        n = {"i": 0}

        def make():
            n["i"] += 1
            micro = MicroBatch([n["i"]], {"x": torch.tensor([n["i"]])}, BatchCounts(n["i"], 1, n["i"]))
            return Drawn([micro], n["i"] * 4, {"pos": n["i"]})
        return make

    inline = Prefetch(drawer(), 5, depth=0)
    ahead = Prefetch(drawer(), 5, depth=2)
    try:
        for _ in range(5):
            a, b = inline.get(), ahead.get()
            assert (a.samples, a.draws, a.sampler_state, a.counts) == (b.samples, b.draws, b.sampler_state, b.counts)
            assert torch.equal(a.micro[0].batch["x"], b.micro[0].batch["x"])
    finally:
        ahead.close()
    assert not ahead.thread.is_alive()


def test_prefetch_raises_the_draw_error_in_the_training_thread():
    from unitoken.train.batching import Prefetch

    def make():
        raise ValueError("sample 7 has 900 tokens > max_seq_len 512")

    pre = Prefetch(make, 3, depth=2)
    with pytest.raises(ValueError, match="sample 7"):
        pre.get()
    pre.close()
