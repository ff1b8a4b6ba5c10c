"""``unitoken gate``: promote only a model that is good at understanding AND generation.

A unified model can get better at one task while getting worse at the other (the task
interference UniToken is about). The gate passes a candidate only if

1. every metric clears its absolute floor (policy ``floors``), and every suite named in
   ``above_chance`` has its 95 % interval (Wilson, over the suite's items) wholly above the
   suite's chance level; a candidate whose answers are empty fails these with a reason that
   says so;
2. against the champion, on the items both evaluated, the paired bootstrap confidence interval
   of (candidate - champion) has its lower bound >= -margin, for the understanding items AND
   for the generation items (non-inferiority per task);
3. on at least one primary metric the candidate's score minus the champion's is at least
   ``min_improvement`` (default 0: "no worse anywhere, and not worse overall").

With no champion, floors alone decide: a first model is judged by what it reaches, not by a
comparison with nothing. The pipeline takes the floors from the recipe (``Recipe.gate``)
unless its ``gate_policy`` parameter gives a policy. The decision JSON lists every check with
its numbers and reason. Exit 0 pass, 3 fail.

Policy (YAML)::

    floors: {"shapes-vqa/overall": 0.5, "shapes-geneval/overall": 0.3}
    above_chance: ["shapes-vqa"]
    margins: {understanding: 0.02, generation: 0.02}
    primary: ["shapes-vqa/overall", "shapes-geneval/overall"]
    min_improvement: 0.0
    bootstrap: {samples: 2000, confidence: 0.95, seed: 0}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from unitoken.eval.runner import load_eval
from unitoken.eval.summary import wilson_interval

TASKS = ("understanding", "generation")


@dataclass
class GatePolicy:
    floors: dict[str, float] = field(default_factory=dict)
    above_chance: list[str] = field(default_factory=list)  # suites whose 95 % interval must clear chance
    margins: dict[str, float] = field(default_factory=lambda: {"understanding": 0.02, "generation": 0.02})
    primary: list[str] = field(default_factory=list)  # default: every suite's overall metric
    min_improvement: float = 0.0
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: Path | None) -> GatePolicy:
        if path is None:
            return cls()
        doc = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: a gate policy is a mapping (floors, margins, primary, ...)")
        known = {"floors", "above_chance", "margins", "primary", "min_improvement", "bootstrap"}
        unknown = sorted(set(map(str, doc)) - known)
        if unknown:
            raise ValueError(f"{path}: unknown policy field {unknown[0]!r}; fix: use {sorted(known)}")

        def number(value, where: str, kind=float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"{path}: {where} = {value!r}: expected a number")
            return kind(value)

        def mapping(name: str) -> dict:
            value = doc.get(name) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {name}: expected a mapping of NAME: number, got {type(value).__name__}")
            return value

        primary = doc.get("primary") or []
        if not isinstance(primary, list):
            raise ValueError(f"{path}: primary: expected a list of metric names")
        above = doc.get("above_chance") or []
        if not isinstance(above, list):
            raise ValueError(f"{path}: above_chance: expected a list of suite names, e.g. [shapes-vqa]")
        boot = mapping("bootstrap")
        policy = cls(floors={str(k): number(v, f"floors.{k}") for k, v in mapping("floors").items()},
                     above_chance=[str(x) for x in above],
                     margins={**cls().margins, **{str(k): number(v, f"margins.{k}") for k, v in mapping("margins").items()}},
                     primary=[str(x) for x in primary],
                     min_improvement=number(doc.get("min_improvement", 0.0), "min_improvement"),
                     bootstrap_samples=number(boot.get("samples", 2000), "bootstrap.samples", int),
                     confidence=number(boot.get("confidence", 0.95), "bootstrap.confidence"),
                     seed=number(boot.get("seed", 0), "bootstrap.seed", int))
        bad = [t for t in policy.margins if t not in TASKS]
        if bad:
            raise ValueError(f"{path}: margins.{bad[0]}: unknown task; fix: use {list(TASKS)}")
        if any(m < 0 for m in policy.margins.values()) or not 0 < policy.confidence < 1 or policy.bootstrap_samples < 100:
            raise ValueError(f"{path}: margins must be >= 0, 0 < bootstrap.confidence < 1, bootstrap.samples >= 100")
        return policy

    @classmethod
    def from_recipe(cls, gate) -> GatePolicy:
        """The default policy with a recipe's floors (``unitoken.config.GateConfig``)."""
        return cls(floors=dict(gate.floors), above_chance=list(gate.above_chance))


def paired_bootstrap(diff: np.ndarray, samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile bootstrap CI."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(diff.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _silence(items: list[dict], suite: str) -> str:
    """'' or what a failed floor owes to empty answers: '; the candidate answered nothing (...)'."""
    answers = [i for i in items if i.get("suite") == suite and "prediction" in i]
    empty = sum(not str(i["prediction"]).strip() for i in answers)
    if not empty:
        return ""
    if empty == len(answers):
        return f"; the candidate answered nothing (all {empty} answers empty)"
    return f"; {empty} of {len(answers)} answers were empty"


def floor_checks(report: dict, items: list[dict], policy: GatePolicy) -> list[dict]:
    """The absolute checks (``floors``, ``above_chance``) on one evaluation."""
    checks = []
    for metric, floor in sorted(policy.floors.items()):
        value = report["metrics"].get(metric)
        ok = value is not None and value >= floor
        reason = (f"{metric} = {value} {'>=' if ok else '<'} floor {floor}" if value is not None
                  else f"{metric} missing from the candidate's evaluation")
        checks.append({"check": "floor", "metric": metric, "value": value, "threshold": floor, "passed": ok,
                       "reason": reason + ("" if ok else _silence(items, metric.split("/")[0]))})
    for suite in policy.above_chance:
        s = report.get("suites", {}).get(suite)
        if s is None:
            checks.append({"check": "above_chance", "suite": suite, "passed": False,
                           "reason": f"{suite} missing from the candidate's evaluation; evaluate it (eval_suites)"})
            continue
        lo, hi = s.get("ci95") or wilson_interval(s["overall"], s["n"])
        ok = lo > s["chance"]
        checks.append({"check": "above_chance", "suite": suite, "value": s["overall"], "ci": [lo, hi], "n": s["n"],
                       "threshold": s["chance"], "passed": ok,
                       "reason": f"{suite} = {s['overall']:.3f}, 95 % interval [{lo:.3f}, {hi:.3f}] over {s['n']} items "
                                 f"{'above' if ok else 'not above'} chance {s['chance']:.3f}"
                                 + ("" if ok else _silence(items, suite))})
    return checks


def decide(candidate: Path, champion: Path | None, policy: GatePolicy) -> dict:
    cand_report, cand_items = load_eval(candidate)
    checks = floor_checks(cand_report, cand_items, policy)
    if champion is not None:
        champ_report, champ_items = load_eval(champion)
        champ_by_key = {(i["suite"], i["id"]): i["score"] for i in champ_items}
        for task in TASKS:
            pairs = [(i["score"], champ_by_key[(i["suite"], i["id"])]) for i in cand_items
                     if i["task"] == task and (i["suite"], i["id"]) in champ_by_key]
            margin = policy.margins.get(task, 0.0)
            if not pairs:
                checks.append({"check": "non_inferiority", "task": task, "passed": False, "shared_items": 0,
                               "reason": f"no {task} items shared with the champion: cannot compare; evaluate both "
                                         "on the same suites"})
                continue
            diff = np.array([c - h for c, h in pairs], dtype=float)
            mean, lo, hi = paired_bootstrap(diff, policy.bootstrap_samples, policy.confidence, policy.seed)
            ok = lo >= -margin - 1e-12
            checks.append({"check": "non_inferiority", "task": task, "shared_items": len(pairs), "mean_diff": mean,
                           "ci": [lo, hi], "confidence": policy.confidence, "margin": margin, "passed": ok,
                           "reason": f"{task}: candidate - champion = {mean:+.4f}, {policy.confidence:.0%} CI "
                                     f"[{lo:+.4f}, {hi:+.4f}] {'within' if ok else 'below'} margin -{margin}"})
        primary = policy.primary or sorted(k for k in cand_report["metrics"] if k.endswith("/overall"))
        gains = {m: cand_report["metrics"][m] - champ_report["metrics"][m] for m in primary
                 if m in cand_report["metrics"] and m in champ_report["metrics"]}
        best = max(gains.items(), key=lambda kv: kv[1]) if gains else (None, None)
        ok = bool(gains) and best[1] >= policy.min_improvement
        checks.append({"check": "improvement", "gains": gains, "threshold": policy.min_improvement, "passed": ok,
                       "reason": f"best primary gain {best[0]} {best[1]:+.4f} {'>=' if ok else '<'} "
                                 f"{policy.min_improvement}" if gains else "no primary metric shared with the champion"})
    if not checks:
        checks.append({"check": "policy", "passed": True, "reason": "no champion and no floors: nothing to enforce"})
    passed = all(c["passed"] for c in checks)
    return {"passed": passed, "candidate": str(Path(candidate).resolve()),
            "champion": str(Path(champion).resolve()) if champion else None,
            "candidate_metrics": cand_report["metrics"], "checks": checks,
            "reasons": [c["reason"] for c in checks if not c["passed"]],
            "policy": policy.__dict__}


def write_decision(decision: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(decision, indent=2) + "\n")
