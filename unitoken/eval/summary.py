"""Per-item scores summed up per category: shared by the suites (``runner``) and the held-out
loss (``heldout``), so neither of those imports the other for it."""

from __future__ import annotations


def summarize(results: list[dict], task: str, chance: float) -> dict:
    """{"task", "overall", "categories": {category: mean}, "n", "chance"} of per-item ``score``s."""
    cats: dict[str, list[float]] = {}
    for r in results:
        cats.setdefault(r["category"], []).append(r["score"])
    per_cat = {c: round(sum(v) / len(v), 4) for c, v in sorted(cats.items())}
    overall = round(sum(r["score"] for r in results) / len(results), 4) if results else 0.0
    return {"task": task, "overall": overall, "categories": per_cat, "n": len(results), "chance": round(chance, 4)}
