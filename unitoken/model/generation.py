"""Inference: text answers (greedy or sampled) and images (VQ ids with classifier-free guidance).

Image generation enforces the Lumina-mGPT image structure instead of hoping the model emits
it: after the prompt we feed ``[BOI][H][W]``, sample exactly ``w`` image tokens per row (only
image-token logits are eligible), feed ``[NL]`` after each row, and stop after ``h`` rows.
Classifier-free guidance mixes a conditional and an unconditional (empty prompt) stream:
``uncond + scale * (cond - uncond)``; scale 1.0 is the conditional model.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import DynamicCache

from unitoken.model.sequence import ImageInput, SequenceBuilder
from unitoken.model.tokens import IMAGE_PLACEHOLDER
from unitoken.model.unitoken import ContinuousImages, UniToken
from unitoken.model.vision import to_pil


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond).

    Written as cond + (scale - 1) * (cond - uncond): the same value, and exactly ``cond`` at
    scale 1 (no rounding from the round trip through ``uncond``).
    """
    return cond + (scale - 1.0) * (cond - uncond)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, allowed: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """logits: [b, V] -> ids [b]. temperature 0 is greedy; top_k 0 keeps all; allowed: [V] bool."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Stream:
    """One autoregressive stream with its KV cache (prefill once, then one token per step)."""

    def __init__(self, model: UniToken, ids: list[int], images: ContinuousImages | None) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.hf_config)
        self.pos = 0
        device = model.lm_head.weight.device
        self.logits = self._step(model.embed(torch.tensor([ids], device=device), images))

    def _step(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        pos = torch.arange(self.pos, self.pos + n, device=embeds.device).unsqueeze(0)
        hidden = self.model.hidden_states(embeds, position_ids=pos, cache=self.cache)
        self.pos += n
        return self.model.lm_head(hidden[:, -1])

    def feed(self, ids: list[int]) -> torch.Tensor:
        device = self.model.lm_head.weight.device
        self.logits = self._step(self.model.llm.embed_tokens(torch.tensor([ids], device=device)))
        return self.logits


@torch.no_grad()
def generate_text(model: UniToken, builder: SequenceBuilder, prompt: str, images: list[Image.Image],
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  seed: int = 0) -> str:
    """Answer ``prompt`` about ``images`` (each marked by ``<|image|>`` in the prompt, or
    prepended when the prompt has none). Stops at end-of-turn or EOS. Greedy by default."""
    model.eval()
    if images and IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER * len(images) + "\n" + prompt
    inputs, cont = prepare_images(model, images)
    ids = builder.prompt([{"from": "human", "value": prompt}], inputs)
    stream = _Stream(model, ids, cont)
    t = model.tokens
    allowed = t.text_token_mask(builder.tokenizer.all_special_ids)  # a text answer: no VQ ids
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(sample_token(stream.logits, temperature, top_k, _pad(allowed, stream.logits), generator))
        if nxt in (t.eos, t.end_of_turn):
            break
        out.append(nxt)
        stream.feed([nxt])
    return builder.tokenizer.decode(out, skip_special_tokens=True)


def _pad(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Extend a vocabulary mask to the head width (a head may be padded past the vocabulary)."""
    if mask.shape[0] == logits.shape[-1]:
        return mask
    full = torch.zeros(logits.shape[-1], dtype=torch.bool)
    full[: mask.shape[0]] = mask
    return full


@torch.no_grad()
def generate_image_codes(model: UniToken, builder: SequenceBuilder, prompt: str, cfg_scale: float = 3.0,
                         temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                         size: int | None = None, progress=None) -> torch.Tensor:
    """Autoregressive VQ ids for ``prompt`` -> codes [h, w]."""
    model.eval()
    t = model.tokens
    vq = model.config.vq
    size = size or vq.resolution
    if size % vq.downsample:
        raise ValueError(f"--size {size} is not a multiple of the VQ downsample factor {vq.downsample}")
    side = size // vq.downsample
    head = [t.boi, *builder.grid_ids(side, side)]
    cond = _Stream(model, builder.t2i_prompt(prompt) + head, None)
    uncond = _Stream(model, builder.t2i_prompt("") + head, None) if cfg_scale != 1.0 else None
    allowed = _pad(t.image_token_mask, cond.logits)
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    codes = torch.empty(side, side, dtype=torch.long)
    for r in range(side):
        for c in range(side):
            logits = cond.logits if uncond is None else cfg_logits(cond.logits, uncond.logits, cfg_scale)
            tok = int(sample_token(logits, temperature, top_k, allowed, generator))
            codes[r, c] = t.token_to_code[tok]
            nxt = [tok, t.newline] if c == side - 1 and r < side - 1 else [tok]
            if not (r == side - 1 and c == side - 1):  # the last id needs no forward pass
                cond.feed(nxt)
                if uncond is not None:
                    uncond.feed(nxt)
        if progress is not None:
            progress(r + 1, side)
    return codes


def decode_image(model: UniToken, codes: torch.Tensor) -> Image.Image:
    """codes [h, w] -> RGB PIL image of the VQ-GAN's resolution."""
    return to_pil(model.vq.decode(codes.unsqueeze(0).to(model.lm_head.weight.device))[0])


def prepare_images(model: UniToken, images: list[Image.Image]) -> tuple[list[ImageInput], ContinuousImages | None]:
    """PIL images -> sequence inputs (VQ codes + continuous counts) and the continuous batch."""
    from unitoken.model.vision import num_continuous_features, preprocess_continuous, vq_pixels

    cfg = model.config
    device = model.lm_head.weight.device
    inputs, tiles, grids = [], [], []
    for img in images:
        pix = vq_pixels(img, cfg.vq.resolution).unsqueeze(0).to(device)
        codes = model.vq.encode(pix)[0].cpu()
        n_cont = 0
        if cfg.encoder_mode != "discrete":
            tile, grid = preprocess_continuous(img, cfg.vision)
            tiles.append(tile)
            grids.append(grid)
            n_cont = num_continuous_features(grid, cfg.vision)
        inputs.append(ImageInput(codes=codes, num_continuous=n_cont))
    cont = ContinuousImages(torch.cat(tiles).to(device), grids) if tiles else None
    return inputs, cont
