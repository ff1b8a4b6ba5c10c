"""GPU checks of the training speed paths (python -m pytest -m gpu tests/gpu on a CUDA machine)."""

import pytest
import torch

from unitoken.model import attention
from unitoken.model.loss import chunked_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_flash_varlen_equals_per_sample_sdpa_with_gradients():
    """torch's varlen kernel and the per-sample SDPA loop agree in output and gradients (bf16)."""
    torch.manual_seed(0)
    lens = [700, 33, 1290, 5]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    meta = {"cu_seq_lens_q": cu, "max_length_q": max(lens), "seq_bounds": cu.tolist()}
    q, k, v = (torch.randn(1, 8, sum(lens), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    outs, grads = [], []
    for backend in ("auto", "loop"):
        attention.BACKEND = backend
        try:
            out, _ = attention.varlen_attention_forward(None, q, k, v, None, scaling=128 ** -0.5, **meta)
        finally:
            attention.BACKEND = "auto"
        (out.float() ** 2).sum().backward()
        outs.append(out.detach().float())
        grads.append([x.grad.float().clone() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    rel = (outs[0] - outs[1]).norm() / outs[1].norm()
    assert rel < 1e-2
    for a, b in zip(*grads):
        assert (a - b).norm() / b.norm() < 2e-2


def test_chunked_ce_matches_full_ce_in_bf16():
    """The chunked head + CE on bf16 inputs matches the one-pass fp32-logits loss."""
    torch.manual_seed(0)
    h = torch.randn(5000, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(65536, 1024, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 65536, (5000,), device="cuda")
    logits = (h @ w.t()).float()
    ref = torch.nn.functional.cross_entropy(logits, t)
    ref.backward()
    gh, gw = h.grad.float().clone(), w.grad.float().clone()
    h.grad = w.grad = None
    loss, _, _ = chunked_cross_entropy(h, w, t, chunk=1024)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-3
    assert (h.grad.float() - gh).norm() / gh.norm() < 2e-2
    assert (w.grad.float() - gw).norm() / gw.norm() < 2e-2


def test_compiled_varlen_layers_train_with_residual_dropout():
    """unitoken-7b-fast's path on the tiny model in bf16: compiled decoder layers, varlen attention and residual
    dropout 0.05 train (finite loss, gradients, train-mode outputs vary); eval mode is deterministic and matches
    the uncompiled layers."""
    from tests.conftest import build_tiny

    model, _, _ = build_tiny("discrete")
    model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.tokens.vocab_size, (1, 96), generator=g).cuda()
    pos = torch.cat([torch.arange(40), torch.arange(56)])[None].cuda()  # two packed samples
    model.configure_training(attention="varlen", dropout=0.05)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos)["logits"].float()
    model.configure_training(attention="varlen", dropout=0.05, compile_layers=True)
    with torch.no_grad():
        a, b = (model(input_ids=ids, position_ids=pos)["logits"].float() for _ in range(2))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, rtol=3e-2, atol=3e-2)
    model.train()
    with torch.no_grad():
        a, b = (model(input_ids=ids, position_ids=pos)["logits"].float() for _ in range(2))
    assert not torch.equal(a, b)
    out = model(input_ids=ids, labels=ids, position_ids=pos)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.llm.layers[0].mlp.down_proj.weight.grad is not None
