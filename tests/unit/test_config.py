"""Config validation and recipes."""

import dataclasses

import pytest
import torch
from PIL import Image

from unitoken.config import (
    ConfigError,
    LLMConfig,
    OptimConfig,
    Recipe,
    StageConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from unitoken.recipes import RECIPES, get_recipe


def test_invalid_field_is_named_with_fix():
    """A bad value raises ConfigError naming the field and a fix."""
    with pytest.raises(ConfigError, match=r"hidden_size: 100 is not divisible by num_heads=3; fix:"):
        LLMConfig(hidden_size=100, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=1, vocab_size=10)


def test_override_path_is_named():
    """A --set error names the full dotted path."""
    with pytest.raises(ConfigError, match=r"model\.llm\.num_heads|hidden_size"):
        get_recipe("tiny", ["model.llm.num_heads=3"])
    with pytest.raises(ConfigError, match=r"unknown field 'nope' under model\.llm"):
        get_recipe("tiny", ["model.llm.nope=1"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        get_recipe("tiny", ["model.llm.num_heads"])
    with pytest.raises(ConfigError, match=r"model\.encoder_mode: unknown mode 'both'"):
        get_recipe("tiny", ["model.encoder_mode=both"])
    with pytest.raises(ConfigError, match=r"train\.stage1\.trainable: unknown module prefixes \['vit'\]"):
        get_recipe("tiny", ["train.stage1.trainable=[vit]"])


def test_override_applies_and_types_are_checked():
    """Overrides are YAML-typed and type-checked."""
    r = get_recipe("tiny", ["model.llm.num_layers=3", "train.stage2.optim.lr=0.01"])
    assert r.model.llm.num_layers == 3 and r.train.stage2.optim.lr == 0.01
    with pytest.raises(ConfigError, match=r"model\.llm\.num_layers: expected an integer, got 'three'"):
        get_recipe("tiny", ["model.llm.num_layers=three"])


def test_unknown_recipe():
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("huge")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_roundtrip_through_dict(name):
    """Every recipe serialises and rebuilds identically (the hand-off config)."""
    r = get_recipe(name)
    assert from_dict(Recipe, to_dict(r)) == r


def test_recipes_derive_and_follow_paper_stages():
    """Stage I trains vision+adapter at LR 1e-3 (ViT 1e-5); stages II/III train all at 1e-5."""
    r = get_recipe("unitoken-7b")
    s1, s2, s3 = r.train.stage1, r.train.stage2, r.train.stage3
    assert set(s1.trainable) == {"vision", "adapter"}
    assert (s1.optim.lr, s1.optim.vision_lr) == (1e-3, 1e-5)
    assert set(s2.trainable) == set(s3.trainable) == {"vision", "adapter", "llm", "lm_head"}
    assert s2.optim.lr == s3.optim.lr == 1e-5
    assert s2.optim.betas == (0.9, 0.95) and s2.optim.weight_decay == 0.1 and s2.optim.grad_clip == 4.0
    assert r.model.z_loss_weight == 1e-5 and r.train.dropout == 0.05
    assert s2.understanding_ratio == s2.generation_ratio
    anyres = get_recipe("unitoken-7b-anyres")
    assert anyres.model.vision.anyres and dataclasses.replace(anyres.model.vision, anyres=False) == r.model.vision


@pytest.mark.parametrize("name", ["unitoken-7b", "unitoken-7b-anyres", "unitoken-7b-fast"])
def test_paper_recipes_carry_stage3_mix_sampling_and_frozen_vision_embeddings(name):
    """The 7B recipes: stage III mixes 423K dialogues with 100K fine-grained T2I (4.23:1), images are sampled with
    the paper's GenEval CFG 5.5 and the reference's image top-k 4000, SigLIP's embeddings stay frozen."""
    r = get_recipe(name)
    s3 = r.train.stage3
    assert s3.understanding_ratio / s3.generation_ratio == pytest.approx(423 / 100)
    assert r.train.stage2.understanding_ratio == r.train.stage2.generation_ratio
    assert (r.sampling.cfg, r.sampling.top_k) == (5.5, 4000)
    assert r.train.freeze_vision_embeddings


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_recipes_keep_their_mix_and_sampling(name):
    """tiny and small keep 1:1 in stage 3, the CLI's former sampling defaults, and a trainable ViT (random init)."""
    r = get_recipe(name)
    assert r.train.stage3.understanding_ratio == r.train.stage3.generation_ratio
    assert (r.sampling.cfg, r.sampling.top_k) == (3.0, 0)
    assert not r.train.freeze_vision_embeddings


def test_sampling_validated():
    with pytest.raises(ConfigError, match="top_k"):
        get_recipe("tiny", ["sampling.top_k=-1"])


def test_stage_ratios_validated():
    with pytest.raises(ConfigError, match="understanding_ratio"):
        StageConfig(trainable=("llm",), optim=OptimConfig(lr=1, vision_lr=1), max_steps=1, batch_size=1,
                    understanding_ratio=0, generation_ratio=0)


def test_apply_overrides_revalidates_nested():
    r = get_recipe("tiny")
    with pytest.raises(ConfigError, match="betas"):
        apply_overrides(r, ["train.stage1.optim.betas=[0.9, 1.5]"])


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_stage3_data_keeps_every_evaluated_question_and_prompt(name):
    """Stage 3 is the model that gets evaluated: its data must still hold every shapes-vqa question
    type and every shapes-geneval category (tuning on dialogues alone forgot positions and
    multiple choice: the tiny GPU run never answered with a letter)."""
    import random

    from unitoken.data.shapes import ShapeObject
    from unitoken.data.synth import CATEGORIES, Scene, scene_records

    stage3 = set(get_recipe(name).train.stage3.sources)
    objects = [ShapeObject("circle", "red", "small", 0, 0), ShapeObject("square", "blue", "large", 1, 1)]
    qtypes, categories = set(), set()
    for seed in range(20):
        for category in CATEGORIES:
            scene = Scene("s", "train", category, objects, "p")
            for rec in scene_records(scene, "i.png", random.Random(seed)):
                if rec["source"] in stage3:
                    qtypes.add(rec["meta"].get("qtype"))
                    categories.add(rec["meta"].get("category"))
    assert {"color", "shape", "count", "position", "mc_color", "mc_shape"} <= qtypes
    assert set(CATEGORIES) <= categories


ANYRES_RECIPES = [name for name in sorted(RECIPES) if RECIPES[name]().model.vision.anyres]


def test_some_recipe_is_anyres():
    """The AnyRes row-budget test below has a recipe to check (a renamed recipe would silently skip it)."""
    assert ANYRES_RECIPES == ["unitoken-7b-anyres"]


@pytest.mark.parametrize("name", ANYRES_RECIPES)
def test_anyres_recipe_rows_fit_every_grid(name):
    """With the real shapes and tokenizer (computed, not trained): the worst image of every allowed grid
    (one of the grid's own aspect, so nothing is cut as padding) and ordinary photos fit every stage's
    rows together with the text room the paper's 4,096-token rows leave beside a base image."""
    from unitoken.model.sequence import ImageInput, SequenceBuilder, max_input_image_tokens
    from unitoken.model.tokens import SpecialTokens, build_tokenizer
    from unitoken.model.vision import (
        num_continuous_features,
        preprocess_continuous,
        select_anyres_grid,
    )

    cfg = get_recipe(name).model
    base = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, anyres=False))
    text_room = 4096 - max_input_image_tokens(base)
    assert text_room == 2306
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    builder = SequenceBuilder(SpecialTokens.from_vocab(tok.get_vocab(), cfg.max_grid_tokens), tok, cfg)
    s, c = cfg.vision.image_size, cfg.vq.codes_per_side
    canvases = [(cols * s, rows * s) for rows, cols in cfg.vision.allowed_grids]
    photos = [(640, 480), (480, 640), (360, 1080), (1080, 360), (1920, 1080), (4000, 3000), (300, 300)]
    lengths, grids = {}, set()
    for size in canvases + photos:
        grid = select_anyres_grid(*size, cfg.vision)
        grids.add(grid)
        image = ImageInput(codes=torch.zeros(c, c, dtype=torch.long),
                           num_continuous=num_continuous_features(grid, size, cfg.vision))
        enc = builder.conversation([{"from": "human", "value": "<|image|>"}, {"from": "gpt", "value": ""}], [image])
        lengths[size] = len(enc.input_ids)
        for n in (1, 2, 3):
            assert lengths[size] + text_room <= get_recipe(name).train.stage(n).max_seq_len, (size, grid)
    assert grids == set(cfg.vision.allowed_grids) == {(2, 2), (1, 2), (1, 3), (2, 1), (3, 1)}
    assert max(lengths.values()) == max_input_image_tokens(cfg) + 4 == 4764  # [BOS] [EOT] [EOT] [EOS]
    assert lengths[(640, 480)] == 4 + 1060 + 1 + 729 + 40 * 55  # 2x2, 7 padding rows cut above and below
    assert lengths[(360, 1080)] == 4 + 1060 + 1 + 729 + 81 * 28  # 3x1
    tiles, grid = preprocess_continuous(Image.new("RGB", (360, 1080)), cfg.vision)
    assert grid == (3, 1) and tiles.shape == (4, 3, 384, 384)


def test_recipe_rows_too_short_for_one_image_are_refused():
    """Turning AnyRes on without longer rows fails validation, naming the field and the numbers."""
    with pytest.raises(ConfigError, match=r"train\.stage1\.max_seq_len: 4096 tokens cannot hold one input image "
                                          r"of this model \(4760 tokens at worst, AnyRes grids included\).*at least 4765"):
        get_recipe("unitoken-7b", ["model.vision.anyres=true"])
    r = get_recipe("unitoken-7b", ["model.vision.anyres=true"] + [f"train.stage{n}.max_seq_len=7168" for n in (1, 2, 3)])
    assert r.model.vision.anyres
