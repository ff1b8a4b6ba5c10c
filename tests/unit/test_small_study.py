"""The small study's decisions (bench/small_study.py): which VQ-GAN it trains with, and its intervals."""

import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[2] / "bench" / "small_study.py"
_spec = importlib.util.spec_from_file_location("small_study", _path)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


@pytest.mark.parametrize("coarse, fine, want", [
    (0.938, 0.981, "vq"),           # run 4's pair under today's 0.9 minimum: the 8 x 8 grid
    (0.85, 0.981, "vq_fallback"),   # too many objects lost: the finer grid
    (0.85, 0.80, "vq"),             # the fallback is no better: keep the recipe's
    (None, 0.9, "vq_fallback"),     # no scenes to check against counts as 0
])
def test_vq_choice(coarse, fine, want):
    reports = {"vq": {"recognition_rate": coarse}, "vq_fallback": {"recognition_rate": fine}}
    assert study.choose_vq(reports, 0.9) == want


def test_vq_choice_without_a_fallback_keeps_the_recipes():
    assert study.choose_vq({"vq": {"recognition_rate": 0.1}}, 0.9) == "vq"


def test_run_4_would_have_kept_the_fine_grid_at_its_old_minimum():
    reports = {"vq": {"recognition_rate": 0.938}, "vq_fallback": {"recognition_rate": 0.9806}}
    assert study.choose_vq(reports, 0.95) == "vq_fallback"


def test_bootstrap_interval_and_paired_difference():
    lo, hi = study.bootstrap_ci([1.0] * 30 + [0.0] * 70)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert study.bootstrap_ci([]) == [0.0, 0.0]
    d = study.paired_diff({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 0.0})
    assert d["n"] == 3 and d["diff"] == pytest.approx(2 / 3, abs=1e-4) and d["ci95"][0] >= 0


@pytest.mark.extended
def test_a_call_deadline_stops_training_with_a_checkpoint_and_the_next_call_resumes(tmp_path, monkeypatch):
    """The study SIGTERMs `unitoken train` before a device call's deadline; the run checkpoints at
    its step (exit 143), and the same command in the next call goes on from that step."""
    import json
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    w = tmp_path / "w"
    (w / "logs").mkdir(parents=True)
    for args in (["data", "synth", "--out", w / "d", "--n", 20],
                 ["model", "init", "--recipe", "tiny", "--out", w / "m"],
                 ["data", "pretokenize", w / "d" / "manifest.jsonl", "--model", w / "m", "--out", w / "p"]):
        subprocess.run([sys.executable, "-m", "unitoken.cli", *map(str, args)], check=True, capture_output=True)
    monkeypatch.setattr(study, "STOP_GRACE_S", 5.0)

    def call(seconds):
        study.T0 = time.time()
        args = SimpleNamespace(out=str(tmp_path / "out"), work=str(w), recipe="tiny", deadline=seconds,
                               save_every=10_000, fast=False, shared=False, later=0.0)
        (tmp_path / "out").mkdir(exist_ok=True)
        with pytest.raises(study.OutOfTime):
            study.Chain(args, "main").train(1, "s1", w / "m", 100_000, [])
        return [json.loads(x)["step"] for x in (w / "s1" / "metrics.jsonl").read_text().splitlines()]

    first = call(60)
    log = (w / "logs" / "s1.log").read_text()
    assert "stopped by SIGTERM" in log and len(first) > 0
    assert [p.name for p in (w / "s1" / "checkpoints").iterdir()] == [f"step_{first[-1]:06d}"]
    second = call(60)
    assert second[: len(first)] == first and second == list(range(1, len(second) + 1)) and len(second) > len(first)
    spent = json.loads((tmp_path / "out" / "results_main.json").read_text())["partial_seconds"]["s1"]
    assert spent > 60  # both calls' training time, kept across calls


FAKE_TRAIN = '''
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
calls = out.parent / "calls.jsonl"
calls.parent.mkdir(parents=True, exist_ok=True)
with open(calls, "a") as fh:
    fh.write(json.dumps(sets) + "\\n")
if "train.activation_checkpointing=true" not in sets:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    sys.exit(1)
(out / "handoff").mkdir(parents=True, exist_ok=True)
(out / "handoff" / "model.safetensors").write_bytes(b"")
(out / "metrics.jsonl").write_text(json.dumps({"step": 1, "step_s": 0.5, "loss": 1.0}) + "\\n")
'''


def test_an_out_of_memory_beside_the_other_chain_retries_with_recomputed_activations(tmp_path, monkeypatch):
    """--shared: a training that runs out of GPU memory is run again with activation
    checkpointing, and so is every later one; the failed attempt's time is counted."""
    import json
    import sys
    import time
    from types import SimpleNamespace

    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(study, "U", [sys.executable, str(fake)])
    w = tmp_path / "w"
    (w / "logs").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    study.T0 = time.time()
    args = SimpleNamespace(out=str(tmp_path / "out"), work=str(w), recipe="small", deadline=600, save_every=100,
                           fast=True, shared=True, later=0.0)
    chain = study.Chain(args, "ablation")
    info = chain.train(2, "abl/a", w / "m", 5, ["model.encoder_mode=discrete"])
    chain.train(2, "abl/b", w / "m", 5, [])
    calls = [json.loads(x) for x in (w / "abl" / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3  # a (out of memory), a again, b
    assert study.RECOMPUTE_SETS[0] not in calls[0] and all(study.RECOMPUTE_SETS[0] in c for c in calls[1:])
    assert all(s in c for c in calls for s in study.SHARED_SETS + study.FAST_SETS)
    assert (w / "recompute").read_text() == "abl/a\n"
    assert info["sets"] == ["model.encoder_mode=discrete", *study.FAST_SETS, *study.SHARED_SETS,
                            *study.RECOMPUTE_SETS]
    assert json.loads((tmp_path / "out" / "results_ablation.json").read_text())["partial_seconds"]["abl_a"] > 0
    assert not (w / "fast_failed").exists()  # an OOM is not blamed on the varlen path
