"""The commands users run, timed: `unitoken data pretokenize` on real JPEGs of mixed sizes, and
`unitoken train` (data loading, prefetch, logging, periodic checkpoints) with the 7B layer shape.

    python bench/product_path.py --out runs/bench/product        # one GPU (make bench-gpu runs it)
    python bench/product_path.py --out /tmp/pp --recipe tiny --layers 2 --scenes 40 --steps 6 \\
        --ckpt-layers 1 --save-every 2 --device cpu                  # CPU smoke test of the whole path

Three parts, each through the CLI in its own process, exactly as a user runs it:

1. **Pre-tokenisation**: the synthetic scenes re-encoded as JPEGs of mixed sizes (a third each
   smaller than, equal to and larger than the VQ resolution, non-square), then
   `unitoken data pretokenize` on them. The rate is distinct images per second of the command's
   wall time, start-up included.
2. **Training loop**: `unitoken train --stage 1` (one step) and `--stage 2` of ``--recipe`` with
   ``--layers`` and ``--ckpt-layers`` decoder layers at the recipe's defaults (global batch, memory
   plan: nothing set but the layers and steps), no periodic checkpoint. The rate is the median of ``metrics.jsonl``'s tokens/s and MFU over
   the second half of the steps (the first pay for compilation). Beside it is the benchmark
   (``throughput_7b_compile_32k.json`` from ``bench/train_throughput.py``, same call of
   ``make bench-gpu``) where that file is in ``--out``.
3. **Checkpoints in the loop**: the same stage with ``--ckpt-layers`` layers (what fits the disk
   twice), saving every ``--save-every`` steps, once with the staged writer (the default) and
   once with ``train.async_checkpoint=false``. The blocking time per save comes from
   ``checkpoints.jsonl``, and it is scaled to the full 7B by parameter count: extrapolated,
   and labelled so.

Writes ``product_path.json`` into ``--out`` and prints a table against the targets of issue 32.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

U = [sys.executable, "-m", "unitoken.cli"]
FULL_7B = 7.01e9  # LLM + head parameters of unitoken-7b (bench/checkpoint_io.py)
TARGETS = {"tokens_vs_bench": 0.90, "mfu": 0.50, "blocking_s_7b": 10.0, "pretokenize_images_per_s": 1000.0}


WALL: dict[str, float] = {}  # seconds of each command, by what it was (written into the JSON)


def sh(*args, log: Path, what: str = "") -> float:
    """Run a CLI command, its output appended to ``log``; the wall seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, args))}\n")
        f.flush()
        subprocess.run([str(a) for a in args], check=True, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if what:
        WALL[what] = round(seconds, 1)
    return seconds


def as_mixed_jpegs(data: Path, out: Path, resolution: int, seed: int = 0) -> tuple[Path, int]:
    """Every distinct image of ``data``'s manifest as a JPEG of a random size around
    ``resolution`` (0.6x to 2.5x, aspect 3:4 to 4:3), with a manifest pointing at them."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    renamed: dict[str, str] = {}
    rows = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        for rel in row.get("image", []):
            if rel in renamed:
                continue
            w = int(resolution * rng.choice((0.6, 1.0, 2.5)))
            h = int(w * rng.uniform(0.75, 1.33))
            target = Path(rel).with_suffix(".jpg")
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            Image.open(data / rel).convert("RGB").resize((w, h), Image.BICUBIC).save(out / target, quality=90)
            renamed[rel] = str(target)
    with open(out / "manifest.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "image": [renamed[r] for r in row.get("image", [])]}) + "\n")
    return out / "manifest.jsonl", len(renamed)


def loop_numbers(run: Path) -> dict:
    """Medians over the second half of the steps (the first pay for compilation), the memory plan
    the run made and the peak memory it reached."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tail = rows[len(rows) // 2:]
    out = {"steps": len(rows), "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
           "median_step_s": statistics.median(r["step_s"] for r in tail),
           "micro_batches": rows[-1].get("micro_batches"), "tokens_per_step": rows[-1]["tokens"]}
    for key in ("mfu", "peak_gib"):
        if all(key in r for r in tail):
            out[f"median_{key}" if key == "mfu" else key] = (statistics.median if key == "mfu" else max)(r[key] for r in tail)
    plan = run / "memory_plan.json"
    if plan.is_file():
        out["memory_plan"] = json.loads(plan.read_text())
    return out


def save_numbers(run: Path, params: int) -> dict:
    saves = [json.loads(x) for x in (run / "checkpoints.jsonl").read_text().splitlines()]
    blocking = [s["blocking_s"] for s in saves]
    worst = max(blocking)
    return {"saves": len(saves), "blocking_s": blocking, "published_after_s": [s["published_after_s"] for s in saves],
            "max_blocking_s": worst, "parameters": params, "max_blocking_s_7b_extrapolated": round(worst * FULL_7B / params, 2)}


def parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def bench_tokens_per_s(out: Path) -> float | None:
    """The benchmark's compiled 7B-shape tokens/s, where make bench-gpu wrote it into ``out``."""
    p = out / "throughput_7b_compile_32k.json"
    if not p.is_file():
        return None
    rows = [v for v in json.loads(p.read_text())["variants"] if "tokens_per_s" in v]
    return max(v["tokens_per_s"] for v in rows) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--recipe", default="unitoken-7b-fast")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the training-loop run")
    ap.add_argument("--ckpt-layers", type=int, default=1, help="decoder layers of the checkpoint runs (disk)")
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--steps", type=int, default=10, help="steps of the timed stage-2 loop")
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--blocking-saves", action="store_true",
                    help="also time saves with train.async_checkpoint=false (DeepSpeed's torch.save)")
    ap.add_argument("--compare-zero", type=int, nargs="*", default=[],
                    help="also time the loop with these train.zero_stage values")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="loop,ckpt",
                    help="after pre-tokenisation: loop (stage 1 + the timed stage-2 loop at --layers), ckpt (stage 1 "
                         "+ stage 2 with periodic saves at --ckpt-layers), or both")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="profile this step of the stage-2 loop (train.profile_step; keep it in the first half)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/unitoken-product-path"))
    args = ap.parse_args()
    out, w = args.out, args.work
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    log = out / "product_path.log"
    from unitoken.recipes import get_recipe

    resolution = get_recipe(args.recipe).model.vq.resolution
    doc: dict = {"recipe": args.recipe, "device": args.device, "targets": TARGETS}
    console = Console()

    with console.status("synthetic scenes, mixed-size JPEGs") as status:
        sh(*U, "data", "synth", "--out", w / "d", "--n", args.scenes, "--size", resolution, log=log, what="synth")
        manifest, images = as_mixed_jpegs(w / "d", w / "j", resolution)
        models = {}
        for n in dict.fromkeys(([args.layers] if "loop" in args.parts else []) + ([args.ckpt_layers] if "ckpt" in args.parts else [])):
            status.update(f"model init, {n} layers")
            models[n] = w / f"m{n}"
            sh(*U, "model", "init", "--recipe", args.recipe, "--out", models[n], "--set", f"model.llm.num_layers={n}",
               log=log, what=f"model init, {n} layers")
        params = {n: parameters(m) for n, m in models.items()}
        if not models:
            raise SystemExit("--parts names neither loop nor ckpt")
        status.update("pretokenize (timed)")
        seconds = sh(*U, "data", "pretokenize", manifest, "--model", models[min(models)], "--out", w / "p",
                     "--device", args.device, "--summary-json", w / "pretokenize.json", log=log, what="pretokenize")
        inner = json.loads((w / "pretokenize.json").read_text())
        # the command's own rate (distinct images decoded + encoded per second of its shard loop)
        # and the wall time with start-up (Python, model load, CUDA init: ~30 s at 7B shapes)
        doc["pretokenize"] = {"images": images, "seconds": round(seconds, 2), "wall_images_per_s": round(images / seconds, 1),
                              "images_per_s": inner["images_per_s"], "loop_seconds": inner["seconds"],
                              "distinct_images": inner["distinct_images"], "records": inner["records"],
                              "compile_s": inner.get("compile_s"),
                              "source": "JPEG, 0.6x/1x/2.5x the VQ resolution, aspect 3:4 to 4:3"}
        (out / "product_path.json").write_text(json.dumps(doc, indent=1))
        # the loop at the recipe's defaults (only layers and steps given), then ZeRO variants, then saves
        parts = set(args.parts.split(","))
        runs = {"loop": (args.layers, args.steps, []),
                # stage 2 at --ckpt-layers with periodic saves (the staged writer is the default)
                "ckpt_staged": (args.ckpt_layers, 2 * args.save_every + 1, []),
                **{f"loop_zero{z}": (args.layers, args.steps, [f"train.zero_stage={z}"]) for z in args.compare_zero}}
        runs = {k: v for k, v in runs.items() if ("ckpt" if k.startswith("ckpt") else "loop") in parts}
        if args.blocking_saves and "ckpt" in parts:
            runs["ckpt_blocking"] = (args.ckpt_layers, 2 * args.save_every + 1, ["train.async_checkpoint=false"])
        for name, (n, steps, sets) in runs.items():
            if models.get(n) is not None:  # stage 2 starts from a stage-1 hand-off: one step at the defaults
                status.update(f"stage 1 hand-off, {n} layers")
                sh(*U, "train", "--stage", 1, "--recipe", args.recipe, "--data", w / "p", "--out", w / f"s1_{n}",
                   "--init", models[n], "--max-steps", 1, "--no-track", "--set", f"model.llm.num_layers={n}", log=log,
                   what=f"stage 1, {n} layers, 1 step")
                doc[f"stage1_{n}_layers"] = loop_numbers(w / f"s1_{n}")
                shutil.rmtree(models[n])  # the disk holds a few 7B-shape copies at most (64 GiB on the GPU machine)
                models[n] = None
            status.update(f"stage 2: {name} ({n} layers, {steps} steps)")
            every = args.save_every if name.startswith("ckpt") else steps + 1
            sets = sets + ([f"train.save_every={every}"] if name.startswith("ckpt") else [])
            if name == "loop" and args.profile_step:  # in the first half: not in the medians
                sets.append(f"train.profile_step={args.profile_step}")
            sh(*U, "train", "--stage", 2, "--recipe", args.recipe, "--data", w / "p", "--out", w / name,
               "--init", w / f"s1_{n}" / "handoff", "--max-steps", steps, "--no-track", "--resume", "never",
               "--set", f"model.llm.num_layers={n}", *[x for s in sets for x in ("--set", s)], log=log,
               what=f"stage 2 {name}, {n} layers, {steps} steps")
            for prof in (w / name).glob("profile_step*.txt"):
                shutil.copy(prof, out / f"{name}_{prof.name}")
            doc[name] = {**save_numbers(w / name, params[n]), **loop_numbers(w / name), "layers": n} \
                if name.startswith("ckpt") else {**loop_numbers(w / name), "layers": n}
            doc["wall_s"] = WALL
            (out / "product_path.json").write_text(json.dumps(doc, indent=1))  # what finished, if a limit cuts the rest
            shutil.rmtree(w / name / "handoff", ignore_errors=True)
            shutil.rmtree(w / name / "checkpoints", ignore_errors=True)
    doc["recompile_limit_warnings"] = log.read_text().count("recompile_limit")
    doc["wall_s"] = WALL
    bench = bench_tokens_per_s(out)
    if bench and "loop" in doc:
        doc["loop"]["bench_tokens_per_s"] = bench
        doc["loop"]["vs_bench"] = round(doc["loop"]["median_tokens_per_s"] / bench, 3)
    (out / "product_path.json").write_text(json.dumps(doc, indent=1))
    console.print(table(doc))


def rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, verdict) rows; bench/perf_summary.py prints them too."""
    loop, pre = doc.get("loop", {}), doc.get("pretokenize")
    out = []
    if not loop:
        out.append(("unitoken train, stage 2 loop", ">= 0.90x the benchmark", "not measured (cut by its time limit)",
                    "not measured"))
    elif "vs_bench" in loop:
        out.append(("unitoken train tokens/s vs the benchmark's", ">= 0.90x",
                    f"{loop['vs_bench']:.2f}x ({loop['median_tokens_per_s']:,.0f} vs {loop['bench_tokens_per_s']:,.0f})",
                    "met" if loop["vs_bench"] >= TARGETS["tokens_vs_bench"] else "missed"))
    else:
        out.append(("unitoken train tokens/s", "-", f"{loop['median_tokens_per_s']:,.0f} (no benchmark file beside)", ""))
    if loop and "median_mfu" in loop:
        out.append(("unitoken train MFU (useful FLOPs)", ">= 50 %", f"{loop['median_mfu']:.1%}",
                    "met" if loop["median_mfu"] >= TARGETS["mfu"] else "missed"))
    for name, run in doc.items():
        if name.startswith(("stage1_", "loop_")) and isinstance(run, dict) and "median_tokens_per_s" in run:
            plan = run.get("memory_plan", {})
            out.append((f"{name.replace('_', ' ')} at the recipe's defaults" if not name.startswith("loop_zero")
                        else f"stage 2, train.zero_stage={name[-1]}", "runs, no OOM",
                        f"{run['median_tokens_per_s']:,.0f} tok/s, MFU {run.get('median_mfu', 0):.1%}, "
                        f"peak {run.get('peak_gib')} GiB, {run.get('micro_batches')} micro-batches of <= "
                        f"{plan.get('micro_batch_tokens', '?')} tokens, {plan.get('checkpoint_layers', '?')} layers "
                        "checkpointed", "ran"))
    if "ckpt_staged" in doc and "median_tokens_per_s" in doc["ckpt_staged"]:
        c = doc["ckpt_staged"]
        out.append((f"stage 2, {c.get('layers', '?')} layer(s) at the recipe's defaults (saves every few steps)",
                    "runs, no OOM", f"{c['median_tokens_per_s']:,.0f} tok/s, peak {c.get('peak_gib')} GiB, "
                    f"{c.get('micro_batches')} micro-batches of <= {c.get('memory_plan', {}).get('micro_batch_tokens', '?')} "
                    "tokens", "ran"))
    if "recompile_limit_warnings" in doc:
        out.append(("dynamo recompile-limit warnings in the log", "0", str(doc["recompile_limit_warnings"]),
                    "met" if doc["recompile_limit_warnings"] == 0 else "missed"))
    for name in ("ckpt_staged", "ckpt_blocking"):
        if name not in doc:
            continue
        c = doc[name]
        staged = name == "ckpt_staged"
        verdict = ("met" if c["max_blocking_s_7b_extrapolated"] <= TARGETS["blocking_s_7b"] else "missed") if staged else ""
        out.append((f"blocking per save in unitoken train, {'staged writer' if staged else 'DeepSpeed torch.save'}",
                    "<= 10 s (7B)" if staged else "-",
                    f"{c['max_blocking_s']:.2f} s measured ({c['parameters']:,} params); "
                    f"{c['max_blocking_s_7b_extrapolated']} s extrapolated to 7B", verdict))
    if pre is None:
        return out
    out.append(("unitoken data pretokenize, mixed-size JPEGs", ">= 1,000 images/s",
                f"{pre['images_per_s']:,.0f} images/s in its loop ({pre['distinct_images']} images, "
                f"{pre['loop_seconds']} s); {pre['wall_images_per_s']:,.0f} with start-up ({pre['seconds']} s)",
                "met" if pre["images_per_s"] >= TARGETS["pretokenize_images_per_s"] else "missed"))
    return out


def table(doc: dict) -> Table:
    t = Table(title=f"the product path ({doc['recipe']}, {doc['device']})")
    for c in ("what", "target", "measured", "verdict"):
        t.add_column(c)
    for row in rows(doc):
        t.add_row(*row)
    return t


if __name__ == "__main__":
    main()
