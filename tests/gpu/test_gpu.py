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
