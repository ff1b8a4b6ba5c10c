"""The discrete path: Chameleon's VQ-GAN with both encoder and decoder.

transformers ships the encoder and quantizer (``ChameleonVQVAE``) but no decoder. We compose
the stock encoder blocks with a decoder written in the taming-transformers layout that
Chameleon's released ``vqgan.ckpt`` uses, so that checkpoint loads with ``strict=True``:

    encoder.*  quantize.embedding.weight  quant_conv.*  post_quant_conv.*  decoder.*

The VQ-GAN is frozen everywhere in UniToken (``eval()`` + ``requires_grad_(False)``): its
codes are the generation targets, and changing the codebook would silently invalidate every
pre-tokenised shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAEEncoder,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
    ChameleonVQVAEVectorQuantizer,
)

from unitoken.config import VQConfig


def hf_vq_config(cfg: VQConfig) -> ChameleonVQVAEConfig:
    return ChameleonVQVAEConfig(
        embed_dim=cfg.embed_dim,
        num_embeddings=cfg.num_codes,
        double_latent=False,
        latent_channels=cfg.latent_channels,
        resolution=cfg.resolution,
        in_channels=3,
        base_channels=cfg.base_channels,
        channel_multiplier=list(cfg.channel_multiplier),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        dropout=0.0,
        attn_type="vanilla",
    )


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQDecoder(nn.Module):
    """taming-transformers ``Decoder`` (as in Chameleon's VQ-GAN), built from HF's blocks."""

    def __init__(self, hf_cfg: ChameleonVQVAEConfig) -> None:
        super().__init__()
        mult = tuple(hf_cfg.channel_multiplier)
        self.num_resolutions = len(mult)
        self.num_res_blocks = hf_cfg.num_res_blocks
        attn_res = set(hf_cfg.attn_resolutions or ())
        block_in = hf_cfg.base_channels * mult[-1]
        curr_res = hf_cfg.resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(hf_cfg.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(hf_cfg, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(hf_cfg, block_in, block_in)

        ups: list[nn.Module] = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            block_out = hf_cfg.base_channels * mult[level]
            for _ in range(self.num_res_blocks + 1):
                up.block.append(ChameleonVQVAEEncoderResnetBlock(hf_cfg, block_in, block_out))
                block_in = block_out
                if curr_res in attn_res:
                    up.attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = _Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)  # taming stores levels low-to-high resolution index order
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [b, latent_channels, h, w] -> image [b, 3, h*f, w*f] in about [-1, 1]."""
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i in range(self.num_res_blocks + 1):
                h = up.block[i](h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        h = h * torch.sigmoid(h)
        return self.conv_out(h)


ENCODE_CHUNK = 32  # images per VQ-encoder call on the GPU, always (see VQTokenizer.encode)


@contextlib.contextmanager
def encode_precision(dtype: str, device_type: str):
    """``bfloat16``: autocast to bf16. ``float32``: autocast off and, on CUDA, IEEE fp32 for
    convolutions and matmuls (cuDNN uses TF32 for fp32 convolutions by default, and training code
    may allow it for matmuls: either changes codes)."""
    if dtype == "bfloat16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
        return
    with torch.autocast(device_type, enabled=False), _ieee_fp32(device_type == "cuda"):
        yield


@contextlib.contextmanager
def _ieee_fp32(active: bool):
    if not active:
        yield
        return
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(conv, "conv") and hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new API only
        saved = conv.conv.fp32_precision, matmul.fp32_precision
        conv.conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = conv.allow_tf32, matmul.allow_tf32
    conv.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        conv.allow_tf32, matmul.allow_tf32 = saved


class VQTokenizer(nn.Module):
    """Encode images to VQ codes and decode codes to images (frozen)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hf_cfg = hf_vq_config(cfg)
        self.encoder = ChameleonVQVAEEncoder(hf_cfg)
        self.quantize = ChameleonVQVAEVectorQuantizer(hf_cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = VQDecoder(hf_cfg)
        self.freeze()

    def freeze(self) -> None:
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> VQTokenizer:  # always stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: [b, 3, H, W] in [-1, 1] -> codes: [b, H/f, W/f] (long).

        The only way images become codes (pre-tokenisation, evaluation, chat, serving), always in
        ``cfg.encode_dtype`` whatever autocast or TF32 setting the caller runs under, and on the
        GPU in micro-batches of exactly ``ENCODE_CHUNK`` images (the last one zero-padded): cuDNN
        picks its convolution algorithm by shape, and fp32 rounding that differs with the batch
        size flipped 0.2 % of codes between pre-tokenisation (256 per batch) and evaluation (seen
        on an H200). The codes of an image must not depend on which command computed them."""
        if pixels.device.type != "cuda" or len(pixels) == ENCODE_CHUNK:
            return self._encode(pixels)
        chunks = []
        for i in range(0, len(pixels), ENCODE_CHUNK):
            part = pixels[i : i + ENCODE_CHUNK]
            pad = ENCODE_CHUNK - len(part)
            if pad:
                part = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])
            chunks.append(self._encode(part)[: ENCODE_CHUNK - pad])
        return torch.cat(chunks)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with encode_precision(self.cfg.encode_dtype, pixels.device.type):
            dtype = torch.bfloat16 if self.cfg.encode_dtype == "bfloat16" else self.quant_conv.weight.dtype
            z = self._latents_fn(pixels.device)(pixels.to(dtype))
        with torch.autocast(pixels.device.type, enabled=False), _ieee_fp32(pixels.device.type == "cuda"):
            _, _, indices = self.quantize(z.float())  # nearest code in fp32 in both modes
        return indices.view(z.shape[0], z.shape[2], z.shape[3])

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixels))

    def _latents_fn(self, device: torch.device):
        """The encoder as ``_encode`` runs it: compiled once per module on a GPU when
        ``cfg.encode_compiled`` (one shape: ``ENCODE_CHUNK`` images), else eager."""
        if not (self.cfg.encode_compiled and device.type == "cuda"):
            return self._latents
        if self.__dict__.get("_compiled") is None:
            self.__dict__["_compiled"] = torch.compile(self._latents, dynamic=False)
        return self.__dict__["_compiled"]

    def warm_up(self, device: torch.device) -> float:
        """Compile the encoder now (one chunk of zeros) where ``encode`` would compile it at its
        first call; the seconds it took (0.0 where nothing is compiled)."""
        if not (self.cfg.encode_compiled and torch.device(device).type == "cuda"):
            return 0.0
        start = time.perf_counter()
        r = self.cfg.resolution
        self.encode(torch.zeros((ENCODE_CHUNK, 3, r, r), device=device))
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def __getstate__(self) -> dict:  # a compiled function does not pickle (deepcopy, spawn)
        state = self.__dict__.copy()
        state.pop("_compiled", None)
        return state

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [b, h, w] -> pixels: [b, 3, h*f, w*f], clamped to [-1, 1]."""
        if codes.min() < 0 or codes.max() >= self.cfg.num_codes:
            raise ValueError(f"VQ codes must lie in [0, {self.cfg.num_codes}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        z = self.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)


# --------------------------------------------------------------------------- released format


def vq_config_from_taming_yaml(path: Path, grid_unit_px: int = 32) -> VQConfig:
    """Read Chameleon's ``vqgan.yaml`` (taming layout: model.params.{embed_dim,n_embed,ddconfig})."""
    doc = yaml.safe_load(Path(path).read_text())
    try:
        params = doc["model"]["params"]
        dd = params["ddconfig"]
        if dd.get("double_z", False):
            raise ValueError(f"{path}: ddconfig.double_z=true is a KL autoencoder, not a VQ-GAN")
        return VQConfig(
            num_codes=int(params["n_embed"]),
            embed_dim=int(params["embed_dim"]),
            latent_channels=int(dd["z_channels"]),
            base_channels=int(dd["ch"]),
            channel_multiplier=tuple(dd["ch_mult"]),
            resolution=int(dd["resolution"]),
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
            grid_unit_px=grid_unit_px,
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a taming VQ-GAN config (missing {err}); expected "
                         "model.params.{embed_dim, n_embed, ddconfig.{z_channels, ch, ch_mult, ...}}") from None


def at_resolution(cfg: VQConfig, resolution: int) -> VQConfig:
    """``cfg`` encoding images of ``resolution`` px, with its attention blocks at the same levels.

    taming's ``ddconfig.resolution`` is not an input size: the VQ-GAN is convolutional, and the
    value only says at which levels ``attn_resolutions`` puts attention (level i works at
    resolution / 2**i). Chameleon's vqgan.yaml, for one, carries taming's default while the model
    encodes 512-px images; taking the yaml's value as the image size would shrink every image.
    """
    levels, res = [], cfg.resolution
    for i in range(len(cfg.channel_multiplier)):
        if res in cfg.attn_resolutions:
            levels.append(i)
        res //= 2
    return dataclasses.replace(cfg, resolution=resolution,
                               attn_resolutions=tuple(resolution // 2**i for i in levels))


def load_taming_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights of a released ``vqgan.ckpt`` without unpickling code (``weights_only=True``).

    Training-only entries (``loss.*``: the discriminator and LPIPS) are dropped.
    """
    try:
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal gets the same advice
        raise ValueError(f"{ckpt}: cannot be read with torch.load(weights_only=True) ({err}); "
                         "re-save only its state_dict") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt}: expected a dict with a 'state_dict' of tensors")
    return {k: v for k, v in state.items() if not k.startswith("loss.")}
