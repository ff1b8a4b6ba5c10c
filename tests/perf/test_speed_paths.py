"""The training speed paths compute the same function as the stock ones (tiny shapes, CPU)."""

import pytest
import torch

from tests.conftest import build_tiny
from unitoken.config import ConfigError
from unitoken.model.attention import varlen_metadata
from unitoken.model.loss import chunked_cross_entropy
from unitoken.model.sequence import IGNORE
from unitoken.recipes import get_recipe


def _rows(model, lens, seed=0):
    """Random token samples with the first third of each unsupervised (context)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(10, model.tokens.vocab_size, (n,), generator=g) for n in lens]
    labels = [torch.cat([torch.full((n // 3,), IGNORE), x[n // 3:]]) for n, x in zip(lens, ids)]
    return ids, labels


def _packed(model, ids, labels, budget):
    total = sum(len(x) for x in ids)
    pad = budget - total
    input_ids = torch.cat([*ids, torch.full((pad,), model.tokens.pad)])[None]
    lab = torch.cat([*labels, torch.full((pad,), IGNORE)])[None]
    pos = torch.cat([torch.arange(len(x)) for x in ids] + [torch.arange(pad)])[None]
    return {"input_ids": input_ids, "labels": lab, "position_ids": pos}


def _padded(model, ids, labels):
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), model.tokens.pad)
    lab = torch.full((len(ids), longest), IGNORE)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, :len(x)], lab[i, :len(y)], mask[i, :len(x)] = x, y, 1
    return {"input_ids": input_ids, "labels": lab, "attention_mask": mask}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def test_varlen_packed_loss_equals_padded_per_sample_loss():
    """Packed rows with varlen attention + chunked CE give the padded batch's loss and gradients."""
    model, _, _ = build_tiny("discrete")
    model.train()
    for layer in model.llm.layers:
        layer.self_attn.attention_dropout = 0.0
    ids, labels = _rows(model, [37, 64, 21, 50])
    ref_loss, ref_grads = _loss_and_grads(model, _padded(model, ids, labels))
    model.configure_training(attention="varlen", ce_chunk=16, checkpoint_layers=-1)
    loss, grads = _loss_and_grads(model, _packed(model, ids, labels, budget=200))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_varlen_does_not_attend_across_samples():
    """Changing one packed sample leaves the hidden states of the others unchanged."""
    model, _, _ = build_tiny("discrete")
    model.eval()
    model.configure_training(attention="varlen")
    ids, labels = _rows(model, [30, 40])
    a = _packed(model, ids, labels, 80)
    b = _packed(model, [torch.randint(10, 200, (30,)), ids[1]], labels, 80)
    ha = model.hidden_states(model.embed(a["input_ids"]), position_ids=a["position_ids"])
    hb = model.hidden_states(model.embed(b["input_ids"]), position_ids=b["position_ids"])
    torch.testing.assert_close(ha[0, 30:70], hb[0, 30:70])
    assert not torch.allclose(ha[0, :30], hb[0, :30])


def test_varlen_metadata_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    meta = varlen_metadata(pos)
    assert meta["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert meta["max_length_q"] == 4
    assert meta["seq_bounds"] == [0, 3, 5, 6, 10, 12]


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_ce_equals_full_ce_with_gradients(weighted):
    """Chunked fused head + CE + z-loss == logits -> fp32 CE, in value and in both gradients."""
    torch.manual_seed(0)
    n, d, vocab = 53, 24, 301
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    tw = torch.rand(n) if weighted else torch.full((n,), 1.0 / n)
    tw = tw / tw.sum()
    logits = (h @ w.t()).float()
    lse = logits.logsumexp(-1)
    ce = ((lse - logits.gather(1, t[:, None]).squeeze(1)) * tw).sum()
    ref = ce + 1e-3 * (lse ** 2).mean()
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, ce2, _ = chunked_cross_entropy(h, w, t, tw if weighted else None, 1e-3, chunk=10)
    (2 * loss).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ce2, ce.detach())
    torch.testing.assert_close(h.grad, 2 * gh)
    torch.testing.assert_close(w.grad, 2 * gw)


def test_selective_checkpointing_keeps_the_gradients():
    """Recomputing some layers in the backward pass changes no gradient."""
    model, _, _ = build_tiny("discrete")
    model.train()
    for layer in model.llm.layers:
        layer.self_attn.attention_dropout = 0.0
    ids, labels = _rows(model, [40, 33])
    batch = _padded(model, ids, labels)
    _, ref = _loss_and_grads(model, batch)
    model.configure_training(checkpoint_layers=1)
    assert [layer.gradient_checkpointing for layer in model.llm.layers] == [True, False]
    _, grads = _loss_and_grads(model, batch)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=name)


def test_varlen_config_rules():
    """varlen needs packed rows; the paper's dropout is residual, so it goes with varlen."""
    with pytest.raises(ConfigError, match="packing"):
        get_recipe("small", ["train.attention=varlen"])
    assert get_recipe("unitoken-7b", ["train.attention=varlen"]).train.dropout == 0.05
    fast = get_recipe("unitoken-7b-fast")
    assert fast.train.attention == "varlen" and fast.train.ce_chunk > 0 and fast.train.dropout == 0.05


def test_varlen_trains_with_residual_dropout():
    """Packed varlen rows train with train.dropout > 0 (the kernel refuses attention-probability dropout, and
    none is asked for)."""
    model, _, _ = build_tiny("discrete")
    model.train()
    model.configure_training(attention="varlen", dropout=0.05)
    ids, labels = _rows(model, [37, 21])
    loss, _ = _loss_and_grads(model, _packed(model, ids, labels, budget=200))
    assert torch.isfinite(loss)


def test_varlen_collate_packs_one_unpadded_row():
    """With varlen attention the training collate puts every sample in one row, nothing padded."""
    from types import SimpleNamespace

    from unitoken.data.dataset import Sample
    from unitoken.model.sequence import Encoded
    from unitoken.train.batching import collate

    model, _, _ = build_tiny("discrete")
    ids, labels = _rows(model, [30, 50, 7])
    samples = [Sample(Encoded(x.tolist(), y.tolist()), None, "text", "", i) for i, (x, y) in enumerate(zip(ids, labels))]
    stage = SimpleNamespace(max_seq_len=64)
    batch = collate(samples, stage, True, model.tokens.pad, "cpu", attention="varlen")
    assert batch["input_ids"].shape == (1, 87)
    assert batch["position_ids"][0].tolist() == list(range(30)) + list(range(50)) + list(range(7))
    with pytest.raises(ValueError, match="max_seq_len 40"):
        collate(samples, SimpleNamespace(max_seq_len=40), True, model.tokens.pad, "cpu", attention="varlen")
