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
            stored[rel] = shard["codes"][int(shard["image_slots"][int(shard["image_offsets"][j])])]
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


def test_7b_encoder_codes_equal_between_pretokenize_and_inference(tmp_path):
    """unitoken-7b's VQ encoder as the recipe runs it (512 px, bf16, compiled on the GPU): the codes
    `unitoken data pretokenize` stores for 256 distinct images equal, on 100 % of them, the codes
    inference computes one image at a time (serving) and in odd-sized batches (evaluation)."""
    import dataclasses

    from PIL import Image

    from unitoken.data.dataset import ShardDataset
    from unitoken.data.pretokenize import pretokenize
    from unitoken.data.synth import synthesize
    from unitoken.model.io import init_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import get_recipe

    tiny, big = get_recipe("tiny").model, get_recipe("unitoken-7b-fast").model
    assert big.vq.encode_dtype == "bfloat16" and big.vq.encode_compiled
    cfg = dataclasses.replace(tiny, vq=big.vq, max_grid_tokens=big.max_grid_tokens,
                              llm=dataclasses.replace(tiny.llm, vocab_size=9216))
    model, tok = init_model(cfg, seed=0)
    model.to("cuda")
    synthesize(tmp_path / "data", 256, size=big.vq.resolution, seed=11)
    summary = pretokenize(tmp_path / "data" / "manifest.jsonl", model, tmp_path / "p", device="cuda")
    ds = ShardDataset(tmp_path / "p", SequenceBuilder(model.tokens, tok, cfg), splits=None)
    stored, images = {}, {}
    for s_, j, rec in ds.records:
        rel = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
        if rel not in stored:
            shard = ds._shard(s_)
            stored[rel] = shard["codes"][int(shard["image_slots"][int(shard["image_offsets"][j])])].long()
            with Image.open(tmp_path / "data" / rel) as im:
                images[rel] = im.convert("RGB")
    rels = sorted(images)[:256]
    assert len(rels) == 256, len(rels)
    one_by_one = [prepare_images(model, [images[r]])[0][0].codes for r in rels]
    batched = [x.codes for i in range(0, 256, 7) for x in prepare_images(model, [images[r] for r in rels[i:i + 7]])[0]]
    equal = sum(torch.equal(stored[r], a) and torch.equal(a, b) for r, a, b in zip(rels, one_by_one, batched))
    print(f"7B encoder: codes equal on {equal}/256 images; pretokenize {summary['images_per_s']} images/s, "
          f"compiled in {summary['compile_s']} s")
    assert equal == 256
