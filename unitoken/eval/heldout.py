"""Held-out loss: the training objective on records the model never trained on.

Benchmarks score what a model does (an answer is right or wrong, an image shows the prompt or
not); early in training both stay at chance while the loss already moves. The small study's
ablation compares short runs of stage 2, so it also reports, per task, the mean negative
log-likelihood per supervised token of each held-out record: the answer's tokens for
understanding, the image codes for generation. A task that suffers from sharing training with
the other shows it here first, as a higher loss than when trained alone.

The records come from a pre-tokenised directory (``unitoken data pretokenize``; every split is
pre-tokenised, training reads only ``train``), so the sequences are exactly those training
builds, with the prompt always present (training drops it for classifier-free guidance).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from unitoken.data.dataset import ShardDataset, pad_samples
from unitoken.eval.summary import summarize
from unitoken.model.sequence import IGNORE


def heldout_items(dataset: ShardDataset, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of up to ``limit`` records per task, drawn with ``seed`` (the same for every model)."""
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(dataset.tasks()):
        by_task.setdefault(task, []).append(i)
    rng = random.Random(seed)
    picked = []
    for task in sorted(by_task):
        idx = by_task[task]
        picked += sorted(rng.sample(idx, limit)) if limit and len(idx) > limit else idx
    return picked


def heldout_dataset(tokens: str | Path, builder, split: str = "test") -> ShardDataset:
    """The ``split`` records of a pre-tokenised dir (checked against the model's VQ/vision config).

    Raises:
        ValueError: pre-tokenised for another config, or no records of ``split``.
    """
    dataset = ShardDataset(tokens, builder, splits=[split])
    if not len(dataset):
        raise ValueError(f"{tokens}: no pre-tokenised records of split {split!r}")
    return dataset


@torch.no_grad()
def heldout_loss(model, builder, tokens: str | Path | ShardDataset, split: str = "test", limit: int | None = 500,
                 batch_size: int = 32, progress=None) -> list[dict]:
    """Per-record loss on ``split`` -> [{id, task, category (the record's source), score (mean
    NLL per supervised token), tokens}], ``limit`` records per task, the same records for every
    model. A record without supervised tokens has no loss and is left out.

    Raises:
        ValueError: see ``heldout_dataset``.
    """
    dataset = tokens if isinstance(tokens, ShardDataset) else heldout_dataset(tokens, builder, split)
    model.eval()
    device = next(model.parameters()).device
    picked = heldout_items(dataset, limit)
    results = []
    for start in range(0, len(picked), batch_size):
        samples = [dataset[i] for i in picked[start : start + batch_size]]
        batch = pad_samples(samples, model.tokens.pad)
        images = batch["images"]
        if images is not None:
            images.pixel_values = images.pixel_values.to(device)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model.hidden_states(model.embed(ids, images), mask, None)
        targets = batch["labels"][:, 1:].to(device)
        for row, sample in enumerate(samples):
            keep = targets[row] != IGNORE
            if not bool(keep.any()):
                continue
            logits = model.lm_head(hidden[row, :-1][keep]).float()
            nll = torch.nn.functional.cross_entropy(logits, targets[row][keep], reduction="sum")
            n = int(keep.sum())
            rec = dataset.records[sample.index][2]
            results.append({"id": rec["id"], "task": sample.task, "category": sample.source,
                            "score": round(float(nll) / n, 5), "tokens": n})
        if progress:
            progress(len(results), len(picked))
    return results


def summarize_loss(results: list[dict]) -> dict:
    """{task: {"mean", "n", "categories": {source: mean}}} of per-record losses."""
    out = {}
    for task in sorted({r["task"] for r in results}):
        s = summarize([r for r in results if r["task"] == task], task, 0.0, proportion=False)
        out[task] = {"mean": s["overall"], "n": s["n"], "categories": s["categories"]}
    return out
