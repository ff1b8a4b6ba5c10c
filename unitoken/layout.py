"""The sequence layout's arithmetic: how many tokens an image block takes, the shortest row that
holds a conversation, the smallest vocabulary, the continuous features of an AnyRes grid.

Pure functions of the config, below the model code: ``config`` and ``recipes`` check a recipe
with them, and the model code (``model.sequence``, ``model.vision``, ``model.tokens``) builds
what they count.
"""

from __future__ import annotations

from typing import Any

# ``cfg`` is a ``unitoken.config.ModelConfig`` (``VisionCfg`` its ``vision``): named, not imported,
# since config imports this module to validate recipes
ModelCfg = VisionCfg = Any

TOKEN_NAMES = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "boi": "<racm3:break>",
    "eoi": "<eoss>",
    "sep": "<sentinel:0>",
    "newline": "<reserved08799>",
    "end_of_turn": "<reserved08706>",
    "continuous": "<reserved08707>",
}


def feature_crop(grid: tuple[int, int], image_size: tuple[int, int], p: int) -> tuple[slice, slice]:
    """(rows, cols) slices of a grid's [rows*p, cols*p] feature map that cover the image and not
    the padding around it (LLaVA-NeXT's ``unpad_image``, in feature units).

    Args:
        grid: (rows, cols) of tiles; image_size: the original (width, height); p: patches per side.
    """
    h, w = grid[0] * p, grid[1] * p
    img_w, img_h = image_size
    if img_w / img_h > w / h:  # wider than the canvas: the padding is above and below
        pad = (h - int(img_h * (w / img_w))) // 2
        return slice(pad, h - pad), slice(0, w)
    pad = (w - int(img_w * (h / img_h))) // 2
    return slice(0, h), slice(pad, w - pad)


def num_continuous_features(grid: tuple[int, int], image_size: tuple[int, int], cfg: VisionCfg) -> int:
    """Embeddings one image contributes to the sequence: p*p base features, then for an AnyRes
    grid the unpadded feature rows, each with one end-of-row marker.

    Args:
        grid: (rows, cols) from ``preprocess_continuous``; (0, 0) = base only.
        image_size: the original (width, height) of the image (unused for (0, 0)).
    """
    p = cfg.patches_per_side
    if not grid[0] * grid[1]:
        return p * p
    rows, cols = feature_crop(grid, image_size, p)
    return p * p + (rows.stop - rows.start) * (cols.stop - cols.start + 1)


def max_continuous_features(cfg: VisionCfg) -> int:
    """The most embeddings one image can contribute under ``cfg``: an image with its grid's
    exact aspect ratio loses nothing to unpadding, so the largest allowed canvas decides
    (unitoken-7b-anyres: 729 + 54 * 55 = 3,699 for the 2x2 grid)."""
    s = cfg.image_size
    if not cfg.anyres:
        return num_continuous_features((0, 0), (s, s), cfg)
    return max(num_continuous_features(g, (g[1] * s, g[0] * s), cfg) for g in cfg.allowed_grids)


# [BOS] human-turn [EOT] gpt-turn [EOT] [EOS]: the tokens a conversation adds around its content
CONVERSATION_FRAME = 4


def image_block_len(cfg: ModelCfg, num_continuous: int, as_output: bool = False) -> int:
    """Tokens of one image block from ``SequenceBuilder.image`` for the config's square VQ grid."""
    c = cfg.vq.codes_per_side
    discrete = 2 + c * (c + 1)  # [H][W], then each row of codes + [NL]
    if as_output or cfg.encoder_mode == "discrete":
        return 1 + discrete + 1
    if cfg.encoder_mode == "continuous":
        return 1 + num_continuous + 1
    return 1 + discrete + 1 + num_continuous + 1  # [BOI] discrete [SEP] continuous [EOI]


def max_input_image_tokens(cfg: ModelCfg) -> int:
    """Tokens of the longest input-image block ``cfg`` can produce: with AnyRes, the allowed
    grid with the most features for an image of that grid's aspect ratio (unitoken-7b-anyres:
    1,060 discrete + [SEP] + 3,699 continuous = 4,760; unitoken-7b: 1,790)."""
    return image_block_len(cfg, max_continuous_features(cfg.vision))


def min_seq_len(cfg: ModelCfg) -> int:
    """The shortest row that holds a one-image conversation with a one-token answer for ``cfg``:
    a max_seq_len below it cannot train on every image the config accepts."""
    return max_input_image_tokens(cfg) + CONVERSATION_FRAME + 1


def min_vocab_size(num_codes: int, max_grid: int) -> int:
    """Smallest ``vocab_size`` that ``build_tokenizer`` accepts."""
    return len(TOKEN_NAMES) + max_grid + 256 + num_codes
