"""VQ-GAN tokenizer: encode and decode."""

import pytest
import torch

from unitoken.model.vq import VQTokenizer
from unitoken.recipes import get_recipe


def test_encode_decode_shapes():
    """64 px images -> 8x8 codes in range -> 64 px images in [-1, 1]."""
    cfg = get_recipe("tiny").model.vq
    vq = VQTokenizer(cfg)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < cfg.num_codes
    y = vq.decode(codes)
    assert y.shape == (3, 3, 64, 64) and y.min() >= -1 and y.max() <= 1


def test_decode_is_consistent_with_quantised_latent():
    """decode(encode(x)) equals decoding the quantiser's own output (same codebook lookup)."""
    vq = VQTokenizer(get_recipe("tiny").model.vq)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        zq, _, _ = vq.quantize(vq.quant_conv(vq.encoder(x)))
        ref = vq.decoder(vq.post_quant_conv(zq)).clamp(-1, 1)
    torch.testing.assert_close(vq.decode(vq.encode(x)), ref)


def test_decode_rejects_out_of_range_codes():
    vq = VQTokenizer(get_recipe("tiny").model.vq)
    with pytest.raises(ValueError, match=r"VQ codes must lie in \[0, 256\)"):
        vq.decode(torch.full((1, 8, 8), 256))


def test_decoder_key_layout_matches_taming():
    """Decoder parameter names follow taming-transformers (what Chameleon's vqgan.ckpt uses)."""
    vq = VQTokenizer(get_recipe("tiny").model.vq)
    keys = set(vq.state_dict())
    for k in ("decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.q.weight",
              "decoder.up.0.block.0.conv1.weight", "decoder.up.3.upsample.conv.weight",
              "decoder.norm_out.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
              "quant_conv.weight", "post_quant_conv.weight", "encoder.down.0.downsample.conv.weight"):
        assert k in keys, k
    assert "decoder.up.0.upsample.conv.weight" not in keys  # level 0 has no upsample


def test_encode_runs_in_the_configured_precision_whatever_the_callers_autocast():
    """Codes depend on the image and the model's encode_dtype only: a caller's bf16 autocast
    (training and evaluation code run under one) changes nothing; a bfloat16 model config does."""
    import dataclasses

    cfg = get_recipe("tiny").model.vq
    assert cfg.encode_dtype == "float32"
    torch.manual_seed(0)
    vq = VQTokenizer(cfg)
    x = torch.rand(4, 3, cfg.resolution, cfg.resolution) * 2 - 1
    exact = vq.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vq.encode(x), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the encoder in bf16 ...
        z = vq.quant_conv(vq.encoder(x.to(torch.bfloat16)))
    loose = vq.quantize(z.float())[2].view(exact.shape)  # ... the nearest code in fp32
    vq.cfg = dataclasses.replace(cfg, encode_dtype="bfloat16")
    assert torch.equal(vq.encode(x), loose)
    assert not torch.equal(loose, exact)  # the precisions disagree on some codes: the skew this pins down


def test_encode_dtype_is_validated():
    from unitoken.config import ConfigError, from_dict, to_dict

    cfg = to_dict(get_recipe("tiny").model.vq)
    with pytest.raises(ConfigError, match="encode_dtype"):
        from_dict(type(get_recipe("tiny").model.vq), {**cfg, "encode_dtype": "fp16"}, "vq")
