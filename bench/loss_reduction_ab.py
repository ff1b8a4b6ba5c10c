"""CPU check: does the tiny model learn to answer shapes-VQA (incl. multiple choice) in stage 2
(understanding : generation = 1 : 1), with the loss averaged over tokens (the paper) vs over
samples (the `small` default)? Finished runs and evaluations are reused.

    unitoken data synth --out W/d --n 600 --size 64
    unitoken tokenizer train --data W/d --out W/vq --recipe tiny --steps 300 --batch-size 32
    unitoken model init --recipe tiny --tokenizer W/vq --out W/m
    unitoken data pretokenize W/d/manifest.jsonl --model W/m --out W/p
    OMP_NUM_THREADS=1 python bench/loss_reduction_ab.py W OUT.json 400
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from unitoken.eval.runner import evaluate, load_eval
from unitoken.recipes import get_recipe
from unitoken.train.train import main as train_main


def bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of a mean."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    return [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n) - 1], 4)]


def run() -> None:
    w, out = Path(sys.argv[1]), Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    common = ["train.stage2.batch_size=16", "train.dropout=0.0"]
    s1 = w / "ab_s1"
    if not (s1 / "handoff").is_dir():
        train_main(1, get_recipe("tiny"), w / "p", s1, w / "m", max_steps=3, track=False, show_progress=False)
    results = {"steps": steps, "batch_size": 16, "data": "stage-2 sources, und:gen 1:1", "stage1_steps": 3}
    scores = {}
    for reduction in ("token", "sample"):
        t = time.time()
        name = f"ab_s2_{reduction}"
        if not (w / name / "handoff").is_dir():
            recipe = get_recipe("tiny", common + [f"train.loss_reduction={reduction}"])
            train_main(2, recipe, w / "p", w / name, s1 / "handoff", max_steps=steps, track=False, show_progress=False)
        if not (w / f"eval_{name}" / "report.json").is_file():
            evaluate(w / name / "handoff", ["shapes-vqa"], w / f"eval_{name}", data=w / "d", limit=250)
        report, items = load_eval(w / f"eval_{name}")
        s = report["suites"]["shapes-vqa"]
        scores[reduction] = {i["id"]: i["score"] for i in items}
        results[reduction] = {"overall": s["overall"], "ci95": bootstrap(list(scores[reduction].values())),
                              "chance": s["chance"], "n": s["n"], "categories": s["categories"],
                              "mc_letters": sum(bool(i["prediction"][:1] in "ABCD" and i["prediction"][:1])
                                                for i in items if i["category"].startswith("mc_")),
                              "mc_items": sum(i["category"].startswith("mc_") for i in items)}
        print(reduction, results[reduction], f"{time.time() - t:.0f}s", flush=True)
    diff = [scores["sample"][k] - scores["token"][k] for k in sorted(scores["token"])]
    results["sample_minus_token"] = {"diff": round(sum(diff) / len(diff), 4), "ci95": bootstrap(diff), "n": len(diff)}
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    run()
