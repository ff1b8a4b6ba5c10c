"""bf16 / ZeRO-2 resume on a GPU through the no-pickle loader (torch.load(weights_only=True)):
a stage resumed from its step-3 checkpoint ends like the uninterrupted run."""

import json
import shutil

import pytest
import torch

from tests.conftest import build_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_bf16_zero2_checkpoint_resumes_without_pickle(tmp_path, monkeypatch):
    from unitoken.cli import main
    from unitoken.data.synth import synthesize
    from unitoken.model.io import save_model
    from unitoken.recipes import get_recipe
    from unitoken.train import parallel
    from unitoken.train.train import main as train_stage

    model, tok, _ = build_tiny()
    save_model(model, tok, tmp_path / "m")
    synthesize(tmp_path / "d", 40, seed=1)
    assert main(["data", "pretokenize", str(tmp_path / "d" / "manifest.jsonl"), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "p"), "--device", "cuda"]) == 0
    recipe = get_recipe("tiny", ["train.precision=bf16", "train.zero_stage=2", "train.save_every=3"])
    full = train_stage(1, recipe, tmp_path / "p", tmp_path / "full", tmp_path / "m", max_steps=6, track=False,
                       show_progress=False)
    # The run as if killed after its step-3 checkpoint: only that checkpoint is left.
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "cut" / "checkpoints")
    loads = []
    real = parallel._load_without_pickle
    monkeypatch.setattr(parallel, "_load_without_pickle", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    resumed = train_stage(1, recipe, tmp_path / "p", tmp_path / "cut", tmp_path / "m", resume="auto", max_steps=6,
                          track=False, show_progress=False)
    assert loads, "the resume did not go through the no-pickle loader"
    assert len(_losses(tmp_path / "cut")) == 3  # steps 4-6 only
    assert resumed.losses[-3:] == pytest.approx(full.losses[-3:], rel=2e-2)
