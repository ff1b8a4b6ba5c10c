"""The UniToken token sequence, for any number of images per sample.

One input image in ``dual`` mode (the paper's layout; ~1,790 tokens at 512 px):

    [BOI][H][W] r0 ... [NL] r1 ... [NL] ... [SEP] {continuous x n} [EOI]

``discrete`` mode drops ``[SEP]{continuous}``; ``continuous`` mode keeps only
``[BOI]{continuous}[EOI]``. An image the model *generates* is always the discrete block
``[BOI][H][W] rows+[NL] [EOI]``: that is what it can predict.

A sample is ``[BOS] turn [EOT] turn [EOT] ... [EOS]``. Labels follow HF convention
(``labels[i]`` is the target at position i; the loss shifts): supervised segments (answers,
generated images) carry their ids, everything else -100, and continuous positions are
always -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unitoken.config import ModelConfig
from unitoken.layout import (  # noqa: F401  (the layout arithmetic, also imported from here)
    CONVERSATION_FRAME,
    image_block_len,
    max_input_image_tokens,
    min_seq_len,
)
from unitoken.model.tokens import IMAGE_PLACEHOLDER, SpecialTokens

IGNORE = -100
T2I_TEMPLATE = "Generate an image according to the following prompt:\n{prompt}"


@dataclass
class ImageInput:
    """One image as the sequence needs it: its VQ codes and how many continuous embeddings."""

    codes: torch.Tensor  # [h, w] long VQ codes
    num_continuous: int = 0


@dataclass
class Encoded:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add(self, ids: list[int], supervised: bool, continuous_id: int) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(i if supervised and i != continuous_id else IGNORE for i in ids)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.input_ids), torch.tensor(self.labels)


class SequenceBuilder:
    """Turns text, images and conversations into ``input_ids`` + ``labels``."""

    def __init__(self, tokens: SpecialTokens, tokenizer, cfg: ModelConfig) -> None:
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.mode = cfg.encoder_mode
        self.downsample = cfg.vq.downsample
        self.grid_unit_px = cfg.vq.grid_unit_px

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def grid_ids(self, rows: int, cols: int) -> list[int]:
        """[H][W] tokens for a code grid of rows x cols."""
        ids = []
        for n_codes in (rows, cols):
            px = n_codes * self.downsample
            if px % self.grid_unit_px:
                raise ValueError(f"image side {px}px is not a multiple of the {self.grid_unit_px}px grid unit")
            n = px // self.grid_unit_px
            if n >= len(self.tokens.grid):
                raise ValueError(f"image side {px}px needs grid token {n}; the vocabulary has {len(self.tokens.grid) - 1}")
            ids.append(self.tokens.grid[n])
        return ids

    def discrete_rows(self, codes: torch.Tensor) -> list[int]:
        """Rows of image-token ids, each followed by [NL]."""
        t = self.tokens
        ids = t.codes_to_tokens(codes.long())
        rows = torch.cat([ids, torch.full((ids.shape[0], 1), t.newline, dtype=torch.long)], dim=1)
        return rows.flatten().tolist()

    def image(self, image: ImageInput, as_output: bool = False) -> list[int]:
        """Token ids of one image block (continuous positions hold the placeholder id)."""
        t = self.tokens
        if image.codes.dim() != 2:
            raise ValueError(f"image codes must be [h, w], got shape {tuple(image.codes.shape)}")
        discrete = self.grid_ids(*image.codes.shape) + self.discrete_rows(image.codes)
        if as_output or self.mode == "discrete":
            return [t.boi, *discrete, t.eoi]
        if image.num_continuous <= 0:
            raise ValueError(f"encoder mode {self.mode!r} needs continuous features for input images")
        cont = [t.continuous] * image.num_continuous
        if self.mode == "continuous":
            return [t.boi, *cont, t.eoi]
        return [t.boi, *discrete, t.sep, *cont, t.eoi]

    def segment(self, text: str, images: list[ImageInput], as_output: bool) -> list[int]:
        """Text with ``<|image|>`` placeholders -> ids, consuming ``images`` from the front."""
        ids: list[int] = []
        pieces = text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.text(piece)
            if i < len(pieces) - 1:
                ids += self.image(images.pop(0), as_output=as_output)
        return ids

    def conversation(self, turns: list[dict], images: list[ImageInput], add_eos: bool = True) -> Encoded:
        """Encode a reference-format conversation (``[{from, value}]``).

        Human turns are context (-100); ``gpt`` turns are supervised, and an image placeholder in
        a ``gpt`` turn is an image the model generates (discrete block, supervised).

        Raises:
            ValueError: placeholder count != number of images, or an unknown role.
        """
        n_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
        if n_placeholders != len(images):
            raise ValueError(f"conversation has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders "
                             f"but {len(images)} images")
        queue = list(images)
        t = self.tokens
        enc = Encoded()
        enc.add([t.bos], False, t.continuous)
        for turn in turns:
            role = turn["from"]
            if role not in ("human", "gpt"):
                raise ValueError(f"unknown conversation role {role!r}; use 'human' or 'gpt'")
            answer = role == "gpt"
            enc.add(self.segment(turn["value"], queue, as_output=answer) + [t.end_of_turn], answer, t.continuous)
        if add_eos:
            enc.add([t.eos], turns[-1]["from"] == "gpt", t.continuous)
        return enc

    def prompt(self, turns: list[dict], images: list[ImageInput]) -> list[int]:
        """Inference prefix: the conversation so far, ending where the model answers."""
        return self.conversation(turns, images, add_eos=False).input_ids

    def t2i_prompt(self, prompt: str) -> list[int]:
        """Prefix for text-to-image, up to where the image block begins."""
        return self.prompt([{"from": "human", "value": T2I_TEMPLATE.format(prompt=prompt)}], [])


# --------------------------------------------------------------------------- length budget

def pad_batch(samples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids/labels/attention_mask [b, T]."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
