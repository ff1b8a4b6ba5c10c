"""The small study's statistics: percentile-bootstrap intervals, paired differences, and the
held-out loss summed up over stage 2's sources (``study.py`` records them, ``report.py``
recomputes them from the raw per-record files)."""

from __future__ import annotations

import random


def bootstrap_ci(scores: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of a mean."""
    if not scores:
        return [0.0, 0.0]
    rng = random.Random(seed)
    k = len(scores)
    means = sorted(sum(scores[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n) - 1], 4)]


def paired_diff(a: dict[str, float], b: dict[str, float], n: int = 2000, seed: int = 0) -> dict:
    """Mean of b - a over shared items with a paired-bootstrap 95 % interval."""
    ids = sorted(set(a) & set(b))
    d = [b[i] - a[i] for i in ids]
    return {"diff": round(sum(d) / len(d), 4) if d else 0.0, "ci95": bootstrap_ci(d, n, seed), "n": len(d)}


def stage2_records(records: list[dict], sources: tuple[str, ...] | None = None) -> list[dict]:
    """The held-out records (per-record rows of unitoken.eval.heldout) of ``sources`` (default: the
    synthetic set's stage-2 sources, which the ablation's runs and the main chain's stages 2 and 3
    train on). Run 6's ablation (stage 2 on VQA and text-to-image only) first reported the mean
    over all sources: its understanding loss was then mostly captions (stage 1) and dialogues
    (stage 3), 6-14 nats per token against VQA's 0.13-0.18, i.e. text no ablation run trained on."""
    if sources is None:
        from unitoken.recipes import SYNTH_STAGE2 as sources
    return [r for src in sources for r in records if r["category"] == src]  # grouped: a fixed bootstrap order


def heldout_summary(records: list[dict], sources: tuple[str, ...] | None = None) -> dict:
    """Held-out loss per task over ``stage2_records``: mean, 95 % interval, n, the sources counted,
    and the mean of every source (``by_source``, all records)."""
    from unitoken.eval.heldout import summarize_loss

    kept = stage2_records(records, sources)
    counted = summarize_loss(kept)
    out = {}
    for task, every in summarize_loss(records).items():
        mine = counted.get(task, {"mean": None, "n": 0, "categories": {}})
        out[task] = {"mean": mine["mean"], "ci95": bootstrap_ci([r["score"] for r in kept if r["task"] == task]),
                     "n": mine["n"], "sources": list(mine["categories"]), "by_source": every["categories"]}
    return out

