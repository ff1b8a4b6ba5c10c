"""Special tokens and image-token ids, looked up by NAME in the Chameleon vocabulary.

Chameleon keeps text and image tokens in one vocabulary. Image code ``c`` of the VQ-GAN is the
token named ``IMGIMG<digits of c as letters A-J>Z``; transformers'
``ChameleonImageVocabularyMapping`` does that mapping and we use it as is. Lumina-mGPT (the
initialisation of UniToken) adds structure tokens, all named here and nowhere as literals:

    <racm3:break>     BOI   begin of image
    <eoss>            EOI   end of image
    <sentinel:0>      SEP   between the discrete ids and the continuous embeddings (UniToken)
    <reserved08799>   NL    end of one row of VQ ids
    <reserved08706>   EOT   end of a conversation turn
    <reserved{8800+n}> grid size in units of 32 px (height token, then width token)

The continuous embeddings have no vocabulary entry; their positions hold a placeholder token
(``<reserved08707>``) whose embedding is overwritten by the adapter output. transformers'
Chameleon converter renames that token to ``<image>`` (same id), so an HF-converted vocabulary
(facebook/chameleon-7b, Lumina-mGPT) is accepted under either name.

In Chameleon's 65,536-entry vocabulary ``<reserved{n:05d}>`` has id ``n + 4`` (ids 0-3 are
specials such as ``<s>``; ids 4-8195 are the 8,192 IMGIMG codes): EOT 8710, placeholder 8711,
NL 8803, grid token n 8804 + n (the reference's literals). The reserved block runs at
least to ``<reserved09001>`` (id 9005, used by Lumina-mGPT-derived video models), so every grid
token up to ``max_grid_tokens=64`` (``<reserved08864>``, 2,048 px) exists; ``from_vocab``
refuses a vocabulary that lacks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

from unitoken.layout import TOKEN_NAMES, min_vocab_size  # noqa: F401

# Other names a token goes by in released vocabularies: transformers' convert_chameleon_weights_to_hf
# renames <reserved08707> to <image> ("use a reserved token instead of adding a new one").
TOKEN_ALIASES = {"continuous": ("<image>",)}
IMAGE_PLACEHOLDER = "<|image|>"  # marks an image inside conversation text (reference format)


def grid_token_name(n: int) -> str:
    """Name of the token that says "n grid units" (Lumina-mGPT: ``<reserved{8800+n:05d}>``)."""
    return f"<reserved{8800 + n:05d}>"


def image_token_name(code: int) -> str:
    """Chameleon's name for VQ code ``code``: digits spelled with A-J, then ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the structure tokens and the VQ-code <-> token-id mapping of one vocabulary."""

    bos: int
    eos: int
    pad: int
    boi: int
    eoi: int
    sep: int
    newline: int
    end_of_turn: int
    continuous: int
    grid: tuple[int, ...]  # grid[n] is the id of "n units"; grid[0] is unused (-1)
    vocab_size: int
    mapping: ChameleonImageVocabularyMapping

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], max_grid: int) -> SpecialTokens:
        """Look every token up by name (or by its alias in ``TOKEN_ALIASES``).

        Raises:
            ValueError: a required token is missing from the vocabulary, or a token and its
                alias are both present with different ids.
        """
        ids, missing = {}, []
        for key, name in TOKEN_NAMES.items():
            found = {vocab[n] for n in (name, *TOKEN_ALIASES.get(key, ())) if n in vocab}
            if len(found) > 1:
                raise ValueError(f"vocabulary has both {name} and {' / '.join(TOKEN_ALIASES[key])} with different ids "
                                 f"{sorted(found)}; they must be one token")
            if found:
                ids[key] = found.pop()
            else:
                missing.append(name)
        missing += [grid_token_name(n) for n in range(1, max_grid + 1) if grid_token_name(n) not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} required tokens, e.g. {missing[:5]}; "
                             "use a Chameleon/Lumina-mGPT tokenizer or `unitoken model init`")
        mapping = ChameleonImageVocabularyMapping(vocab)
        if not mapping.image_tokens:
            raise ValueError("vocabulary has no IMGIMG* image tokens; it is not a Chameleon vocabulary")
        grid = (-1,) + tuple(vocab[grid_token_name(n)] for n in range(1, max_grid + 1))
        return cls(**ids, grid=grid, vocab_size=max(vocab.values()) + 1, mapping=mapping)

    @property
    def num_codes(self) -> int:
        return len(self.mapping.image_tokens)

    @cached_property
    def code_to_token(self) -> torch.Tensor:
        """[num_codes] long tensor: VQ code -> vocabulary id."""
        table = torch.full((self.num_codes,), -1, dtype=torch.long)
        for tok, code in self.mapping.bpe2img.items():
            if code >= self.num_codes:
                raise ValueError(f"image token {tok} names code {code} >= codebook size {self.num_codes}")
            table[code] = tok
        return table

    @cached_property
    def token_to_code(self) -> torch.Tensor:
        """[vocab_size] long tensor: vocabulary id -> VQ code, -1 for non-image tokens."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)
        table[self.code_to_token] = torch.arange(self.num_codes)
        return table

    @cached_property
    def image_token_mask(self) -> torch.Tensor:
        """[vocab_size] bool: True on the ids of VQ codes."""
        return self.token_to_code >= 0

    def text_token_mask(self, special_ids: list[int]) -> torch.Tensor:
        """[vocab_size] bool: ids a text answer may contain (no image, structure or special
        tokens; ``eos`` and ``end_of_turn`` stay eligible so the answer can end)."""
        mask = ~self.image_token_mask
        banned = [i for i in special_ids if i not in (self.eos, self.end_of_turn)]
        banned += [self.continuous, self.boi, self.eoi, self.sep, self.newline, self.pad, self.bos]
        banned += [g for g in self.grid if g >= 0]
        mask[torch.tensor(banned, dtype=torch.long)] = False
        return mask

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_to_token.to(codes.device)[codes]

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = self.token_to_code.to(tokens.device)[tokens]
        if (codes < 0).any():
            raise ValueError("tokens_to_codes: got ids that are not image tokens")
        return codes


# --------------------------------------------------------------------------- a fresh vocabulary


def build_tokenizer(vocab_size: int, num_codes: int, max_grid: int):
    """A Chameleon-layout tokenizer for models trained from scratch (tiny/small recipes).

    Text is byte-level (256 byte tokens, no merges: any string round-trips), followed by the
    named structure tokens and ``num_codes`` IMGIMG tokens. Saved as a standard
    ``tokenizer.json`` (HF tokenizers), so it loads like a released Chameleon tokenizer.

    Raises:
        ValueError: ``vocab_size`` cannot hold all tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(TOKEN_NAMES.values()) + [grid_token_name(n) for n in range(1, max_grid + 1)]
    vocab: dict[str, int] = {}
    for name in specials:
        vocab[name] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for code in range(num_codes):
        vocab[image_token_name(code)] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"llm.vocab_size={vocab_size} is too small for {len(vocab)} tokens "
                         f"({num_codes} image codes); raise llm.vocab_size")
    unused = []
    while len(vocab) < vocab_size:
        unused.append(f"<unused{len(vocab)}>")
        vocab[unused[-1]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials + unused])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=TOKEN_NAMES["bos"],
        eos_token=TOKEN_NAMES["eos"],
        pad_token=TOKEN_NAMES["pad"],
    )
