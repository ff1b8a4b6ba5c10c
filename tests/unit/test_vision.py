"""Continuous path: AnyRes tiling in the same code path as base resolution."""

import torch
from PIL import Image

from tests.conftest import build_tiny
from unitoken.config import VisionConfig
from unitoken.model.vision import arrange_features, num_continuous_features, preprocess_continuous, select_anyres_grid


def _cfg(anyres=True):
    return VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, image_size=32,
                        patch_size=8, anyres=anyres, anyres_max_size=96)


def test_grid_follows_aspect_ratio():
    cfg = _cfg()
    assert select_anyres_grid(200, 60, cfg) == (1, 3)
    assert select_anyres_grid(60, 200, cfg) == (3, 1)
    assert select_anyres_grid(128, 128, cfg) == (2, 2)
    assert select_anyres_grid(128, 64, cfg) == (1, 2)


def test_tiles_and_feature_count():
    """Wide image -> base + 1x3 tiles; features = p^2 + rows*p*(cols*p + 1) with end-of-row markers."""
    cfg = _cfg()
    tiles, grid = preprocess_continuous(Image.new("RGB", (200, 60)), cfg)
    assert grid == (1, 3) and tiles.shape == (4, 3, 32, 32)
    assert num_continuous_features(grid, cfg) == 16 + 1 * 4 * (3 * 4 + 1)
    base_tiles, base_grid = preprocess_continuous(Image.new("RGB", (200, 60)), _cfg(anyres=False))
    assert base_grid == (0, 0) and base_tiles.shape == (1, 3, 32, 32)
    assert num_continuous_features(base_grid, cfg) == 16


def test_tiles_are_spatial_crops():
    """Tile (r, c) is the crop at row r, column c of the resized image."""
    cfg = _cfg()
    img = Image.new("RGB", (64, 64))
    img.paste((255, 0, 0), (32, 32, 64, 64))  # bottom-right quadrant red
    tiles, grid = preprocess_continuous(img, cfg)
    assert grid == (2, 2)
    assert tiles[4, 0].mean() > 0.9 and tiles[1, 0].mean() < -0.9  # tile 3 (after base) is bottom-right


def test_arrange_places_features_spatially():
    p, d = 2, 3
    feats = torch.arange(3 * p * p * d, dtype=torch.float).view(3, p * p, d)  # base + 1x2 tiles
    row_end = torch.full((d,), -1.0)
    [out] = arrange_features(feats, [(1, 2)], row_end, p)
    assert out.shape == (p * p + p * (2 * p + 1), d)
    body = out[p * p:].view(p, 2 * p + 1, d)
    assert torch.equal(body[:, -1], row_end.expand(p, d))
    assert torch.equal(body[0, :p], feats[1].view(p, p, d)[0])   # left tile, first row
    assert torch.equal(body[0, p:2 * p], feats[2].view(p, p, d)[0])  # right tile, first row


def test_anyres_model_end_to_end():
    """The tiny model with AnyRes on runs a loss over a wide image."""
    from unitoken.model.generation import prepare_images
    from unitoken.model.sequence import pad_batch

    model, _, b = build_tiny(anyres=True)
    inputs, cont = prepare_images(model, [Image.new("RGB", (96, 32), (0, 128, 255))])
    assert inputs[0].num_continuous > 16
    enc = b.conversation([{"from": "human", "value": "<|image|>?"}, {"from": "gpt", "value": "blue"}], inputs)
    out = model(**pad_batch([enc], model.tokens.pad), images=cont)
    out["loss"].backward()
    assert model.adapter.row_end.grad is not None
