"""The UniToken sequence layout and its labels."""

import pytest
import torch

from unitoken.model.sequence import IGNORE, ImageInput, SequenceBuilder
from unitoken.model.tokens import IMAGE_PLACEHOLDER


def _img(h=8, w=8, n_cont=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageInput(codes=torch.randint(0, 256, (h, w), generator=g), num_continuous=n_cont)


def _expected_image_block(b: SequenceBuilder, img: ImageInput) -> list[int]:
    t = b.tokens
    block = [t.boi, t.grid[2], t.grid[2]]  # 8 codes * 8 px = 64 px = 2 units of 32 px
    for row in img.codes:
        block += [int(t.code_to_token[c]) for c in row] + [t.newline]
    return block + [t.sep] + [t.continuous] * img.num_continuous + [t.eoi]


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_layout_and_labels(tiny, n_images):
    """[BOS] human(text + n dual image blocks)[EOT] gpt(answer)[EOT][EOS]; only the answer is labelled."""
    _, tok, b = tiny
    t = b.tokens
    images = [_img(seed=i) for i in range(n_images)]
    question = "".join(f"{IMAGE_PLACEHOLDER} pic {i} " for i in range(n_images)) + "What?"
    enc = b.conversation([{"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}], images)

    expected, human = [t.bos], []
    for i in range(n_images):
        human += _expected_image_block(b, images[i]) + tok.encode(f" pic {i} ", add_special_tokens=False)
    human += tok.encode("What?", add_special_tokens=False) + [t.end_of_turn]
    answer = tok.encode("A cat.", add_special_tokens=False) + [t.end_of_turn, t.eos]
    expected += human + answer
    assert enc.input_ids == expected
    assert enc.labels == [IGNORE] * (1 + len(human)) + answer
    assert enc.input_ids.count(t.continuous) == 16 * n_images
    assert enc.input_ids.count(t.sep) == n_images


def test_paper_token_count_at_512px():
    """A 512 px image is 1,060 discrete tokens and 1,790 in dual mode (REFERENCE.md)."""
    from unitoken.model.tokens import build_tokenizer
    from unitoken.recipes import get_recipe

    cfg = get_recipe("unitoken-7b").model
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    from unitoken.model.tokens import SpecialTokens

    t = SpecialTokens.from_vocab(tok.get_vocab(), cfg.max_grid_tokens)
    b = SequenceBuilder(t, tok, cfg)
    img = ImageInput(codes=torch.zeros(32, 32, dtype=torch.long), num_continuous=27 * 27)
    block = b.image(img)
    assert len(block) == 1790
    assert len(b.image(img, as_output=True)) == 1060
    assert block[1:3] == [tok.convert_tokens_to_ids("<reserved08816>")] * 2


def test_generated_image_is_supervised_discrete_block(tiny):
    """An image in a gpt turn is a labelled discrete block (generation target), no SEP/continuous."""
    _, _, b = tiny
    t = b.tokens
    img = _img()
    enc = b.conversation([{"from": "human", "value": "draw"}, {"from": "gpt", "value": IMAGE_PLACEHOLDER}], [img])
    start = enc.input_ids.index(t.boi)
    block = enc.input_ids[start: start + 1 + 2 + 8 * 9 + 1]
    assert block[-1] == t.eoi and t.sep not in enc.input_ids and t.continuous not in enc.input_ids
    assert enc.labels[start: start + len(block)] == block


def test_placeholder_mismatch_raises_with_counts(tiny):
    _, _, b = tiny
    with pytest.raises(ValueError, match=r"2 <\|image\|> placeholders but 1 images"):
        b.conversation([{"from": "human", "value": IMAGE_PLACEHOLDER * 2}], [_img()])


def test_unknown_role_raises(tiny):
    _, _, b = tiny
    with pytest.raises(ValueError, match="unknown conversation role 'system'"):
        b.conversation([{"from": "system", "value": "x"}], [])


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_encoder_mode_layouts(tiny, mode):
    """discrete: [BOI][H][W]rows[EOI]; continuous: [BOI]{cont}[EOI]."""
    from unitoken.recipes import get_recipe

    _, tok, b = tiny
    cfg = get_recipe("tiny", [f"model.encoder_mode={mode}"]).model
    bm = SequenceBuilder(b.tokens, tok, cfg)
    t = b.tokens
    img = _img()
    block = bm.image(img)
    if mode == "discrete":
        assert block == _expected_image_block(b, img)[: 3 + 8 * 9] + [t.eoi]
    else:
        assert block == [t.boi] + [t.continuous] * 16 + [t.eoi]


def test_special_tokens_looked_up_by_name(tiny):
    """Ids come from the vocabulary by name; a vocabulary lacking them is refused."""
    from unitoken.model.tokens import SpecialTokens

    _, tok, b = tiny
    vocab = tok.get_vocab()
    assert b.tokens.boi == vocab["<racm3:break>"] and b.tokens.eoi == vocab["<eoss>"]
    assert b.tokens.sep == vocab["<sentinel:0>"] and b.tokens.newline == vocab["<reserved08799>"]
    del vocab["<sentinel:0>"]
    with pytest.raises(ValueError, match="sentinel:0"):
        SpecialTokens.from_vocab(vocab, 8)


def test_code_token_mapping_roundtrip(tiny):
    _, _, b = tiny
    codes = torch.arange(256)
    assert torch.equal(b.tokens.tokens_to_codes(b.tokens.codes_to_tokens(codes)), codes)


@pytest.mark.parametrize("name", ["unitoken-7b", "unitoken-7b-anyres"])
def test_max_input_image_tokens_is_the_builders_longest_block(name):
    """The worst-case arithmetic equals the length of the block the builder makes for the biggest image."""
    from unitoken.model.sequence import max_input_image_tokens
    from unitoken.model.tokens import SpecialTokens, build_tokenizer
    from unitoken.model.vision import max_continuous_features
    from unitoken.recipes import get_recipe

    cfg = get_recipe(name).model
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    b = SequenceBuilder(SpecialTokens.from_vocab(tok.get_vocab(), cfg.max_grid_tokens), tok, cfg)
    img = ImageInput(codes=torch.zeros(32, 32, dtype=torch.long), num_continuous=max_continuous_features(cfg.vision))
    assert len(b.image(img)) == max_input_image_tokens(cfg) == {"unitoken-7b": 1790, "unitoken-7b-anyres": 4760}[name]


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_image_block_len_per_mode(tiny, mode):
    """image_block_len counts the blocks of every encoder mode, input and generated."""
    from unitoken.model.sequence import image_block_len
    from unitoken.recipes import get_recipe

    _, tok, b = tiny
    cfg = get_recipe("tiny", [f"model.encoder_mode={mode}"]).model
    bm = SequenceBuilder(b.tokens, tok, cfg)
    img = _img()
    assert len(bm.image(img)) == image_block_len(cfg, img.num_continuous)
    assert len(bm.image(img, as_output=True)) == image_block_len(cfg, img.num_continuous, as_output=True)
