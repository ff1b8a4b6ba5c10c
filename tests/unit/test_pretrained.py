"""Loading released formats (tiny random weights saved in the real formats) and our hand-off format."""

import argparse
import dataclasses
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
def hf_chameleon_dir(tmp_path_factory, chameleon_dir):
    """The same directory as transformers' convert_chameleon_weights_to_hf writes it (facebook/chameleon-7b,
    Lumina-mGPT): the placeholder <reserved08707> is renamed <image> (same id) in the tokenizer files and in
    config.json's vocabulary_map."""
    src, model = chameleon_dir
    d = tmp_path_factory.mktemp("hf_converted")
    for f in src.iterdir():
        data = f.read_bytes()
        if f.suffix == ".json":
            data = data.replace(b'"<reserved08707>"', b'"<image>"')
        (d / f.name).write_bytes(data)
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


def test_model_init_accepts_hf_converted_chameleon_dir(chameleon_dir, hf_chameleon_dir, tmp_path):
    """`unitoken model init --pretrained` takes an HF-converted dir (placeholder <image>) like the original
    names; the hand-off keeps <image>, and continuous features land at its positions."""
    from unitoken.cli import main
    from unitoken.model.generation import prepare_images
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.model.tokens import IMAGE_PLACEHOLDER

    d, ref = hf_chameleon_dir
    original = json.loads((chameleon_dir[0] / "tokenizer.json").read_text())["model"]["vocab"]
    assert main(["--debug", "model", "init", "--recipe", "tiny", "--pretrained", str(d),
                 "--out", str(tmp_path / "m")]) == 0
    model, tok = load_model(tmp_path / "m")
    vocab = tok.get_vocab()
    assert "<reserved08707>" not in vocab
    assert model.tokens.continuous == vocab["<image>"] == original["<reserved08707>"]
    _same(model.llm, ref.state_dict(), "model.")
    from PIL import Image

    inputs, cont = prepare_images(model, [Image.new("RGB", (64, 64), (200, 30, 30))])
    enc = SequenceBuilder(model.tokens, tok, model.config).conversation(
        [{"from": "human", "value": IMAGE_PLACEHOLDER + "colour?"}, {"from": "gpt", "value": "red"}], inputs)
    ids = torch.tensor([enc.input_ids])
    assert int((ids == vocab["<image>"]).sum()) == inputs[0].num_continuous > 0
    assert torch.isfinite(model(input_ids=ids, labels=torch.tensor([enc.labels]), images=cont)["loss"])


def test_placeholder_under_both_names_with_different_ids_is_refused(tiny):
    """A vocabulary with <reserved08707> and <image> as two tokens is ambiguous: refused, naming both."""
    from unitoken.model.tokens import SpecialTokens

    model, tok, _ = tiny
    vocab = dict(tok.get_vocab(), **{"<image>": model.tokens.pad})
    with pytest.raises(ValueError, match=r"both <reserved08707> and <image> with different ids"):
        SpecialTokens.from_vocab(vocab, model.config.max_grid_tokens)


def _chameleon_layout_vocab(placeholder: str) -> dict[str, int]:
    """A vocabulary laid out as Chameleon's released one (65,536 entries): four specials, the 8,192
    IMGIMG codes at ids 4-8195, then the reserved block where <reserved{n}> has id n + 4 (<eoss> 8196,
    <racm3:break> 8197 and <sentinel:0> 8198 hold the first slots), then text pieces."""
    from unitoken.model.tokens import image_token_name

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({image_token_name(c): 4 + c for c in range(8192)})
    vocab.update({"<eoss>": 8196, "<racm3:break>": 8197, "<sentinel:0>": 8198})
    vocab.update({f"<reserved{i - 4:05d}>": i for i in range(8199, 9006)})  # to <reserved09001>
    vocab[placeholder] = vocab.pop("<reserved08707>")
    vocab.update({f"piece{i}": i for i in range(len(vocab), 65536)})
    return vocab


@pytest.mark.parametrize("placeholder", ["<reserved08707>", "<image>"])
def test_chameleon_vocabulary_gives_the_reference_ids(placeholder):
    """In Chameleon's layout our by-name lookup finds the reference's literal ids (BOI 8197, EOI 8196, SEP 8198,
    NL 8803, EOT 8710, placeholder 8711, grid n 8804 + n), every grid token up to the 7B recipe's
    max_grid_tokens, and 8,192 codes, under the original and the HF placeholder name alike."""
    from unitoken.model.tokens import SpecialTokens

    max_grid = get_recipe("unitoken-7b").model.max_grid_tokens
    t = SpecialTokens.from_vocab(_chameleon_layout_vocab(placeholder), max_grid)
    assert (t.boi, t.eoi, t.sep) == (8197, 8196, 8198)
    assert (t.newline, t.end_of_turn, t.continuous) == (8803, 8710, 8711)
    assert t.grid[1:] == tuple(8804 + n for n in range(1, max_grid + 1))
    assert t.num_codes == 8192 and t.vocab_size == 65536
    assert t.codes_to_tokens(torch.tensor([0, 8191])).tolist() == [4, 8195]
    # a recipe asking for more grid tokens than the vocabulary has is refused by name
    with pytest.raises(ValueError, match=r"<reserved09002>"):
        SpecialTokens.from_vocab(_chameleon_layout_vocab(placeholder), 202)


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


def test_vqgan_yaml_resolution_does_not_shrink_images(cfg, tmp_path, caplog):
    """A vqgan.yaml whose resolution differs from the recipe's (Chameleon's says 256 and encodes 512 px) keeps
    the recipe's image size, says so, and keeps its attention blocks at the same levels: the weights load
    strictly and give the released model's codes."""
    half = cfg.vq.resolution // 2
    released_cfg = dataclasses.replace(cfg.vq, resolution=half, attn_resolutions=(half // 2,))
    torch.manual_seed(14)
    released = VQTokenizer(released_cfg)
    d = tmp_path / "vqgan"
    d.mkdir()
    torch.save({"state_dict": released.state_dict()}, d / "vqgan.ckpt")
    doc = {"model": {"params": {
        "embed_dim": cfg.vq.embed_dim, "n_embed": cfg.vq.num_codes,
        "ddconfig": {"double_z": False, "z_channels": cfg.vq.latent_channels, "resolution": half, "in_channels": 3,
                     "out_ch": 3, "ch": cfg.vq.base_channels, "ch_mult": list(cfg.vq.channel_multiplier),
                     "num_res_blocks": cfg.vq.num_res_blocks, "attn_resolutions": [half // 2], "dropout": 0.0}}}}
    (d / "vqgan.yaml").write_text(yaml.safe_dump(doc))
    with caplog.at_level("WARNING", logger="unitoken.model.io"):
        model, _ = init_model(cfg, [d])
    assert model.config.vq.resolution == cfg.vq.resolution
    assert model.config.vq.attn_resolutions == (cfg.vq.resolution // 2,)  # the same level, rescaled
    assert f"ddconfig.resolution is {half}, the recipe's vq.resolution {cfg.vq.resolution}" in caplog.text
    _same(model.vq, released.state_dict())
    img = torch.rand(1, 3, cfg.vq.resolution, cfg.vq.resolution) * 2 - 1
    codes = model.vq.encode(img)
    assert codes.shape[-1] == cfg.vq.codes_per_side and torch.equal(codes, released.encode(img))


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
