"""Useful model FLOPs of a training step, counted as ``bench/train_throughput.py`` counts them, so
that the loop's MFU and the benchmark's can stand side by side.

Per real token 6 x the decoder body's parameters (forward + backward), per supervised token 6 x
the head's (only supervised rows go through it), 6 x layers x hidden x n^2 of causal attention
within each sample of n tokens, and 6 x the vision tower's and adapter's parameters per patch it
sees (the benchmark leaves the tower out; here it runs). Padding and recomputed forwards are not
useful work and are not counted. A frozen module still counts 6 per parameter (its input
gradient is 2 of them, its weight gradient 2 more that are skipped): stage 1's figure is high.
"""

from __future__ import annotations

from dataclasses import dataclass

from unitoken.data.dataset import Sample
from unitoken.model.sequence import IGNORE

H100_H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s, spec sheet (the same for the H100 SXM and the H200)


@dataclass(frozen=True)
class FlopCounter:
    body: int  # decoder parameters without the embedding table
    head: int
    vision: int  # vision tower + adapter
    layers: int
    hidden: int
    patches_per_tile: int

    @classmethod
    def for_model(cls, model) -> FlopCounter:
        body = sum(p.numel() for n, p in model.llm.named_parameters() if not n.startswith("embed_tokens"))
        vision = sum(p.numel() for m in (model.vision, model.adapter) if m is not None for p in m.parameters())
        cfg = model.config
        return cls(body=body, head=model.lm_head.weight.numel(), vision=vision, layers=cfg.llm.num_layers,
                   hidden=cfg.llm.hidden_size, patches_per_tile=cfg.vision.patches_per_side ** 2)

    def of(self, samples: list[Sample]) -> float:
        tokens = sum(len(s) for s in samples)
        supervised = sum(sum(1 for x in s.encoded.labels[1:] if x != IGNORE) for s in samples)
        attention = 6.0 * self.layers * self.hidden * sum(len(s) ** 2 for s in samples)
        tiles = sum(s.images.pixel_values.shape[0] for s in samples if s.images is not None)
        return (6.0 * self.body * tokens + 6.0 * self.head * supervised + attention
                + 6.0 * self.vision * tiles * self.patches_per_tile)
