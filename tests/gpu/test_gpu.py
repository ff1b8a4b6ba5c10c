"""GPU checks (run with `python -m pytest -m gpu tests/gpu` on a CUDA machine)."""

import pytest
import torch

from tests.conftest import build_tiny
from unitoken.model.generation import decode_image, generate_image_codes, prepare_images
from unitoken.model.sequence import pad_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batch(model, b):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    inputs, cont = prepare_images(model, [img])
    enc = b.conversation([{"from": "human", "value": "<|image|>what?"}, {"from": "gpt", "value": "a red circle"}],
                         inputs)
    return pad_batch([enc], model.tokens.pad), cont


def test_bf16_cuda_loss_matches_fp32_cpu():
    """The same batch gives (nearly) the same loss in bf16 on the GPU as in fp32 on the CPU."""
    model, _, b = build_tiny()
    batch, cont = _batch(model, b)
    with torch.no_grad():
        ref = model(**batch, images=cont)["ce"]
    model.to("cuda", dtype=torch.bfloat16)
    model.vq.float()
    batch = {k: v.cuda() for k, v in batch.items()}
    cont.pixel_values = cont.pixel_values.cuda()
    out = model(**batch, images=cont)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["ce"].float().cpu(), ref, rtol=0.03, atol=0.03)
    assert model.adapter.fc1.weight.grad is not None


def test_generate_on_cuda():
    model, _, b = build_tiny()
    model.to("cuda")
    codes = generate_image_codes(model, b, "a blue square", cfg_scale=3.0, top_k=32, seed=0)
    assert codes.shape == (8, 8)
    assert decode_image(model, codes).size == (64, 64)


def test_pretokenized_codes_equal_the_codes_inference_computes(tmp_path):
    """The train/serve skew check: the VQ codes pretokenize stores on the GPU are exactly those
    evaluation, chat and serving compute for the same images, also when the caller runs under
    bf16 autocast with TF32 allowed (as training code does); the CPU agrees up to float rounding."""
    from PIL import Image

    from unitoken.data.dataset import ShardDataset
    from unitoken.data.pretokenize import pretokenize
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "data", 90, seed=3)  # synthetic data is valid by construction: no validation step
    model, _, builder = build_tiny()
    cpu_model, _, _ = build_tiny()
    model.to("cuda")
    pretokenize(tmp_path / "data" / "manifest.jsonl", model, tmp_path / "p", device="cuda", batch_size=256)
    ds = ShardDataset(tmp_path / "p", builder, splits=None)
    stored, images = {}, {}
    for s_, j, rec in ds.records:  # the codes as the shards hold them, per distinct image
        rel = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
        if rel not in stored:
            shard = ds._shard(s_)
            stored[rel] = shard["codes"][int(shard["image_offsets"][j])]
            with Image.open(tmp_path / "data" / rel) as im:
                images[rel] = im.convert("RGB")
    rels = sorted(images)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        served, _ = prepare_images(model, [images[r] for r in rels])
    direct, _ = prepare_images(model, [images[r] for r in rels])
    on_cpu, _ = prepare_images(cpu_model, [images[r] for r in rels])
    for r, a, b_, c in zip(rels, served, direct, on_cpu):
        assert torch.equal(a.codes, b_.codes) and torch.equal(stored[r].long(), a.codes), r
    agree = float(torch.cat([(a.codes == c.codes).flatten() for a, c in zip(served, on_cpu)]).float().mean())
    print(f"VQ codes equal between CUDA fp32 and CPU fp32: {agree:.4%}")
    assert agree >= 0.99
