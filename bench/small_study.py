"""The `small` recipe through stages 1 -> 2 -> 3, evaluated after every stage, and the paper's
Table 5 ablation (dual vs discrete-only encoding; stage 2 on understanding only / generation
only / both), on a machine with two GPUs (one for each; ``--main-only`` needs one).

    bash bench/small_study.sh OUT [run args]            # on the GPU machine (wheels, env, then this)
    python bench/small_study.py run --out OUT --work W --deadline 560
    python bench/small_study.py run --out OUT --work W --recipe tiny --scenes 140 --vq-scenes 140 \
        --vq-steps 10 --s1-steps 2 --s2-steps 4 --s3-steps 2 --calib-steps 3 --abl-unit 2 \
        --limit 10 --limit-gen 7 --sweep-limit 5    # CPU smoke test of the whole path

Setup (data, VQ-GAN, inits, pre-tokenisation) runs once; then two processes each run their
stages and evaluations in-process, one after another (processes sharing one GPU slowed each
other ~10x in a first attempt). The main chain fits stages 2 + 3 into the time left before
``--deadline``, from the measured stage-1 step time. The ablation's joint runs take 2u steps at
1:1 and its single-task runs u steps, so each task sees as many samples alone as together
(the paper's Table 5: 10M, 10M, 10M + 10M). ``OUT/results*.json`` are rewritten after every
step, so a timeout still leaves what was done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PY = sys.executable
U = [PY, "-m", "unitoken.cli"]
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", flush=True)


class Results:
    """results.json, rewritten after every change."""

    def __init__(self, out: Path, name: str = "results.json") -> None:
        self.path = out / name
        self.doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "timings": {}, "evals": {}, "runs": {}}

    def set(self, *keys, value) -> None:
        node = self.doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        self.doc["elapsed_s"] = round(time.time() - T0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        tmp.replace(self.path)


def sh(cmd: list[str], logfile: Path | None = None) -> None:
    with open(logfile, "a") if logfile else open(os.devnull, "w") as fh:
        subprocess.run([str(c) for c in cmd], check=True, stdout=fh, stderr=subprocess.STDOUT)


def spawn(cmd: list[str], logfile: Path) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], stdout=open(logfile, "a"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen]) -> None:
    bad = {k: p.wait() for k, p in procs.items()}
    bad = {k: rc for k, rc in bad.items() if rc}
    if bad:
        raise RuntimeError(f"failed: {bad}")


# --------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- evaluation


def evaluate(model: Path, data: Path, out: Path, suites: list[str], limit_vqa: int, limit_gen: int,
             cfg: float, top_k: int, temperature: float, device: str) -> dict:
    """``unitoken eval`` in-process, with per-suite limits; returns a compact summary."""
    from unitoken.eval.runner import evaluate as run_eval

    summary = {}
    for suite in suites:
        limit = limit_vqa if suite == "shapes-vqa" else limit_gen
        t = time.time()
        report = run_eval(model, [suite], out / suite, data=data, limit=limit, cfg_scale=cfg, top_k=top_k,
                          temperature=temperature, device=device, batch_size=128)
        items = [json.loads(x) for x in (out / suite / "items.jsonl").read_text().splitlines()]
        s = report["suites"][suite]
        summary[suite] = {"overall": s["overall"], "ci95": bootstrap_ci([i["score"] for i in items]),
                          "chance": s["chance"], "n": s["n"], "categories": s["categories"],
                          "seconds": round(time.time() - t, 1)}
    return summary


def item_scores(eval_dir: Path, suite: str) -> dict[str, float]:
    path = eval_dir / suite / "items.jsonl"
    if not path.is_file():
        return {}
    return {r["id"]: r["score"] for r in map(json.loads, path.read_text().splitlines())}


def sweep_sampling(model: Path, data: Path, out: Path, limit: int, device: str) -> dict:
    """Pick CFG scale / top-k / temperature on the *val* split (the test split stays unseen)."""
    from unitoken.eval import generation as gen
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder

    m, tok = load_model(model, device=device)
    builder = SequenceBuilder(m.tokens, tok, m.config)
    items = gen.shapes_geneval_items(data, limit, split="val")
    det = gen.ShapesDetector()
    scores = {}
    for cfg, top_k, temp in ((3.0, 0, 1.0), (3.0, 32, 0.7), (5.0, 32, 0.7)):
        res = gen.run_generation(m, builder, items, out / f"cfg{cfg}_k{top_k}_t{temp}", det, cfg_scale=cfg,
                                 top_k=top_k, temperature=temp, seed=0, batch_size=128)
        scores[f"{cfg},{top_k},{temp}"] = round(sum(r["score"] for r in res) / len(res), 4)
    best = max(scores, key=lambda k: (scores[k], k == "3.0,0,1.0"))
    cfg, top_k, temp = best.split(",")
    return {"val_scores": scores, "chosen": {"cfg": float(cfg), "top_k": int(top_k), "temperature": float(temp)}}


def setup(args, w: Path, out: Path, res: Results) -> None:
    """Data, VQ-GAN, model inits and pre-tokenised data (CPU + GPU 0)."""
    R, dev = args.recipe, args.device
    size = 128 if R == "small" else 64
    logs = w / "logs"

    def timed(name, fn):
        t = time.time()
        fn()
        res.set("timings", name, value=round(time.time() - t, 1))
        log(f"{name} done in {time.time() - t:.0f}s")

    # Step 1: data. A small set for the VQ-GAN first, so its training overlaps the big synth.
    timed("synth_vq", lambda: sh(U + ["data", "synth", "--out", w / "dvq", "--n", args.vq_scenes, "--size", size,
                                      "--seed", 1]))
    vq_proc = spawn(U + ["tokenizer", "train", "--data", w / "dvq", "--out", w / "vq", "--recipe", R, "--steps",
                         args.vq_steps, "--batch-size", 64, "--device", dev], logs / "vq.log")
    timed("synth", lambda: sh(U + ["data", "synth", "--out", w / "d", "--n", args.scenes, "--size", size]))
    timed("vq_wait", lambda: wait_all({"vq": vq_proc}))
    vq_report = json.loads((w / "vq" / "report.json").read_text())
    res.set("vq", value={k: vq_report.get(k) for k in ("steps", "psnr_db", "codebook_usage", "recognition_rate",
                                                       "train_seconds")})
    shutil.copy(w / "vq" / "reconstructions.png", out / "vq_reconstructions.png")

    # Step 2: models (dual, and discrete-only for the ablation) and pre-tokenised data.
    inits = [U + ["model", "init", "--recipe", R, "--tokenizer", w / "vq", "--out", w / "m"]]
    if not args.main_only:
        inits.append(U + ["model", "init", "--recipe", R, "--tokenizer", w / "vq", "--out", w / "m_disc",
                          "--set", "model.encoder_mode=discrete"])
    timed("init", lambda: wait_all({str(i): spawn(c, logs / "init.log") for i, c in enumerate(inits)}))
    timed("pretokenize", lambda: sh(U + ["data", "pretokenize", w / "d" / "manifest.jsonl", "--model", w / "m",
                                         "--out", w / "p", "--batch-size", 256, "--device", dev], logs / "pretok.log"))


def run(args) -> None:
    out, w = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (w / "logs").mkdir(parents=True, exist_ok=True)
    res = Results(out)
    res.set("args", value=vars(args))
    setup(args, w, out, res)
    # Step 3: the main chain (stages 1-3 + evaluations) on one GPU; the Table 5 ablation on another.
    gpus = args.gpus.split(",")
    chain = [PY, __file__, "chain", "--out", out, "--work", w, "--recipe", args.recipe, "--deadline",
             args.deadline - (time.time() - T0), "--device", args.device]
    for k in ("s1_steps", "s2_steps", "s3_steps", "s3_fraction", "limit", "limit_gen", "sweep_limit", "step_factor",
              "reserve", "calib_steps", "abl_unit"):
        if getattr(args, k) is not None:
            chain += [f"--{k.replace('_', '-')}", getattr(args, k)]
    env0 = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[0])
    procs = {"main": subprocess.Popen([str(c) for c in chain + ["--which", "main"]], env=env0)}
    if not args.main_only:
        env1 = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[-1])
        procs["ablation"] = subprocess.Popen([str(c) for c in chain + ["--which", "ablation"]], env=env1)
    for p in procs.values():
        p.wait()
    res.set("chains", value={k: p.returncode for k, p in procs.items()})
    log("all done")


def bundle(w: Path, dest: Path, which: str) -> None:
    """Raw per-item results, metrics and some generated images of one chain -> ``dest`` (tar.gz)."""
    tmp = dest.with_suffix(".tmp")
    prefix = "abl" if which == "ablation" else "s"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(w.glob(f"evals/{'abl_' if which == 'ablation' else 'stage'}*/*/*.json*")) + \
                sorted(w.glob(f"{prefix}*/metrics.jsonl")) + sorted(w.glob(f"{prefix}*/*/metrics.jsonl")) + \
                [w / "vq" / "report.json"]:
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(w)))
        for name in ("stage3_tuned", "stage3", "stage2"):
            for img in sorted((w / "evals" / name / "shapes-geneval" / "images").glob("*.png"))[:200]:
                tar.add(img, arcname=str(img.relative_to(w)))
    tmp.replace(dest)


def steady_step_s(metrics: Path) -> float:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    tail = rows[len(rows) // 2:] or rows
    return statistics.median(r["step_s"] for r in tail)


class Chain:
    """Training stages and evaluations in one process (no start-up cost per step)."""

    def __init__(self, args, which: str) -> None:
        self.args, self.which = args, which
        self.out, self.w = Path(args.out), Path(args.work)
        self.res = Results(self.out, f"results_{which}.json")
        self.deadline = T0 + args.deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def train(self, stage: int, name: str, init: Path, steps: int, sets: list[str]) -> dict:
        from unitoken.recipes import get_recipe
        from unitoken.train.train import main as train_main

        t = time.time()
        recipe = get_recipe(self.args.recipe, sets)
        result = train_main(stage, recipe, self.w / "p", self.w / name, init, max_steps=steps, track=False,
                            show_progress=False)
        info = {"stage": stage, "steps": steps, "sets": sets, "seconds": round(time.time() - t, 1),
                "step_s": round(steady_step_s(self.w / name / "metrics.jsonl"), 4),
                "final_loss": result.losses[-1] if result.losses else None}
        self.res.set("runs", name.replace("/", "_"), value=info)
        log(f"{self.which}: trained {name} ({steps} steps, {info['seconds']}s, {info['step_s']}s/step)")
        return info

    def eval(self, name: str, model: Path, suites: list[str], limit: int, limit_gen: int, sampling=None) -> None:
        sampling = sampling or {"cfg": 3.0, "top_k": 0, "temperature": 1.0}
        summary = evaluate(model, self.w / "d", self.w / "evals" / name, suites, limit, limit_gen, sampling["cfg"],
                           sampling["top_k"], sampling["temperature"], self.args.device)
        summary["sampling"] = sampling
        self.res.set("evals", name, value=summary)
        bundle(self.w, self.out / f"raw_{self.which}.tar.gz", self.which)  # a timeout keeps what is done
        log(f"{self.which}: eval {name}: " + ", ".join(f"{s} {v['overall']:.3f} {v['ci95']}"
                                                      for s, v in summary.items() if "overall" in v))

    def main(self) -> None:
        a, w = self.args, self.w
        both = ["shapes-vqa", "shapes-geneval"]
        small_vqa, small_gen = max(1, a.limit // 2), max(1, a.limit_gen // 2)
        self.train(1, "s1", w / "m", a.s1_steps, [])
        (w / "s1_done").touch()
        self.eval("stage1", w / "s1" / "handoff", both, small_vqa, small_gen)
        # Stage 2 gets what is left before the deadline (less the evaluations at the end), in
        # steps of a short stage-2 calibration run (stage-1 steps cost less: the LLM is frozen).
        if a.s2_steps:
            s2_steps = a.s2_steps
        else:
            calib = self.train(2, "s2_calib", w / "s1" / "handoff", a.calib_steps, [])
            avail = (self.left() - a.reserve) / (1 + a.s3_fraction)
            s2_steps = max(2, int(avail / (calib["step_s"] * a.step_factor)))
        s2 = self.train(2, "s2", w / "s1" / "handoff", s2_steps, [])
        self.eval("stage2", w / "s2" / "handoff", both, small_vqa, small_gen)
        s3_steps = a.s3_steps or max(2, min(int(a.s3_fraction * s2_steps * 1.5),
                                             int((self.left() - a.reserve + 25) / s2["step_s"])))
        self.train(3, "s3", w / "s2" / "handoff", s3_steps, [])
        self.eval("stage3", w / "s3" / "handoff", both, a.limit, a.limit_gen)
        self.res.set("stage3_vs_stage1", value={
            s: paired_diff(item_scores(w / "evals" / "stage1", s), item_scores(w / "evals" / "stage3", s))
            for s in both})
        sweep = sweep_sampling(w / "s3" / "handoff", w / "d", w / "sweep", a.sweep_limit, a.device)
        self.res.set("sampling_sweep", value=sweep)
        log(f"sampling sweep: {sweep}")
        self.eval("stage3_tuned", w / "s3" / "handoff", ["shapes-geneval"], a.limit, a.limit_gen, sweep["chosen"])
        self.res.set("done", value=True)

    def ablation(self) -> None:
        """Table 5: stage 2 alone, discrete-only vs dual, on understanding / generation / both.
        Joint runs take 2u steps at 1:1, single-task runs u steps: each task sees as many samples."""
        a, w = self.args, self.w
        disc = ["model.encoder_mode=discrete"]
        und, gen = ["train.stage2.generation_ratio=0"], ["train.stage2.understanding_ratio=0"]
        runs = [("disc_und", w / "m_disc", disc + und, 1), ("disc_gen", w / "m_disc", disc + gen, 1),
                ("disc_both", w / "m_disc", disc, 2), ("dual_und", w / "s1" / "handoff", und, 1),
                ("dual_gen", w / "s1" / "handoff", gen, 1), ("dual_both", w / "s1" / "handoff", [], 2)]
        calib = self.train(2, "abl/calib", w / "m_disc", a.calib_steps, disc)
        per_step = calib["step_s"] * 1.2  # dual steps cost a little more than discrete ones
        eval_s = 20.0  # one small evaluation
        unit = a.abl_unit or max(2, int((self.left() - len(runs) * (eval_s + 8)) / (8 * per_step)))
        self.res.set("unit_steps", value=unit)
        log(f"ablation: {unit} steps per task ({per_step:.3f}s/step estimated)")
        suites = {"und": ["shapes-vqa"], "gen": ["shapes-geneval"], "both": ["shapes-vqa", "shapes-geneval"]}
        for name, init, sets, rel in runs:
            while name.startswith("dual") and not (w / "s1_done").exists():
                time.sleep(2)
            self.train(2, f"abl/{name}", init, rel * unit, sets)
            self.eval(f"abl_{name}", w / "abl" / name / "handoff", suites[name.split("_")[1]],
                      max(1, a.limit // 2), max(1, a.limit_gen // 2))
        self.res.set("done", value=True)


def chain_main(args) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    # Two chains (and their evaluations) share the host: OpenMP threads on every core made the
    # CPU side of each 10-100x slower in a first attempt (see unitoken/train/train.py).
    torch.set_num_threads(4)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # evaluation runs the model in fp32
    c = Chain(args, args.which)
    c.main() if args.which == "main" else c.ablation()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole study")
    c = sub.add_parser("chain", help="one chain (main | ablation), started by run")
    for p in (r, c):
        p.add_argument("--out", required=True)
        p.add_argument("--work", required=True)
        p.add_argument("--recipe", default="small")
        p.add_argument("--device", default="auto")
        p.add_argument("--deadline", type=float, default=1e9, help="seconds from the start by which all is done")
        p.add_argument("--reserve", type=float, default=150, help="seconds kept for the evaluations after stage 2")
        p.add_argument("--s1-steps", type=int, default=60)
        p.add_argument("--s2-steps", type=int, help="fixed stage-2 steps (default: fill the time to the deadline)")
        p.add_argument("--s3-steps", type=int)
        p.add_argument("--s3-fraction", type=float, default=0.3, help="stage-3 time as a fraction of stage 2")
        p.add_argument("--step-factor", type=float, default=1.15, help="safety margin on the measured step time")
        p.add_argument("--calib-steps", type=int, default=12, help="ablation: steps that measure the step time")
        p.add_argument("--abl-unit", type=int, help="ablation: fixed steps per task")
        p.add_argument("--limit", type=int, default=1000, help="shapes-vqa items in the final evaluation")
        p.add_argument("--limit-gen", type=int, default=400, help="shapes-geneval prompts in the final evaluation")
        p.add_argument("--sweep-limit", type=int, default=128)
    r.add_argument("--scenes", type=int, default=4000)
    r.add_argument("--vq-scenes", type=int, default=1500)
    r.add_argument("--vq-steps", type=int, default=800)
    r.add_argument("--gpus", default="0,1", help="main chain on the first, ablation on the last")
    r.add_argument("--main-only", action="store_true", help="no Table 5 ablation runs")
    c.add_argument("--which", choices=("main", "ablation"), required=True)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run(args) if args.cmd == "run" else chain_main(args)


if __name__ == "__main__":
    main()
