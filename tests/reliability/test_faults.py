"""Fault injection: SIGKILL each stage at random points (including in the middle of writing a
checkpoint), then `--resume auto`: the per-step losses and the final weights must equal an
uninterrupted run's.

`make test-faults` runs all of them (`-m faults`); `make test` runs only the cases marked
`faults_fast` (none here: the tracking-outage case in tests/train/test_train_units.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 12, 3
rng = random.Random(20261128)
# (stage, when): "step:K" kills after K logged steps (K random per stage), "ckpt" kills the moment a
# checkpoint's temporary directory appears (a write cut off midway)
CASES = [(s, f"step:{rng.randint(1, STEPS - 1)}") for s in (1, 2, 3) for _ in range(2)] + [(s, "ckpt") for s in (1, 2, 3)]
# `make test` keeps its fault cases elsewhere (stage 2 killed mid-run: tests/train/test_stages.py; an
# interrupted checkpoint: tests/train/test_train_units.py); this file is `make test-faults` only (the
# SIGTERM case took 57 s of make test's 15-minute budget).
FAST: set = set()


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def _cli(cwd, *args, popen=False):
    cmd = [sys.executable, "-m", "unitoken.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


class Chain:
    """Data, a model, and the uninterrupted reference run of each stage, built on first use."""

    def __init__(self, work: Path):
        self.work, self.done = work, set()
        _cli(work, "data", "synth", "--out", "d", "--n", "30")
        _cli(work, "model", "init", "--recipe", "tiny", "--out", "m")
        _cli(work, "data", "pretokenize", "d/manifest.jsonl", "--model", "m", "--out", "p")

    def init(self, stage: int) -> str:
        """The reference input of ``stage`` (the model, or the previous reference hand-off)."""
        if stage == 1:
            return "m"
        self.ref(stage - 1)
        return f"ref{stage - 1}/handoff"

    def ref(self, stage: int) -> Path:
        if stage not in self.done:
            _cli(self.work, *_args(stage, self.init(stage)), "--out", f"ref{stage}")
            self.done.add(stage)
        return self.work / f"ref{stage}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("faults"))


def _args(stage: int, init: str) -> list[str]:
    return ["train", "--stage", str(stage), "--recipe", "tiny", "--data", "p", "--init", init, "--no-track",
            "--max-steps", str(STEPS), "--set", f"train.save_every={SAVE_EVERY}"]


def _losses(path: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


def _kill_when(proc, out: Path, when: str) -> str:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if when == "ckpt":
            if list((out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").is_dir() else []:
                break
        else:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= int(when.split(":")[1]):
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed" if not (out / "handoff").exists() else "finished first"


@pytest.mark.faults
@pytest.mark.parametrize("stage, when", [pytest.param(s, w, marks=[pytest.mark.faults_fast] if (s, w) in FAST else [])
                                         for s, w in CASES], ids=[f"stage{s}-{w}" for s, w in CASES])
def test_sigkill_anywhere_then_resume_is_exact(chain, stage, when):
    init, ref = chain.init(stage), chain.ref(stage)
    name = f"kill{stage}-{when.replace(':', '')}"
    out = chain.work / name
    outcome = _kill_when(_cli(chain.work, *_args(stage, init), "--out", name, popen=True), out, when)
    assert outcome == "killed", "the stage finished before the kill landed"
    _cli(chain.work, *_args(stage, init), "--out", name, "--resume", "auto")
    assert not list((out / "checkpoints").glob(".tmp-*")), "debris of the cut-off checkpoint was not cleaned"
    assert _losses(out / "metrics.jsonl") == _losses(ref / "metrics.jsonl")
    want = load_file(str(ref / "handoff" / "model.safetensors"))
    got = load_file(str(out / "handoff" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.faults
def test_sigterm_checkpoints_at_the_step_and_resume_is_exact(chain):
    """SIGTERM (a preempted node, a suspended TrainJob) stops after the current step with a
    checkpoint there, exit 143; no periodic checkpoint could have been used (save_every 1000)."""
    ref = chain.ref(1)
    args = [*_args(1, "m"), "--out", "term", "--set", "train.save_every=1000"]
    out = chain.work / "term"
    proc = subprocess.Popen([sys.executable, "-m", "unitoken.cli", *args], cwd=chain.work, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 4):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume auto" in err
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert 4 <= steps < STEPS and not (out / "handoff").exists()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == [f"step_{steps:06d}"], saved
    _cli(chain.work, *args, "--resume", "auto")
    assert _losses(out / "metrics.jsonl") == _losses(ref / "metrics.jsonl")
    want = load_file(str(ref / "handoff" / "model.safetensors"))
    got = load_file(str(out / "handoff" / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
