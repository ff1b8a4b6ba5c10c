"""The continuous path: SigLIP vision tower + MLP adapter, with AnyRes tiling as a config flag.

Without AnyRes an image becomes ``p*p`` features (SigLIP-so400m at 384 px: 27*27 = 729).
With AnyRes (LLaVA-NeXT's scheme, as the UniToken reference uses it) the image also gets a
grid of tiles: the grid whose canvas keeps most of the image's resolution is chosen, the image
is resized into that canvas keeping its aspect ratio and padded, each tile runs through the
same tower, the tile features are laid out at their spatial positions, the rows and columns
that only saw padding are cut away, and every remaining row ends with the newline token's
embedding. Base features (the whole image squeezed to one tile) come first. One code path
serves both.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unitoken.config import VisionConfig
from unitoken.layout import feature_crop, max_continuous_features, num_continuous_features  # noqa: F401


def siglip_config(cfg: VisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=False,  # UniToken uses the patch features, not the pooled head
    )


def build_vision_tower(cfg: VisionConfig) -> SiglipVisionModel:
    return SiglipVisionModel(siglip_config(cfg))


class Adapter(nn.Module):
    """Linear -> GELU -> Linear from the vision width to the LLM width."""

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_hidden, llm_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- tiling


def select_anyres_grid(width: int, height: int, cfg: VisionConfig) -> tuple[int, int]:
    """(rows, cols) of the allowed grid that keeps the most image pixels, then wastes the fewest.

    LLaVA-NeXT's ``select_best_resolution`` over the grids' canvases (``cols*s`` x ``rows*s``).
    Exact ties (equal canvases, e.g. 1x2 vs 2x1 for a small square image) go to the grid with
    more rows, which is what the reference's pinpoint order ([384, 768] before [768, 384])
    picks.
    """
    s = cfg.image_size

    def score(grid: tuple[int, int]) -> tuple[int, int, int]:
        rows, cols = grid
        scale = min(cols * s / width, rows * s / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, -(rows * cols * s * s - kept), rows

    return max(cfg.allowed_grids, key=score)


def resize_and_pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Fit ``image`` into a ``size`` = (w, h) canvas keeping its aspect ratio, centred on black
    (LLaVA-NeXT's ``resize_and_pad_image``): stretching would distort what the tiles show."""
    w, h = size
    if w / image.width < h / image.height:
        new = (w, min(math.ceil(image.height * w / image.width), h))
    else:
        new = (min(math.ceil(image.width * h / image.height), w), h)
    canvas = Image.new("RGB", size, (0, 0, 0))
    canvas.paste(image.resize(new, Image.Resampling.BICUBIC), ((w - new[0]) // 2, (h - new[1]) // 2))
    return canvas


def to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL -> [3, h, w] float in [-1, 1] (SigLIP and Chameleon both normalise with 0.5/0.5)."""
    img = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, h, w] in [-1, 1] -> RGB PIL image (the inverse of ``to_tensor``)."""
    arr = ((pixels.float().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.cpu().numpy(), mode="RGB")


def square(image: Image.Image) -> Image.Image:
    """Centre crop to a square (the discrete path has a fixed square grid)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def vq_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """[3, r, r] in [-1, 1]: what the VQ-GAN encodes (centre square, resized)."""
    return to_tensor(square(image.convert("RGB")), (resolution, resolution))


def preprocess_continuous(image: Image.Image, cfg: VisionConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> (tiles [1 + rows*cols, 3, s, s], (rows, cols)); (0, 0) when AnyRes is off.

    Tile 0 is the whole image squeezed to s x s (the base view, as SigLIP's processor does);
    the others are the grid's tiles, row by row, of the resized-and-padded canvas. The model
    needs ``image.size`` as well, to cut the padding out of the features.
    """
    s = cfg.image_size
    base = to_tensor(image, (s, s))
    if not cfg.anyres:
        return base.unsqueeze(0), (0, 0)
    rows, cols = select_anyres_grid(image.width, image.height, cfg)
    canvas = resize_and_pad(image.convert("RGB"), (cols * s, rows * s))
    big = to_tensor(canvas, canvas.size)
    tiles = big.unfold(1, s, s).unfold(2, s, s)  # [3, rows, cols, s, s]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, s, s)
    return torch.cat([base.unsqueeze(0), tiles]), (rows, cols)


def arrange_features(
    feats: torch.Tensor, grids: list[tuple[int, int]], sizes: list[tuple[int, int]], row_end: torch.Tensor | None,
    p: int,
) -> list[torch.Tensor]:
    """Per-tile features -> per-image sequences.

    Args:
        feats: [n_tiles, p*p, d], tiles of all images in order (base tile first per image).
        grids: (rows, cols) per image; (0, 0) means base tile only.
        sizes: original (width, height) per image (cuts the padding out of AnyRes features).
        row_end: [d] end-of-row embedding, the newline token's (required when any grid is non-empty).
        p: patches per side.

    Returns:
        one [num_continuous_features(grid, size), d] tensor per image.
    """
    out, i = [], 0
    d = feats.shape[-1]
    for (rows, cols), size in zip(grids, sizes, strict=True):
        parts = [feats[i]]
        i += 1
        if rows * cols:
            t = feats[i : i + rows * cols].view(rows, cols, p, p, d)
            t = t.permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, d)
            t = t[feature_crop((rows, cols), size, p)]
            t = torch.cat([t, row_end.view(1, 1, d).expand(t.shape[0], 1, d).to(t.dtype)], dim=1)
            parts.append(t.reshape(-1, d))
            i += rows * cols
        out.append(torch.cat(parts))
    if i != feats.shape[0]:
        raise ValueError(f"grids describe {i} tiles but {feats.shape[0]} tiles were encoded")
    return out
