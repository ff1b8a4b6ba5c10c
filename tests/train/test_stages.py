"""The three stages from the CLI on CPU (tiny recipe, synthetic data), resume, hand-off checks, MLflow."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import _env, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(trained):
    return trained


@pytest.fixture(scope="module")
def work(trained):
    """The shared stage 1 -> 2 -> 3 run of the tiny recipe (tests/conftest.py::trained)."""
    return trained["tmp"]


def unitoken(stack, *args, check=True):
    return run(stack, *args, check=check)


def _losses(path):
    return [json.loads(x)["loss"] for x in Path(path).read_text().splitlines()]


def test_stage1_trains_only_vision_and_adapter(work):
    before = load_file(str(work / "m" / "model.safetensors"))
    after = load_file(str(work / "s1" / "handoff" / "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith(("llm.", "lm_head.", "vq.")):
            assert torch.equal(before[k], after[k]), f"{k} changed in stage 1"
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision", "adapter"}


def test_every_stage_hands_off_and_loss_falls(work):
    for stage in (1, 2, 3):
        doc = json.loads((work / f"s{stage}" / "handoff" / "handoff.json").read_text())
        assert doc["stage"] == stage and doc["recipe"] == "tiny"
        losses = _losses(work / f"s{stage}" / "metrics.jsonl")
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"stage {stage} loss did not fall: {losses}"
        assert (work / f"s{stage}" / "loss.png").stat().st_size > 1000
    s2 = json.loads((work / "s2" / "handoff" / "handoff.json").read_text())
    s1_digest = hashlib.sha256((work / "s1" / "handoff" / "handoff.json").read_bytes()).hexdigest()
    assert s2["parent_digest"] == s1_digest and s2["parent_stage"] == 1
    # stage 2 trains everything: the LLM moved
    a = load_file(str(work / "s1" / "handoff" / "model.safetensors"))
    b = load_file(str(work / "s2" / "handoff" / "model.safetensors"))
    assert not torch.equal(a["llm.embed_tokens.weight"], b["llm.embed_tokens.weight"])
    # periodic checkpoints went through the staged writer and each was published once written
    saves = [json.loads(x) for x in (work / "s2" / "checkpoints.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in saves]
    assert steps and steps == sorted(steps) and all(r["staged"] for r in saves)
    assert all(0 <= r["blocking_s"] <= r["published_after_s"] for r in saves)
    kept = sorted(p.name for p in (work / "s2" / "checkpoints").iterdir())
    assert kept == [f"step_{n:06d}" for n in steps[-2:]]  # no debris, the last two kept


def test_corrupted_or_wrong_stage_handoff_is_refused(stack, work, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(work / "s2" / "handoff", bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit
    (bad / "model.safetensors").write_bytes(bytes(blob))
    proc = unitoken(stack, "train", "--stage", "3", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "x"),
                    "--init", str(bad), check=False)
    assert proc.returncode == 1 and "model.safetensors is corrupted" in proc.stderr
    proc = unitoken(stack, "train", "--stage", "3", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "y"),
                    "--init", "s1/handoff", check=False)
    assert proc.returncode == 1 and "hand-off of stage 1, but this stage starts from stage 2" in proc.stderr
    proc = unitoken(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "z"),
                    "--init", "s1/handoff", "--set", "model.llm.num_layers=3", check=False)
    assert proc.returncode == 1 and "differs from the recipe" in proc.stderr


def test_mlflow_has_params_metrics_inputs_and_digest(stack, work):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["uri"])
    exp = client.get_experiment_by_name("unitoken")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"stage1", "stage2", "stage3"} <= set(runs)
    for stage in (1, 2, 3):
        run = runs[f"stage{stage}"]
        doc = json.loads((work / f"s{stage}" / "handoff" / "handoff.json").read_text())
        assert run.info.run_id == doc["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.params["stage"] == str(stage) and run.data.params["model.llm.hidden_size"] == "128"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert [round(m.value, 6) for m in history] == _losses(work / f"s{stage}" / "metrics.jsonl")
        digest = hashlib.sha256((work / f"s{stage}" / "handoff" / "handoff.json").read_bytes()).hexdigest()
        assert run.data.tags["unitoken.handoff_sha256"] == digest
        inputs = run.inputs.dataset_inputs
        [ds] = [d for d in inputs if d.dataset.name.startswith("pretokenized:")]
        assert ds.dataset.digest and json.loads(ds.dataset.source)  # the pre-tokenised dir
        # the mixture (by task in the tiny recipe) first, then the data, then one input per task
        assert any(d.dataset.name.startswith("mixture ") and "understanding" in d.dataset.name for d in inputs)
        assert {d.dataset.name for d in inputs if d.dataset.name.startswith("task:")} >= {"task:understanding"}
        assert "cpu_hours" in run.data.metrics
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"deepspeed.json", "recipe.json", "loss.png", "handoff"} <= arts


@pytest.mark.faults
def test_sigkill_then_resume_matches_uninterrupted_run(stack, work):
    """Kill stage 2 mid-run (after a checkpoint), resume: same losses per step and same final weights."""
    # micro-batches of one packed row with accumulation, and one kept checkpoint: resume stays exact
    args = ["train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--init", "s1/handoff", "--max-steps", "30",
            "--no-track", "--set", "train.micro_batch_tokens=512", "--set", "train.keep_checkpoints=1"]
    unitoken(stack, *args, "--out", "ref")
    out = work / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "unitoken.cli", *args, "--out", "killed"], cwd=work, env=_env(stack),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step_000010").is_dir():
        time.sleep(0.05)
    time.sleep(0.6)  # a few more steps past the checkpoint, which the resume must recompute identically
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "handoff").exists(), "the run finished before it could be killed"
    unitoken(stack, *args, "--out", "killed", "--resume", "auto")
    assert _losses(out / "metrics.jsonl") == _losses(work / "ref" / "metrics.jsonl")
    a = load_file(str(work / "ref" / "handoff" / "model.safetensors"))
    b = load_file(str(out / "handoff" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max(r["micro_batches"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())) >= 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000020"]


def test_resume_never_refuses_existing_checkpoints(stack, work):
    # s2 is the shared stage-2 run (conftest `trained`): its checkpoints must not be trained over
    proc = unitoken(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--init", "s1/handoff",
                    "--out", "s2", "--resume", "never", "--no-track", check=False)
    assert proc.returncode == 1 and "already holds checkpoints" in proc.stderr


@pytest.mark.extended  # 31 s; make test-all
def test_stage2_from_a_fresh_init_only_for_discrete_models(stack, work, tmp_path):
    """Stage 2 refuses a plain `model init` directory, except in discrete mode: there stage 1 has
    nothing to train (no vision tower or adapter), so the Table 5 ablation starts stage 2 there."""
    proc = unitoken(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "a"),
                    "--init", "m", "--no-track", "--max-steps", "2", check=False)
    assert proc.returncode == 1 and "not a stage hand-off checkpoint" in proc.stderr
    disc = ["--set", "model.encoder_mode=discrete"]
    unitoken(stack, "model", "init", "--recipe", "tiny", "--out", str(tmp_path / "m_disc"), *disc)
    unitoken(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "b"),
             "--init", str(tmp_path / "m_disc"), "--no-track", "--max-steps", "2", *disc)
    doc = json.loads((tmp_path / "b" / "handoff" / "handoff.json").read_text())
    assert doc["stage"] == 2 and doc["parent_stage"] == 0


def test_heldout_loss_is_the_training_objective_on_unseen_records_and_falls_with_training(work):
    """unitoken.eval.heldout: one record's score equals the model's own mean cross-entropy of it,
    only test-split records are scored, and the trained model's held-out loss is below the
    initial model's on both tasks."""
    from unitoken.data.dataset import ShardDataset, pad_samples
    from unitoken.eval.heldout import heldout_loss, summarize_loss
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder

    summaries = {}
    for name in ("m", "s3/handoff"):
        model, tok = load_model(work / name)
        builder = SequenceBuilder(model.tokens, tok, model.config)
        results = heldout_loss(model, builder, work / "p", limit=6, batch_size=4)
        test_ids = {r["id"] for _, _, r in ShardDataset(work / "p", builder, splits=["test"]).records}
        assert {r["id"] for r in results} <= test_ids and {r["task"] for r in results} == {"understanding",
                                                                                           "generation"}
        summaries[name] = summarize_loss(results)
        assert all(s["n"] <= 6 for s in summaries[name].values())
    ds = ShardDataset(work / "p", builder, splits=["test"])
    for task in ("understanding", "generation"):  # one record of each against the model's own loss
        first = next(r for r in results if r["task"] == task)
        sample = ds[[r["id"] for _, _, r in ds.records].index(first["id"])]
        batch = pad_samples([sample], model.tokens.pad)
        with torch.no_grad():
            ce = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
                       images=batch["images"])["ce"]
        assert first["score"] == pytest.approx(float(ce), rel=1e-4), task
    for task in ("understanding", "generation"):
        assert summaries["s3/handoff"][task]["mean"] < summaries["m"][task]["mean"], summaries


def test_grad_norm_is_the_steps_own_with_and_without_zero(stack, work, tmp_path):
    """ZeRO computes the gradient norm inside step(): read before it, it was the previous step's
    (run 6 on the GPU logged 0.0 at step 1 and at each resumed step). The first step's norm under
    ZeRO 2 is now the same as without ZeRO."""
    def norms(run):
        return [json.loads(x)["grad_norm"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    # the shared stage-2 run (the tiny recipe: no ZeRO) against the same first step under ZeRO 2
    unitoken(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", str(tmp_path / "z2"),
             "--init", "s1/handoff", "--no-track", "--max-steps", "2", "--set", "train.zero_stage=2")
    plain, zero = norms(work / "s2"), norms(tmp_path / "z2")
    assert plain[0] > 0 and zero[0] == pytest.approx(plain[0], rel=1e-4)
