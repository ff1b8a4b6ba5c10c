"""The continuous path: SigLIP vision tower + MLP adapter, with AnyRes tiling as a config flag.

Without AnyRes an image becomes ``p*p`` features (SigLIP-so400m at 384 px: 27*27 = 729).
With AnyRes the image is also cut into the grid (from ``VisionConfig.anyres_grids``) that
keeps most of its resolution; each tile runs through the same tower, the tile features are
laid out at their spatial positions, and every row of the result ends with a learned
end-of-row embedding. Base features come first. One code path serves both.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unitoken.config import VisionConfig


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

    def __init__(self, vision_hidden: int, llm_hidden: int, anyres: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_hidden, llm_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)
        # End-of-row marker between rows of AnyRes tile features (LLaVA-NeXT's image_newline).
        self.row_end = nn.Parameter(torch.zeros(llm_hidden)) if anyres else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- tiling


def select_anyres_grid(width: int, height: int, cfg: VisionConfig) -> tuple[int, int]:
    """Pick (rows, cols) that keeps the most image resolution, then wastes the fewest pixels."""
    best, best_key = cfg.anyres_grids[0], None
    tile = cfg.image_size
    for rows, cols in cfg.anyres_grids:
        if max(rows, cols) * tile > cfg.anyres_max_size and (rows, cols) != cfg.anyres_grids[0]:
            continue
        scale = min(cols * tile / width, rows * tile / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = rows * cols * tile * tile - effective
        key = (effective, -waste)
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


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
    """Image -> (tiles [1 + rows*cols, 3, s, s], (rows, cols)); (0, 0) when AnyRes is off."""
    s = cfg.image_size
    base = to_tensor(image, (s, s))
    if not cfg.anyres:
        return base.unsqueeze(0), (0, 0)
    rows, cols = select_anyres_grid(image.width, image.height, cfg)
    big = to_tensor(image, (cols * s, rows * s))
    tiles = big.unfold(1, s, s).unfold(2, s, s)  # [3, rows, cols, s, s]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, s, s)
    return torch.cat([base.unsqueeze(0), tiles]), (rows, cols)


def num_continuous_features(grid: tuple[int, int], cfg: VisionConfig) -> int:
    """Embeddings one image contributes to the sequence for a given AnyRes grid."""
    p = cfg.patches_per_side
    rows, cols = grid
    return p * p + rows * p * (cols * p + 1)


def arrange_features(
    feats: torch.Tensor, grids: list[tuple[int, int]], row_end: torch.Tensor | None, p: int
) -> list[torch.Tensor]:
    """Per-tile features -> per-image sequences.

    Args:
        feats: [n_tiles, p*p, d], tiles of all images in order (base tile first per image).
        grids: (rows, cols) per image; (0, 0) means base tile only.
        row_end: [d] end-of-row embedding (required when any grid is non-empty).
        p: patches per side.

    Returns:
        one [num_continuous_features(grid), d] tensor per image.
    """
    out, i = [], 0
    for rows, cols in grids:
        parts = [feats[i]]
        i += 1
        if rows * cols:
            d = feats.shape[-1]
            t = feats[i : i + rows * cols].view(rows, cols, p, p, d)
            t = t.permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, d)
            t = torch.cat([t, row_end.view(1, 1, d).expand(rows * p, 1, d).to(t.dtype)], dim=1)
            parts.append(t.reshape(-1, d))
            i += rows * cols
        out.append(torch.cat(parts))
    if i != feats.shape[0]:
        raise ValueError(f"grids describe {i} tiles but {feats.shape[0]} tiles were encoded")
    return out
