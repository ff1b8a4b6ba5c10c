"""``unitoken train``: one training stage on DeepSpeed (or ``--dry-run``: the plan without data or GPU)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from unitoken.cli.common import UsageError, add_overrides, command, console, err_console


def register(sub) -> None:
    pl = command(sub, "plan", "what a run costs before it runs: per stage tokens, GPU-hours, wall-clock, fit",
                 ["unitoken plan --recipe unitoken-7b --data p --cluster examples/cluster.yaml",
                  "unitoken plan --recipe tiny --data p --price-per-gpu-hour 2.5 --json"], cmd_plan,
                 notes="exit 1: a stage does not fit its node pool or the Kueue quota")
    pl.add_argument("--recipe", required=True)
    pl.add_argument("--data", required=True, type=Path, help="pre-tokenised directory (unitoken data pretokenize)")
    pl.add_argument("--cluster", type=Path, help="cluster config: the stages' GPUs, node pools (and Kueue quota)")
    pl.add_argument("--price-per-gpu-hour", type=float)
    pl.add_argument("--mfu", type=float, help="the MFU to plan with (default: the training loop's, measured)")
    pl.add_argument("--loop-metrics", type=Path, help="a GPU run's metrics.jsonl to take the MFU from")
    pl.add_argument("--sample-records", type=int, default=2000, help="records counted per pool (the rest estimated)")
    pl.add_argument("--json", action="store_true")
    add_overrides(pl)
    tr = command(sub, "train", "run one training stage on DeepSpeed",
                 ["unitoken train --stage 1 --recipe tiny --data p --out runs/stage1 --init m",
                  "unitoken train --stage 2 --recipe tiny --data p --out runs/stage2 --init runs/stage1/handoff",
                  "unitoken train --dry-run --stage 2 --recipe unitoken-7b"], cmd_train,
                 notes="several GPUs: torchrun --nproc_per_node 8 -m unitoken.cli train ... (the same arguments)")
    tr.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    tr.add_argument("--recipe", required=True)
    tr.add_argument("--data", type=Path, help="pre-tokenised directory (unitoken data pretokenize)")
    tr.add_argument("--out", type=Path, help="stage output: checkpoints/, handoff/, metrics.jsonl, loss.png")
    tr.add_argument("--init", help="model to start from: `model init` dir (stage 1) or the previous stage's handoff")
    tr.add_argument("--resume", choices=("auto", "never"), default="auto")
    tr.add_argument("--max-steps", type=int)
    add_overrides(tr)
    tr.add_argument("--mixture", type=Path, help="a UniToken reference data config (META: path, ratio) as this "
                    "stage's mixture by source (see `unitoken data mixture import`)")
    tr.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    tr.add_argument("--dry-run", action="store_true",
                    help="build the model on the meta device and the DeepSpeed config, then stop")


def cmd_plan(args) -> int:
    from unitoken.pipeline.cluster import load_cluster
    from unitoken.pipeline.plan import plan
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
    cluster = load_cluster(args.cluster) if args.cluster is not None else None
    doc = plan(recipe, args.data, cluster, mfu=args.mfu, loop_metrics=args.loop_metrics,
               sample_records=args.sample_records)
    if args.price_per_gpu_hour is not None:
        doc["cost"] = round(doc["gpu_hours"] * args.price_per_gpu_hour, 2)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    table = Table(title=f"plan: {recipe.name} on {args.data} (MFU {doc['mfu']:.1%}: {doc['mfu_source']})")
    for col in ("stage", "samples", "tokens", "PFLOP", "GPU-hours", "GPUs", "wall-clock h", "records counted"):
        table.add_column(col, justify="right")
    for st in doc["stages"]:
        table.add_row(str(st["stage"]), f"{st['samples']:,}", f"{st['tokens']:,}", f"{st['flops'] / 1e15:,.1f}",
                      f"{st['gpu_hours']:,.2f}", str(st["gpus"]), f"{st['wall_hours']:,.2f}",
                      f"{st['records_counted']:,} of {st['records']:,}")
    console.print(table)
    for st in doc["stages"]:
        for note in st["fits"]:
            console.print(f"stage {st['stage']}: {note}")
    console.print(f"total: {doc['gpu_hours']:,.2f} GPU-hours, {doc['wall_hours']:,.2f} h wall-clock"
                  + (f", cost {doc['cost']:,.2f} at {args.price_per_gpu_hour}/GPU-hour" if "cost" in doc else ""))
    return 1 if any(n.startswith("NO") for st in doc["stages"] for n in st["fits"]) else 0


def cmd_train(args) -> int:
    from unitoken.recipes import get_recipe

    overrides = list(args.overrides)
    if args.mixture is not None:
        from unitoken.cli.data import mixture_overrides

        overrides += mixture_overrides(args.mixture, args.stage)[0]
    recipe = get_recipe(args.recipe, overrides)
    if args.dry_run:
        return _train_dry_run(recipe, args.stage)
    missing = [flag for flag, value in (("--data", args.data), ("--out", args.out), ("--init", args.init)) if not value]
    if missing:
        raise UsageError(f"train needs {', '.join(missing)} (or --dry-run)")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps {args.max_steps}: must be >= 1")
    from unitoken.train.train import Stopped
    from unitoken.train.train import main as train_stage

    try:
        from unitoken.registry import model_dir
        from unitoken.tracking.store import parent_run_from_env

        # the pipeline's step launcher, torchrun or a TrainJob pod passes the parent run in the environment
        result = train_stage(args.stage, recipe, args.data, args.out, model_dir(args.init), resume=args.resume,
                             max_steps=args.max_steps, track=not args.no_track, parent_run_id=parent_run_from_env())
    except Stopped as stop:
        err_console.print(f"[yellow]stopped:[/yellow] {stop}", highlight=False, soft_wrap=True)
        return 143  # 128 + SIGTERM, as if the signal had ended the process
    table = Table(title=f"stage {result.stage} ({recipe.name})")
    for col in ("steps", "first loss", "final loss", "seconds", "hand-off", "MLflow run"):
        table.add_column(col)
    table.add_row(str(result.steps), f"{result.losses[0]:.4f}", f"{result.losses[-1]:.4f}", f"{result.seconds:.1f}",
                  str(result.handoff), str(result.mlflow_run_id))
    console.print(table)
    return 0


def _train_dry_run(recipe, stage_n: int) -> int:
    """Model on the meta device + the DeepSpeed config, validated by DeepSpeed; no data, no GPU."""
    import torch

    from unitoken.model.tokens import build_tokenizer
    from unitoken.model.unitoken import UniToken
    from unitoken.train.parallel import ds_config, validate_ds_config

    cfg = recipe.model
    stage = recipe.train.stage(stage_n)
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):
        model = UniToken(cfg, tok.get_vocab())
    counts = model.freeze_except(stage.trainable, recipe.train.freeze_vision_embeddings)
    ds = ds_config(recipe.train, stage)
    validate_ds_config(ds)
    print(json.dumps({"recipe": recipe.name, "stage": stage_n, "parameters": model.num_parameters(),
                      "trainable": counts["trainable"], "frozen": counts["frozen"], "deepspeed": ds}, indent=2))
    return 0
