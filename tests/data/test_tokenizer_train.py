"""VQ tokenizer training (short CPU run; the quality target is measured in bench/tokenizer_quality.py)."""

import json

import torch

from unitoken.data.synth import synthesize
from unitoken.data.tokenizer_train import evaluate_vq, train_tokenizer
from unitoken.model.io import init_model
from unitoken.model.vq import VQTokenizer
from unitoken.recipes import get_recipe


def test_training_improves_reconstruction_and_loads_as_released_vqgan(tmp_path):
    synthesize(tmp_path / "d", 30, seed=2)
    cfg = get_recipe("tiny").model.vq
    report = train_tokenizer(tmp_path / "d", tmp_path / "vq", cfg, steps=40, batch_size=8, lr=2e-3)
    assert {p.name for p in (tmp_path / "vq").iterdir()} == {"vqgan.yaml", "vqgan.ckpt", "report.json",
                                                             "reconstructions.png"}
    assert json.loads((tmp_path / "vq" / "report.json").read_text())["psnr_db"] == report["psnr_db"]
    assert report["objects_total"] > 0 and 0 <= report["recognition_rate"] <= 1
    torch.manual_seed(0)
    untrained = VQTokenizer(cfg)
    from unitoken.data.tokenizer_train import _images

    test_x, _ = _images(tmp_path / "d" / "manifest.jsonl", "test", cfg.resolution)
    assert report["psnr_db"] > evaluate_vq(untrained, test_x)["psnr_db"] + 3
    # the output is Chameleon's layout: `model init --tokenizer` takes it
    model, _ = init_model(get_recipe("tiny").model, [tmp_path / "vq"])
    assert evaluate_vq(model.vq, test_x)["psnr_db"] == report["psnr_db"]


def test_a_validated_manifest_still_finds_its_scenes(tmp_path):
    """The pipeline trains on a validated clean.jsonl (beside dataset.json, away from the images):
    the recognition rate still reads the scenes of the data root it points at."""
    from unitoken.data.validate import validate_manifest

    synthesize(tmp_path / "d", 30, seed=3)
    validate_manifest(tmp_path / "d" / "manifest.jsonl", tmp_path / "v")
    report = train_tokenizer(tmp_path / "v" / "clean.jsonl", tmp_path / "vq", get_recipe("tiny").model.vq, steps=5,
                             batch_size=4)
    assert report["objects_total"] > 0 and 0 <= report["recognition_rate"] <= 1
