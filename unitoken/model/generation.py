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


def _gumbel(shape: int, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel(0, 1) noise [shape] drawn on the CPU (the same numbers on every device)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-30, 1 - 1e-16)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, allowed: torch.Tensor | None,
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [b, V] -> ids [b], row i drawn with ``generators[i]``.

    temperature 0 is greedy; top_k 0 keeps all; allowed: [V] bool. Sampling is the Gumbel-max
    trick with CPU noise, so a row's draw depends only on its own generator: a prompt gets the
    same image alone or in a batch of any size.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    noise = torch.stack([_gumbel(logits.shape[-1], g) for g in generators]).to(logits.device, logits.dtype)
    return (logits + noise).argmax(dim=-1)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, allowed: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """logits: [b, V] -> ids [b] (every row from the one ``generator``); see ``sample_tokens``."""
    return sample_tokens(logits, temperature, top_k, allowed, [generator] * logits.shape[0])


class _Stream:
    """A batch of autoregressive streams sharing one KV cache: prompts are left-padded (masked,
    positions counted from each prompt's first real token), then every stream takes the same
    number of tokens per step."""

    def __init__(self, model: UniToken, prompts: list[list[int]], images: ContinuousImages | None) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.hf_config)
        device = model.lm_head.weight.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), model.tokens.pad, dtype=torch.long)
        self.mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            self.mask[i, longest - len(p):] = 1
        self.mask = self.mask.to(device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_pos = self.mask.sum(-1, keepdim=True)
        embeds = model.embed(ids.to(device), images)
        self.logits = self._step(embeds, positions)

    def _step(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A mask is only needed when some prompt is padded; without one sdpa runs plain causal.
        mask = None if bool(self.mask.all()) else self.mask
        hidden = self.model.hidden_states(embeds, attention_mask=mask, position_ids=positions, cache=self.cache)
        return self.model.lm_head(hidden[:, -1])

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [b, k] -> logits [b, V] after the last of them."""
        ids = ids.to(self.mask.device)
        k = ids.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        positions = self.next_pos + torch.arange(k, device=ids.device)
        self.next_pos = self.next_pos + k
        self.logits = self._step(self.model.llm.embed_tokens(ids), positions)
        return self.logits


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_text(model: UniToken, builder: SequenceBuilder, prompt: str, images: list[Image.Image],
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  seed: int = 0) -> str:
    """Answer ``prompt`` about ``images`` (each marked by ``<|image|>`` in the prompt, or
    prepended when the prompt has none). Stops at end-of-turn or EOS. Greedy by default."""
    return generate_text_batch(model, builder, [prompt], [images], max_new_tokens, temperature, top_k, [seed])[0]


@torch.no_grad()
def generate_text_batch(model: UniToken, builder: SequenceBuilder, prompts: list[str],
                        images: list[list[Image.Image]], max_new_tokens: int = 64, temperature: float = 0.0,
                        top_k: int = 0, seeds: list[int] | None = None) -> list[str]:
    """``generate_text`` for many prompts at once (one forward pass per new token for all)."""
    model.eval()
    t = model.tokens
    inputs, cont = prepare_images(model, [img for imgs in images for img in imgs])  # one VQ pass for all
    seqs = []
    for prompt, imgs in zip(prompts, images):
        if imgs and IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(imgs) + "\n" + prompt
        seqs.append(builder.prompt([{"from": "human", "value": prompt}], inputs[: len(imgs)]))
        inputs = inputs[len(imgs):]
    stream = _Stream(model, seqs, cont)
    allowed = _pad(t.text_token_mask(builder.tokenizer.all_special_ids), stream.logits)  # text only: no VQ ids
    gens = _generators(seeds if seeds is not None else [0] * len(prompts))
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = sample_tokens(stream.logits, temperature, top_k, allowed, gens).cpu()
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                if tok in (t.eos, t.end_of_turn):
                    done[i] = True
                else:
                    out[i].append(tok)
        if all(done):
            break
        stream.feed(nxt.unsqueeze(1))
    return [builder.tokenizer.decode(o, skip_special_tokens=True) for o in out]


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
    return generate_image_codes_batch(model, builder, [prompt], cfg_scale, temperature, top_k, [seed], size,
                                      progress)[0]


@torch.no_grad()
def generate_image_codes_batch(model: UniToken, builder: SequenceBuilder, prompts: list[str],
                               cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
                               seeds: list[int] | None = None, size: int | None = None,
                               progress=None) -> torch.Tensor:
    """VQ ids for many prompts at once -> codes [n, h, w]; prompt i is sampled with ``seeds[i]``.

    The conditional and unconditional (empty prompt) streams of every prompt run as one batch.
    """
    model.eval()
    t = model.tokens
    vq = model.config.vq
    size = size or vq.resolution
    if size % vq.downsample:
        raise ValueError(f"--size {size} is not a multiple of the VQ downsample factor {vq.downsample}")
    side = size // vq.downsample
    n = len(prompts)
    head = [t.boi, *builder.grid_ids(side, side)]
    seqs = [builder.t2i_prompt(p) + head for p in prompts]
    guided = cfg_scale != 1.0
    if guided:
        seqs += [builder.t2i_prompt("") + head] * n
    stream = _Stream(model, seqs, None)
    allowed = _pad(t.image_token_mask, stream.logits)
    gens = _generators(seeds if seeds is not None else [0] * n)
    codes = torch.empty(n, side, side, dtype=torch.long)
    newline = torch.full((len(seqs), 1), t.newline, dtype=torch.long)
    for r in range(side):
        for c in range(side):
            logits = stream.logits
            if guided:
                logits = cfg_logits(logits[:n], logits[n:], cfg_scale)
            tok = sample_tokens(logits, temperature, top_k, allowed, gens).cpu()
            codes[:, r, c] = t.token_to_code[tok]
            nxt = (torch.cat([tok, tok]) if guided else tok).unsqueeze(1)
            if c == side - 1 and r < side - 1:
                nxt = torch.cat([nxt, newline], dim=1)
            if not (r == side - 1 and c == side - 1):  # the last id needs no forward pass
                stream.feed(nxt)
        if progress is not None:
            progress(r + 1, side)
    return codes


def decode_image(model: UniToken, codes: torch.Tensor) -> Image.Image:
    """codes [h, w] -> RGB PIL image of the VQ-GAN's resolution."""
    return decode_images(model, codes.unsqueeze(0))[0]


@torch.no_grad()
def decode_images(model: UniToken, codes: torch.Tensor, batch_size: int = 64) -> list[Image.Image]:
    """codes [n, h, w] -> n RGB PIL images."""
    device = model.lm_head.weight.device
    return [to_pil(x) for i in range(0, len(codes), batch_size)
            for x in model.vq.decode(codes[i : i + batch_size].to(device))]


def prepare_images(model: UniToken, images: list[Image.Image]) -> tuple[list[ImageInput], ContinuousImages | None]:
    """PIL images -> sequence inputs (VQ codes + continuous counts) and the continuous batch."""
    from unitoken.model.vision import num_continuous_features, preprocess_continuous, vq_pixels

    cfg = model.config
    device = model.lm_head.weight.device
    inputs, tiles, grids, sizes = [], [], [], []
    all_codes = model.vq.encode(torch.stack([vq_pixels(img, cfg.vq.resolution) for img in images]).to(device)).cpu() \
        if images else []
    for img, codes in zip(images, all_codes):
        n_cont = 0
        if cfg.encoder_mode != "discrete":
            tile, grid = preprocess_continuous(img, cfg.vision)
            tiles.append(tile)
            grids.append(grid)
            sizes.append(img.size)
            n_cont = num_continuous_features(grid, img.size, cfg.vision)
        inputs.append(ImageInput(codes=codes, num_continuous=n_cont))
    cont = ContinuousImages(torch.cat(tiles).to(device), grids, sizes) if tiles else None
    return inputs, cont
