"""Loading released formats (tiny random weights saved in the real formats) and our hand-off format."""

import argparse
import hashlib
import json

import pytest
import torch
import yaml

from unitoken.model.io import init_model, load_model, save_model
from unitoken.model.tokens import build_tokenizer
from unitoken.model.vq import VQTokenizer, hf_vq_config
from unitoken.recipes import get_recipe


@pytest.fixture(scope="module")
def cfg():
    return get_recipe("tiny").model


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory, cfg):
    """A Lumina-mGPT/Chameleon HF directory: config.json + safetensors + tokenizer.json."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    d = tmp_path_factory.mktemp("lumina")
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    torch.manual_seed(11)
    hf = ChameleonConfig(vocab_size=cfg.llm.vocab_size, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocabulary_map=tok.get_vocab(),
                         vq_config=hf_vq_config(cfg.vq).to_dict())
    model = ChameleonForConditionalGeneration(hf)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, cfg):
    """A full SigLIP HF directory (text + vision, as google/siglip-* are released)."""
    from transformers import SiglipConfig, SiglipModel

    d = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(12)
    v = cfg.vision
    sc = SiglipConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
                       "image_size": v.image_size, "patch_size": v.patch_size})
    model = SiglipModel(sc)
    model.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory, cfg):
    """Chameleon's VQ-GAN release: vqgan.yaml (taming) + vqgan.ckpt (Lightning, with loss.* keys)."""
    d = tmp_path_factory.mktemp("vqgan")
    torch.manual_seed(13)
    vq = VQTokenizer(cfg.vq)
    state = dict(vq.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # dropped on load
    torch.save({"state_dict": state, "global_step": 7}, d / "vqgan.ckpt")
    doc = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.vq.embed_dim, "n_embed": cfg.vq.num_codes,
        "ddconfig": {"double_z": False, "z_channels": cfg.vq.latent_channels, "resolution": cfg.vq.resolution,
                     "in_channels": 3, "out_ch": 3, "ch": cfg.vq.base_channels,
                     "ch_mult": list(cfg.vq.channel_multiplier), "num_res_blocks": cfg.vq.num_res_blocks,
                     "attn_resolutions": [], "dropout": 0.0}}}}
    (d / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    return d, vq


def _same(a: torch.nn.Module, b_state: dict, prefix: str = ""):
    for k, v in a.state_dict().items():
        assert torch.equal(v, b_state[prefix + k]), k


def test_load_chameleon_hf_dir(cfg, chameleon_dir):
    """LLM, lm_head, tokenizer and the VQ encoder come from the Chameleon dir; shapes follow it."""
    d, ref = chameleon_dir
    model, tok = init_model(cfg, [d])
    assert model.config.llm.hidden_size == 96 and model.config.llm.num_kv_heads == 2
    ref_state = ref.state_dict()
    _same(model.llm, ref_state, "model.")
    assert torch.equal(model.lm_head.weight, ref_state["lm_head.weight"])
    _same(model.vq.encoder, ref_state, "model.vqmodel.encoder.")
    assert tok.get_vocab() == json.loads((d / "config.json").read_text())["vocabulary_map"]
    assert model.tokens.boi == tok.convert_tokens_to_ids("<racm3:break>")


def test_load_siglip_dir(cfg, siglip_dir):
    d, ref = siglip_dir
    model, _ = init_model(cfg, [d])
    assert model.config.vision.hidden_size == 48 and model.adapter.fc1.in_features == 48
    ref_vision = {k: v for k, v in ref.vision_model.state_dict().items() if not k.startswith("head.")}
    got = model.vision.state_dict()
    assert len(got) == len(ref_vision)
    for k, v in ref_vision.items():
        match = [g for g in got if g.endswith(k)]
        assert match and torch.equal(got[match[0]], v), k


def test_load_vqgan_ckpt(cfg, vqgan_dir):
    d, ref = vqgan_dir
    model, _ = init_model(cfg, [d])
    _same(model.vq, ref.state_dict())
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(model.vq.decode(model.vq.encode(img)), ref.decode(ref.encode(img)))


def test_load_all_three_then_handoff_roundtrip(cfg, chameleon_dir, siglip_dir, vqgan_dir, tmp_path):
    """Released weights -> hand-off dir -> load: bit-identical, and re-saving gives identical bytes."""
    model, tok = init_model(cfg, [chameleon_dir[0], siglip_dir[0], vqgan_dir[0]])
    _same(model.vq, vqgan_dir[1].state_dict())  # the VQ-GAN ckpt wins over the HF encoder copy
    out = save_model(model, tok, tmp_path / "m")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    loaded, tok2 = load_model(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert loaded.config == model.config and tok2.get_vocab() == tok.get_vocab()
    again = save_model(loaded, tok2, tmp_path / "m2")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out / "model.safetensors") == digest(again / "model.safetensors")


def test_vqgan_ckpt_with_pickled_objects_is_refused(cfg, tmp_path, vqgan_dir):
    """weights_only loading: a checkpoint that needs arbitrary unpickling gives a clear error."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "vqgan.yaml").write_text((vqgan_dir[0] / "vqgan.yaml").read_text())
    torch.save({"state_dict": vqgan_dir[1].state_dict(), "hparams": argparse.Namespace(a=1)}, d / "vqgan.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        init_model(cfg, [d])


def test_unrecognised_dirs(cfg, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type='llama'"):
        init_model(cfg, [tmp_path])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        init_model(cfg, [tmp_path / "missing"])
    with pytest.raises(FileNotFoundError, match="not a unitoken model directory"):
        load_model(tmp_path)


def test_corrupt_handoff_weights_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, _ = tiny
    out = save_model(model, tok, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    state.pop("lm_head.weight")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 \(e\.g\. \['lm_head\.weight'\]\)"):
        load_model(out)


def test_model_with_learned_anyres_row_end_is_refused(tmp_path):
    """A model saved before AnyRes used the newline embedding (it has adapter.row_end) is refused with
    the reason, not loaded with a marker its training never saw."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import build_tiny

    model, tok, _ = build_tiny(anyres=True)
    out = save_model(model, tok, tmp_path / "m")
    load_model(out)  # today's AnyRes model round-trips
    state = load_file(str(out / "model.safetensors"))
    state["adapter.row_end"] = torch.zeros(model.config.llm.hidden_size)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"has adapter\.row_end, the learned AnyRes end-of-row embedding.*"
                                         r"newline token's embedding.*Train the AnyRes stages again"):
        load_model(out)


def _siglip_params(d, ff, layers, image, patch):
    n_pos = (image // patch) ** 2
    emb = 3 * patch * patch * d + d + n_pos * d
    layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    return emb + layers * layer + 2 * d


def _chameleon_params(d, ff, layers, heads, vocab):
    head_dim = d // heads
    layer = 4 * d * d + 3 * d * ff + 2 * d + 2 * 2 * heads * head_dim  # q/k LayerNorm weight+bias
    return vocab * d + layers * layer + d  # + final RMSNorm


def test_unitoken_7b_builds_on_meta_with_paper_shapes():
    """Chameleon-7B (~7.0B incl. lm_head) + SigLIP-so400m vision (~413M) + adapter, on the meta device."""
    from unitoken.model.unitoken import UniToken

    cfg = get_recipe("unitoken-7b").model
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):
        model = UniToken(cfg, tok.get_vocab())
    n = model.num_parameters()
    assert n["llm"] == _chameleon_params(4096, 11008, 32, 32, 65536)
    assert n["lm_head"] == 65536 * 4096
    assert n["llm"] + n["lm_head"] == 7_013_666_816  # Chameleon-7B decoder + head
    assert n["vision"] == _siglip_params(1152, 4304, 27, 384, 14) == 412_987_248
    assert n["adapter"] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 7.4e9 < n["total"] < 7.6e9
    assert all(p.device.type == "meta" for p in model.parameters())
