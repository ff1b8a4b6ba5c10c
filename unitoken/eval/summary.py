"""Per-item scores summed up per category: shared by the suites (``runner``), the held-out
loss (``heldout``) and the gate, so none of them imports another for it."""

from __future__ import annotations

import math


def summarize(results: list[dict], task: str, chance: float, proportion: bool = True) -> dict:
    """A suite's mean score, its 95 % interval (``ci95``; ``proportion`` False: scores are not
    0/1, e.g. losses, and there is none), per-category means and chance level."""
    cats: dict[str, list[float]] = {}
    for r in results:
        cats.setdefault(r["category"], []).append(r["score"])
    per_cat = {c: round(sum(v) / len(v), 4) for c, v in sorted(cats.items())}
    mean = sum(r["score"] for r in results) / len(results) if results else 0.0
    ci = {"ci95": [round(x, 4) for x in wilson_interval(mean, len(results))]} if proportion else {}
    return {"task": task, "overall": round(mean, 4), **ci, "categories": per_cat, "n": len(results),
            "chance": round(chance, 4)}


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``z`` 1.96: 95 %). Every suite scores items 0/1, so
    a suite's score is the proportion of ``n`` items passed. Unlike the normal approximation it
    stays inside [0, 1] and is not empty at 0 or 1 (0 of 12 right: [0, 0.24], not [0, 0]).

    Returns:
        (low, high); (0, 1) for no items.
    """
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
