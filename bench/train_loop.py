"""The whole `unitoken train` loop (data drawing, collation, step) with and without prefetching,
side by side in one run, on the small recipe's synthetic data.

    python bench/train_loop.py --out runs/train_loop                  # GPU machine (wheels as in studies/small_study/run.sh)
    python bench/train_loop.py --out /tmp/tl --recipe tiny --scenes 60 --steps 6   # CPU smoke test

Each variant is a stage-2 run of --steps steps from the same stage-1 hand-off; the table gives the
median step time over the second half of the steps (the first steps pay for warm-up) and the
final loss, which must agree (prefetching draws the same batches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

U = [sys.executable, "-m", "unitoken.cli"]


def sh(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--recipe", default="small")
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every run (e.g. model.vq.channel_multiplier=[1,2,2,4])")
    args = ap.parse_args()
    w = args.out
    w.mkdir(parents=True, exist_ok=True)
    sets = [x for s in args.sets for x in ("--set", s)]
    size = 128 if args.recipe == "small" else 64
    if not (w / "p" / "index.json").is_file():
        sh(*U, "data", "synth", "--out", w / "d", "--n", args.scenes, "--size", size)
        sh(*U, "model", "init", "--recipe", args.recipe, "--out", w / "m", *sets)
        sh(*U, "data", "pretokenize", w / "d" / "manifest.jsonl", "--model", w / "m", "--out", w / "p",
           "--batch-size", 256)
        # stage 2 starts from a stage-1 hand-off: one step makes one
        sh(*U, "train", "--stage", 1, "--recipe", args.recipe, "--data", w / "p", "--out", w / "s1", "--init", w / "m",
           "--max-steps", 1, "--no-track", *sets)
    rows = []
    for depth in (0, 2):
        run = w / f"prefetch{depth}"
        sh(*U, "train", "--stage", 2, "--recipe", args.recipe, "--data", w / "p", "--out", run,
           "--init", w / "s1" / "handoff", "--max-steps", args.steps, "--no-track", "--resume", "never",
           *sets, "--set", f"train.prefetch={depth}")
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        tail = metrics[len(metrics) // 2:]
        rows.append({"prefetch": depth, "steps": len(metrics),
                     "median_step_s": statistics.median(r["step_s"] for r in tail),
                     "tokens_per_step": statistics.median(r["tokens"] for r in tail),
                     "final_loss": metrics[-1]["loss"]})
    base = rows[0]["median_step_s"]
    print("| prefetch | steps | median step s | tokens/step | speed-up | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prefetch']} | {r['steps']} | {r['median_step_s']:.3f} | {r['tokens_per_step']:,.0f} | "
              f"{base / r['median_step_s']:.2f}x | {r['final_loss']} |")
    (w / "train_loop.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
