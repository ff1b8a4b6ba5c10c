"""UniToken forward pass, loss, feature merging and freezing."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import build_tiny
from unitoken.model.generation import prepare_images
from unitoken.model.sequence import IGNORE, pad_batch
from unitoken.model.tokens import IMAGE_PLACEHOLDER


def _batch(model, b, n_images=1, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pil = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n_images)]
    inputs, cont = prepare_images(model, pil)
    enc = b.conversation([{"from": "human", "value": IMAGE_PLACEHOLDER * n_images + "what?"},
                          {"from": "gpt", "value": "red"}], inputs)
    return pad_batch([enc], model.tokens.pad), cont


def _patch_weight(tower):
    """SigLIP's patch-embedding weight (its module path differs across transformers versions)."""
    return next(p for n, p in tower.named_parameters() if n.endswith("patch_embedding.weight"))


@pytest.mark.parametrize("mode", ["dual", "discrete", "continuous"])
def test_each_encoder_mode_trains(mode):
    """Every encoder mode gives a finite loss with gradients into the modules it uses."""
    model, _, b = build_tiny(mode)
    batch, cont = _batch(model, b, n_images=2)
    out = model(**batch, images=cont)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.llm.embed_tokens.weight.grad is not None
    if mode == "discrete":
        assert model.vision is None and cont is None
    else:
        assert model.adapter.fc1.weight.grad.abs().sum() > 0
        assert _patch_weight(model.vision).grad.abs().sum() > 0


def test_continuous_mismatch_raises_with_both_counts(tiny):
    model, _, b = tiny
    batch, cont = _batch(model, b, n_images=1)
    ids = batch["input_ids"].clone()
    pos = (ids[0] == model.tokens.continuous).nonzero()[0, 0]
    ids[0, pos] = model.tokens.pad  # one placeholder fewer than features
    with pytest.raises(ValueError, match=r"15 tokens vs 16 features"):
        model(input_ids=ids, labels=batch["labels"], images=cont)
    with pytest.raises(ValueError, match=r"16 tokens vs 0 features"):
        model(**batch, images=None)


def test_continuous_features_land_at_placeholders(tiny):
    """embed() puts adapter outputs exactly at placeholder positions, text embeddings elsewhere."""
    model, _, b = tiny
    batch, cont = _batch(model, b)
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], cont)
        feats = model.encode_continuous(cont)
        plain = model.llm.embed_tokens(batch["input_ids"])
    mask = batch["input_ids"][0] == model.tokens.continuous
    assert torch.equal(emb[0, mask], feats)
    assert torch.equal(emb[0, ~mask], plain[0, ~mask])


def test_loss_is_ce_plus_z_loss_over_full_vocab(tiny):
    """loss = CE over all logits (image ids included) + w * mean(logsumexp^2)."""
    model, _, b = tiny
    t = model.tokens
    T = 12
    ids = torch.randint(0, 200, (2, T))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[0, 6] = int(t.code_to_token[5])  # an image-token target must be finite (not masked)
    ids[0, 6] = labels[0, 6]
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        logits = model(input_ids=ids)["logits"][:, :-1].float()
    tgt = labels[:, 1:]
    keep = tgt != IGNORE
    ce = F.cross_entropy(logits[keep], tgt[keep])
    z = (torch.logsumexp(logits[keep], -1) ** 2).mean()
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["z_loss"], z)
    torch.testing.assert_close(out["loss"], ce + model.config.z_loss_weight * z)
    assert int(out["num_tokens"]) == int(keep.sum())


def test_z_loss_gradient_pulls_normaliser_down():
    """With a large z-loss weight, one step lowers logsumexp (the z-loss' purpose)."""
    model, _, _ = build_tiny()
    model.config.z_loss_weight = 1.0
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # inflate logits
    ids = torch.randint(0, 200, (2, 16))
    opt = torch.optim.SGD(model.lm_head.parameters(), lr=1e-2)
    before = model(input_ids=ids, labels=ids)["z_loss"]
    model(input_ids=ids, labels=ids)["loss"].backward()
    opt.step()
    after = model(input_ids=ids, labels=ids)["z_loss"]
    assert after < before


def test_freeze_sets_by_prefix():
    model, _, _ = build_tiny()
    counts = model.freeze_except(("vision", "adapter"))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vision", "adapter"}
    assert counts["trainable"] == sum(p.numel() for m in (model.vision, model.adapter) for p in m.parameters())
    model.freeze_except(("vision", "adapter", "llm", "lm_head"))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "vision", "adapter", "llm", "lm_head"}
    assert not any(p.requires_grad for p in model.vq.parameters())  # the VQ-GAN never trains


def test_freeze_vision_embeddings_keeps_patch_and_position_embeddings_frozen():
    """With freeze_vision_embeddings (the reference's setting) SigLIP's patch and position embeddings stay frozen
    while the rest of the tower trains; they get no gradient."""
    model, _, b = build_tiny()
    model.freeze_except(("vision", "adapter"), freeze_vision_embeddings=True)
    frozen = {n for n, p in model.vision.named_parameters() if not p.requires_grad}
    assert {n.split(".")[-2] for n in frozen} == {"patch_embedding", "position_embedding"}
    assert any(p.requires_grad for p in model.vision.parameters())
    batch, cont = _batch(model, b)
    model(**batch, images=cont)["loss"].backward()
    assert _patch_weight(model.vision).grad is None
    assert model.adapter.fc1.weight.grad is not None


def test_freeze_unknown_prefix_raises(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=r"unknown freeze prefixes \['vit'\]"):
        model.freeze_except(("vit",))


def test_freeze_nothing_trainable_in_discrete_mode_raises():
    model, _, _ = build_tiny("discrete")
    with pytest.raises(ValueError, match="leaves no parameter to train"):
        model.freeze_except(("vision", "adapter"))


def test_dropout_is_residual_on_attention_and_mlp_outputs():
    """train.dropout drops the attention (o_proj) and MLP (down_proj) outputs before the residual add, as the
    reference does, never the attention probabilities; train-mode outputs vary, eval mode is deterministic and
    equals the model without dropout."""
    model, _, b = build_tiny("discrete")
    batch, _ = _batch(model, b)
    ids = batch["input_ids"]
    with torch.no_grad():
        plain = model.eval()(input_ids=ids)["logits"]
    model.configure_training(dropout=0.5)
    assert model.residual_dropout == 0.5
    seen = {}
    layer = model.llm.layers[0]
    for name, module in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.detach()))
    model.train()
    with torch.no_grad():
        first, second = (model(input_ids=ids)["logits"] for _ in range(2))
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.llm.layers)
    for name in ("attn", "mlp"):
        assert 0.35 < (seen[name] == 0).float().mean() < 0.65, name  # half of the outputs dropped
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        a, c = (model(input_ids=ids)["logits"] for _ in range(2))
    assert torch.equal(a, c) and torch.equal(a, plain)
    assert (seen["attn"] == 0).float().mean() < 0.01


def test_vq_stays_in_eval_mode(tiny):
    model, _, _ = tiny
    model.train()
    assert not model.vq.training
    model.eval()
