"""Pre-tokenisation: shards, determinism, resume after SIGKILL."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny
from unitoken.data.dataset import ShardDataset
from unitoken.data.pretokenize import pretokenize
from unitoken.data.synth import synthesize
from unitoken.data.validate import validate_manifest
from unitoken.model.io import save_model
from unitoken.recipes import get_recipe


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt")
    synthesize(d / "data", 24, seed=5)
    validate_manifest(d / "data" / "manifest.jsonl", d / "v")
    model, tok, builder = build_tiny()
    save_model(model, tok, d / "model")
    return d, model, builder


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_shards_roundtrip_into_samples(prepared, tmp_path):
    """Stored codes equal the VQ encoding of the image; samples rebuild the full sequence."""
    from PIL import Image

    from unitoken.model.generation import prepare_images

    d, model, builder = prepared
    summary = pretokenize(d / "v" / "clean.jsonl", model, tmp_path / "p", shard_size=50)
    n = len((d / "v" / "clean.jsonl").read_text().splitlines())
    assert n > 192  # 8 records per scene, and the multiple-choice drill of the training scenes
    assert summary["records"] == summary["images"] == n and summary["shards"] == -(-n // 50)
    ds = ShardDataset(tmp_path / "p", builder, splits=None)
    assert len(ds) == n
    sample = ds[0]
    rec = ds.records[0][2]
    with Image.open(d / "data" / rec["image"][0]) as im:
        inputs, cont = prepare_images(model, [im.convert("RGB")])
    expected = builder.conversation(rec["conversations"], inputs)
    assert sample.encoded.input_ids == expected.input_ids and sample.encoded.labels == expected.labels
    torch.testing.assert_close(sample.images.pixel_values, cont.pixel_values, atol=1 / 127.5, rtol=0)


def test_shards_store_each_image_once_and_format_2_reads_the_same(prepared, tmp_path):
    """A shard holds each distinct image once (records of a scene point at it), and a shard of
    format 2 (every record's images stored again) gives the same samples."""
    import shutil

    from safetensors.torch import load_file, save_file

    d, model, builder = prepared
    summary = pretokenize(d / "v" / "clean.jsonl", model, tmp_path / "p", shard_size=500)
    shard = tmp_path / "p" / "shards" / "shard_00000"
    t = load_file(str(shard / "images.safetensors"))
    records = [json.loads(x) for x in (shard / "records.jsonl").read_text().splitlines()]
    distinct = {rel for r in records for rel in r.get("image", [])}
    assert t["codes"].shape[0] == t["grids"].shape[0] == len(distinct) == summary["distinct_images"]
    assert t["image_slots"].shape[0] == summary["encoded_images"] == sum(len(r.get("image", [])) for r in records)
    assert len(distinct) < len(records)  # the synthetic scenes share images: something was saved
    v3 = ShardDataset(tmp_path / "p", builder, splits=None)
    # the same shard as format 2 wrote it: every record image's tensors in record order
    shutil.copytree(tmp_path / "p", tmp_path / "v2")
    slots = t["image_slots"]
    tiles = [t["tiles"][t["tile_offsets"][k]: t["tile_offsets"][k + 1]] for k in slots.tolist()]
    save_file({"codes": t["codes"][slots], "grids": t["grids"][slots], "sizes": t["sizes"][slots],
               "tiles": torch.cat(tiles), "image_offsets": t["image_offsets"],
               "tile_offsets": torch.tensor([0] + [sum(x.shape[0] for x in tiles[: i + 1]) for i in range(len(tiles))])},
              str(tmp_path / "v2" / "shards" / "shard_00000" / "images.safetensors"))
    index = json.loads((tmp_path / "v2" / "index.json").read_text())
    (tmp_path / "v2" / "index.json").write_text(json.dumps({**index, "format_version": 2}))
    v2 = ShardDataset(tmp_path / "v2", builder, splits=None)
    for i in range(len(v3)):
        a, b = v3[i], v2[i]
        assert a.encoded.input_ids == b.encoded.input_ids and a.encoded.labels == b.encoded.labels
        assert (a.images is None) == (b.images is None)
        if a.images is not None:
            assert torch.equal(a.images.pixel_values, b.images.pixel_values) and a.images.grids == b.images.grids


def test_generation_records_have_no_continuous_inputs(prepared, tmp_path):
    d, model, builder = prepared
    pretokenize(d / "v" / "clean.jsonl", model, tmp_path / "p", shard_size=500)
    ds = ShardDataset(tmp_path / "p", builder, sources=["synth-t2i"], splits=None)
    s = ds[0]
    assert s.task == "generation" and s.images is None
    assert model.tokens.continuous not in s.encoded.input_ids


def test_resume_refuses_other_inputs(prepared, tmp_path):
    d, model, _ = prepared
    pretokenize(d / "v" / "clean.jsonl", model, tmp_path / "p", shard_size=100)
    with pytest.raises(ValueError, match=r"differs in \['shard_size'\]"):
        pretokenize(d / "v" / "clean.jsonl", model, tmp_path / "p", shard_size=10)


def _photo(size: tuple[int, int]):
    """A real photograph (scikit-learn's sample image, 640x427) cropped to ``size``'s aspect ratio and
    resized to it; a synthetic gradient with noise where scikit-learn is missing."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_image

        photo = Image.fromarray(load_sample_image("china.jpg"))
    except ImportError:
        g = torch.Generator().manual_seed(0)
        ramp = torch.linspace(0, 255, 640).expand(427, 640)
        noise = torch.rand(427, 640, 3, generator=g) * 64
        photo = Image.fromarray((torch.stack([ramp, ramp.flip(1), ramp * 0.5], -1) * 0.75 + noise).byte().numpy())
    w, h = size
    scale = min(photo.width / w, photo.height / h)
    cw, ch = int(w * scale), int(h * scale)
    left, top = (photo.width - cw) // 2, (photo.height - ch) // 2
    return photo.crop((left, top, left + cw, top + ch)).resize(size)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two photographs of ordinary sizes, pre-tokenised for the tiny model with AnyRes on."""
    d = tmp_path_factory.mktemp("photos")
    (d / "data").mkdir()
    records = []
    for i, size in enumerate([(640, 480), (360, 1080)]):
        _photo(size).save(d / "data" / f"photo{i}.png")
        records.append({"id": f"photo{i}", "image": [f"photo{i}.png"], "task": "understanding", "source": "photos",
                        "split": "train", "conversations": [
                            {"from": "human", "value": "<|image|>\nWhat is in the picture?"},
                            {"from": "gpt", "value": "A pagoda among trees." if i == 0 else "A tall strip of it."}]})
    (d / "data" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model, tok, builder = build_tiny(anyres=True)
    pretokenize(d / "data" / "manifest.jsonl", model, d / "p")
    return d, model, builder


def test_anyres_trains_on_photos(photos):
    """AnyRes trains on photographs of ordinary sizes (640x480 -> 2x2 grid, 360x1080 -> 3x1) through
    pre-tokenisation, the dataset and packing: the loss is finite and falls over a few optimizer steps."""
    from unitoken.data.dataset import pack_samples
    from unitoken.model.vision import num_continuous_features

    d, model, builder = photos
    samples = [s for s in (ShardDataset(d / "p", builder)[i] for i in range(2))]
    assert [s.images.grids for s in samples] == [[(2, 2)], [(3, 1)]]
    assert [s.images.sizes for s in samples] == [[(640, 480)], [(360, 1080)]]
    assert [s.num_continuous for s in samples] == [num_continuous_features(g, z, model.config.vision)
                                                   for g, z in [((2, 2), (640, 480)), ((3, 1), (360, 1080))]]
    stage = get_recipe("tiny", ["model.vision.anyres=true"]).train.stage2
    batch = pack_samples(samples, stage.max_seq_len, model.tokens.pad)
    model.freeze_except(stage.trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.optim.lr)
    losses = []
    for _ in range(6):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                    images=batch["images"])
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_anyres_refuses_shards_of_format_1(photos, tmp_path):
    """Shards from before resize-and-pad (format_version 1 stretched AnyRes tiles) are refused for AnyRes."""
    import shutil

    d, _, builder = photos
    shutil.copytree(d / "p", tmp_path / "p")
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    (tmp_path / "p" / "index.json").write_text(json.dumps({**index, "format_version": 1}))
    with pytest.raises(ValueError, match=r"format_version 1; this unitoken reads 3 and 2 \(and 1 without AnyRes\)"):
        ShardDataset(tmp_path / "p", builder)


@pytest.mark.faults  # make test-faults only (26 s): make test's 15-minute budget
def test_killed_run_resumes_to_identical_bytes(prepared, tmp_path):
    """SIGKILL mid-run, restart: the result is byte-identical to an uninterrupted run."""
    d, model, _ = prepared
    args = [sys.executable, "-m", "unitoken.cli", "data", "pretokenize", str(d / "v" / "clean.jsonl"),
            "--model", str(d / "model"), "--shard-size", "4", "--batch-size", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(args + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("shard_*"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("shard_*")))
    assert 5 <= done < 48, f"kill landed outside the run ({done} shards)"
    assert not (out / "index.json").exists()
    (out / "shards" / ".tmp-00047-999").mkdir(exist_ok=True)  # debris of a half-written shard
    subprocess.run(args + ["--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    assert _digests(out) == _digests(tmp_path / "ref")
