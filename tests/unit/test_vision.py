"""Continuous path: AnyRes tiling in the same code path as base resolution."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import build_tiny
from unitoken.config import ConfigError, VisionConfig
from unitoken.model.vision import (
    arrange_features,
    feature_crop,
    max_continuous_features,
    num_continuous_features,
    preprocess_continuous,
    resize_and_pad,
    select_anyres_grid,
)
from unitoken.recipes import get_recipe


def _cfg(anyres=True, max_size=96):
    return VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, image_size=32,
                        patch_size=8, anyres=anyres, anyres_max_size=max_size)


def _llava_best_pinpoint(size, pinpoints):
    """LLaVA-NeXT's select_best_resolution, written out as the spec: (width, height) of the chosen
    pinpoint, the first one in list order on an exact tie."""
    w, h = size
    best, best_key = None, None
    for pw, ph in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        key = (kept, -(pw * ph - kept))
        if best_key is None or key > best_key:
            best, best_key = (pw, ph), key
    return best


REFERENCE_PINPOINTS = [(384, 768), (768, 384), (768, 768), (384, 1152), (1152, 384)]  # (w, h), its order


def test_grid_follows_aspect_ratio():
    cfg = _cfg()
    assert select_anyres_grid(200, 60, cfg) == (1, 3)
    assert select_anyres_grid(60, 200, cfg) == (3, 1)
    assert select_anyres_grid(128, 128, cfg) == (2, 2)
    assert select_anyres_grid(128, 64, cfg) == (1, 2)


def test_7b_grid_selection_is_the_references():
    """At 7B shapes every grid is reachable (384x1152 -> 3x1, not 2x1) and the choice equals LLaVA-NeXT's
    select_best_resolution over the reference's pinpoints, exact ties included, for many image sizes."""
    cfg = get_recipe("unitoken-7b-anyres").model.vision
    assert set(cfg.allowed_grids) == {(2, 2), (1, 2), (1, 3), (2, 1), (3, 1)}
    assert select_anyres_grid(384, 1152, cfg) == (3, 1)
    assert select_anyres_grid(1152, 384, cfg) == (1, 3)
    assert select_anyres_grid(640, 480, cfg) == (2, 2)
    assert select_anyres_grid(360, 1080, cfg) == (3, 1)
    assert select_anyres_grid(100, 100, cfg) == (2, 1)  # a tie the reference's order settles
    rng = random.Random(0)
    sizes = [(rng.randint(16, 3000), rng.randint(16, 3000)) for _ in range(500)] + [(100, 100), (384, 384)]
    for size in sizes:
        pw, ph = _llava_best_pinpoint(size, REFERENCE_PINPOINTS)
        assert select_anyres_grid(*size, cfg) == (ph // 384, pw // 384), size


def test_anyres_max_size_is_a_pixel_budget():
    """anyres_max_size bounds the canvas area: 700 px drops the 2x2 grid (768x768) but keeps 1x3 (384x1152)."""
    s = get_recipe("unitoken-7b-anyres").model.vision
    tight = dataclasses.replace(s, anyres_max_size=700)
    assert (2, 2) not in tight.allowed_grids and {(1, 3), (3, 1), (1, 2), (2, 1)} <= set(tight.allowed_grids)
    with pytest.raises(ConfigError, match=r"anyres_max_size: 500 admits none of anyres_grids.*fix: use anyres_max_size >= 544"):
        dataclasses.replace(s, anyres_max_size=500)


def test_resize_and_pad_keeps_aspect_ratio():
    """The image is scaled to fit the canvas and centred on black; nothing is stretched."""
    img = Image.new("RGB", (200, 60), (255, 0, 0))
    canvas = resize_and_pad(img, (96, 32))  # scale 0.48: 96 x ceil(28.8) = 96 x 29, padded 1 above, 2 below
    px = torch.from_numpy(np.asarray(canvas).copy())
    assert canvas.size == (96, 32)
    assert (px[1:30] == torch.tensor([255, 0, 0])).all()
    assert (px[0] == 0).all() and (px[30:] == 0).all()


def test_tiles_are_spatial_crops_of_the_padded_canvas():
    """Tile (r, c) is the crop at row r, column c of the resized-and-padded image."""
    cfg = _cfg()
    img = Image.new("RGB", (64, 64))
    img.paste((255, 0, 0), (32, 32, 64, 64))  # bottom-right quadrant red
    tiles, grid = preprocess_continuous(img, cfg)
    assert grid == (2, 2)
    assert tiles[4, 0].mean() > 0.9 and tiles[1, 0].mean() < -0.9  # tile 3 (after base) is bottom-right
    wide, grid = preprocess_continuous(Image.new("RGB", (200, 60), (255, 255, 255)), cfg)
    assert grid == (1, 3) and wide.shape == (4, 3, 32, 32)
    assert (wide[1:, :, 0] == -1).all() and (wide[1:, :, 1:30] == 1).all()  # black pad row, then the image


def test_feature_crop_is_the_unpadding():
    """The feature rows (or columns) that saw only padding are cut, as LLaVA-NeXT's unpad_image does."""
    p = 27
    assert feature_crop((2, 2), (640, 480), p) == (slice(7, 47), slice(0, 54))  # 54 * 480/640 = 40.5 -> 40 rows
    assert feature_crop((3, 1), (360, 1080), p) == (slice(0, 81), slice(0, 27))  # the grid's own aspect: all
    assert feature_crop((1, 2), (400, 300), p) == (slice(0, 27), slice(9, 45))  # 27 * 400/300 = 36 columns
    assert feature_crop((2, 2), (1000, 650), p) == (slice(9, 45), slice(0, 54))  # 35.1 -> 35: odd gap keeps 36


def test_tiles_and_feature_count():
    """features = p^2 + kept rows * (kept cols + 1 end-of-row marker); base only without AnyRes."""
    cfg = _cfg()
    assert num_continuous_features((1, 3), (200, 60), cfg) == 16 + 4 * (3 * 4 + 1)
    assert num_continuous_features((1, 3), (300, 60), cfg) == 16 + 2 * (3 * 4 + 1)  # 1 padding row cut each side
    base_tiles, base_grid = preprocess_continuous(Image.new("RGB", (200, 60)), _cfg(anyres=False))
    assert base_grid == (0, 0) and base_tiles.shape == (1, 3, 32, 32)
    assert num_continuous_features(base_grid, (200, 60), cfg) == 16


def test_max_continuous_features_bounds_every_image():
    """No image size gives more features than max_continuous_features (7B: 729 + 54 * 55 = 3,699)."""
    cfg = get_recipe("unitoken-7b-anyres").model.vision
    assert max_continuous_features(cfg) == 3699
    assert max_continuous_features(get_recipe("unitoken-7b").model.vision) == 729
    rng = random.Random(1)
    for _ in range(300):
        size = (rng.randint(8, 4000), rng.randint(8, 4000))
        assert num_continuous_features(select_anyres_grid(*size, cfg), size, cfg) <= 3699


def test_arrange_places_features_spatially():
    p, d = 2, 3
    feats = torch.arange(3 * p * p * d, dtype=torch.float).view(3, p * p, d)  # base + 1x2 tiles
    row_end = torch.full((d,), -1.0)
    [out] = arrange_features(feats, [(1, 2)], [(2 * p, p)], row_end, p)
    assert out.shape == (p * p + p * (2 * p + 1), d)
    body = out[p * p:].view(p, 2 * p + 1, d)
    assert torch.equal(body[:, -1], row_end.expand(p, d))
    assert torch.equal(body[0, :p], feats[1].view(p, p, d)[0])   # left tile, first row
    assert torch.equal(body[0, p:2 * p], feats[2].view(p, p, d)[0])  # right tile, first row


def test_arrange_cuts_padding_rows():
    """A 1x2 grid of a 5:1 image keeps only the middle feature rows, each ending with the marker."""
    p, d = 4, 2
    feats = torch.arange(3 * p * p * d, dtype=torch.float).view(3, p * p, d)
    row_end = torch.full((d,), -1.0)
    [out] = arrange_features(feats, [(1, 2)], [(500, 100)], row_end, p)  # 8 * 100/500 = 1.6 -> 1: rows 1:3
    full = feats[1:].view(2, p, p, d).permute(1, 0, 2, 3).reshape(p, 2 * p, d)
    body = out[p * p:].view(2, 2 * p + 1, d)
    assert torch.equal(body[:, :-1], full[1:3]) and (body[:, -1] == -1).all()
    assert out.shape[0] == num_continuous_features((1, 2), (500, 100), _cfg(max_size=1000)) == 16 + 2 * 9


def test_anyres_row_end_is_the_newline_embedding():
    """The end-of-row marker is the newline token's embedding (no parameter of its own), and the loss
    reaches that embedding row through it."""
    from unitoken.model.generation import prepare_images
    from unitoken.model.sequence import pad_batch

    model, _, b = build_tiny(anyres=True)
    assert not any("row_end" in name for name, _ in model.named_parameters())
    inputs, cont = prepare_images(model, [Image.new("RGB", (96, 32), (0, 128, 255))])
    assert cont.grids == [(1, 3)] and inputs[0].num_continuous == 16 + 4 * 13
    with torch.no_grad():
        feats = model.encode_continuous(cont)
    newline = model.llm.embed_tokens.weight[model.tokens.newline]
    ends = feats[16:].view(4, 13, -1)[:, -1]
    assert torch.equal(ends, newline.expand_as(ends))
    enc = b.conversation([{"from": "human", "value": "<|image|>?"}, {"from": "gpt", "value": "blue"}], inputs)
    out = model(**pad_batch([enc], model.tokens.pad), images=cont)
    out["loss"].backward()
    assert model.llm.embed_tokens.weight.grad[model.tokens.newline].abs().sum() > 0


@pytest.mark.parametrize("size", [(640, 480), (360, 1080), (1080, 360), (300, 60), (61, 999), (500, 500), (33, 32)])
def test_anyres_placeholders_equal_features(size):
    """For any image size the sequence holds exactly as many placeholders as the model makes features."""
    from unitoken.model.generation import prepare_images

    model, _, b = build_tiny(anyres=True)
    inputs, cont = prepare_images(model, [Image.new("RGB", size, (9, 99, 199))])
    enc = b.conversation([{"from": "human", "value": "<|image|>"}, {"from": "gpt", "value": "x"}], inputs)
    with torch.no_grad():
        feats = model.encode_continuous(cont)
        model.embed(torch.tensor([enc.input_ids]), cont)  # raises on a count mismatch
    assert feats.shape[0] == inputs[0].num_continuous == enc.input_ids.count(model.tokens.continuous)
