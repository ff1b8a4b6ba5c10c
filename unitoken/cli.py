"""The ``unitoken`` command (contract: shared/CLI.md).

Exit codes: 0 success, 1 error (one line naming the problem and the fix; traceback only with
``--debug``), 2 usage error, 3 a gate or validation said no.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)

EXAMPLES = {
    "model init": "unitoken model init --recipe tiny --out m",
    "model summary": "unitoken model summary --recipe unitoken-7b",
    "generate": 'unitoken generate --model m --prompt "a red circle" --out g.png',
    "chat": 'unitoken chat --model m --image g.png --prompt "What is this?"',
    "data synth": "unitoken data synth --out d --n 500",
    "data validate": "unitoken data validate d/manifest.jsonl --out v",
    "data pretokenize": "unitoken data pretokenize v/clean.jsonl --model m --out p",
    "tokenizer train": "unitoken tokenizer train --data d --out vq --recipe tiny",
    "train": "unitoken train --stage 1 --recipe tiny --data p --out runs/stage1 --init m",
    "eval": "unitoken eval --model runs/stage3/handoff --suite shapes-vqa,shapes-geneval --data d --out e",
    "gate": "unitoken gate --candidate e --champion e_prev --policy gate.yaml --out decision.json",
    "registry": "unitoken registry register --model runs/stage3/handoff --eval e --gate decision.json --name shapes",
    "lineage": "unitoken lineage models:/shapes@champion",
    "pipeline": "unitoken pipeline run --local --recipe tiny",
}


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="unitoken", description="UniToken training platform.",
                                epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()), formatter_class=fmt)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="create and inspect models")
    msub = model.add_subparsers(dest="model_command", required=True)
    init = msub.add_parser("init", help="a model from a recipe (random, trained VQ tokenizer, released weights)",
                           epilog="example:\n  " + EXAMPLES["model init"], formatter_class=fmt)
    init.add_argument("--recipe", required=True, help="tiny | small | unitoken-7b | unitoken-7b-anyres | unitoken-7b-fast")
    init.add_argument("--out", required=True, type=Path, help="model directory to write (hand-off format)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--tokenizer", type=Path, help="VQ-GAN directory (vqgan.yaml + vqgan.ckpt) to use")
    init.add_argument("--pretrained", type=Path, nargs="+", default=[],
                      help="released weights: Lumina-mGPT/Chameleon HF dir, SigLIP HF dir, VQ-GAN dir")
    init.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="recipe override, e.g. --set model.encoder_mode=discrete")
    summary = msub.add_parser("summary", help="parameter counts of a recipe, built on the meta device",
                              epilog="example:\n  " + EXAMPLES["model summary"], formatter_class=fmt)
    summary.add_argument("--recipe", required=True)
    summary.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")

    data = sub.add_parser("data", help="synthesise, validate and pre-tokenise data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="synthetic shapes data set (manifest + images + annotations)",
                            epilog="example:\n  " + EXAMPLES["data synth"], formatter_class=fmt)
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--n", required=True, type=int, help="number of scenes")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, help="rendering threads (default: CPU count, at most 8); "
                       "the files do not depend on it")
    val = dsub.add_parser("validate", help="great-expectations validation with quarantine",
                          epilog="example:\n  " + EXAMPLES["data validate"], formatter_class=fmt)
    val.add_argument("manifest", type=Path)
    val.add_argument("--out", required=True, type=Path)
    val.add_argument("--max-reject-fraction", type=float, default=0.01)
    val.add_argument("--data-root", type=Path, help="images must stay under this directory (default: the manifest's)")

    pre = dsub.add_parser("pretokenize", help="VQ-encode images into resumable shards",
                          epilog="example:\n  " + EXAMPLES["data pretokenize"], formatter_class=fmt)
    pre.add_argument("manifest", type=Path, help="a validated manifest (clean.jsonl)")
    pre.add_argument("--model", required=True, help="model directory whose VQ-GAN and vision config to use")
    pre.add_argument("--out", required=True, type=Path)
    pre.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    pre.add_argument("--batch-size", type=int, default=64, help="images per VQ forward pass")
    pre.add_argument("--device", default="auto")

    tk = sub.add_parser("tokenizer", help="train a VQ tokenizer where no released one fits")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train the recipe's VQ-GAN on a data set's images",
                         epilog="example:\n  " + EXAMPLES["tokenizer train"], formatter_class=fmt)
    tt.add_argument("--data", required=True, type=Path, help="data dir (manifest.jsonl) or a manifest")
    tt.add_argument("--out", required=True, type=Path)
    tt.add_argument("--recipe", default="tiny")
    tt.add_argument("--steps", type=int, default=2000)
    tt.add_argument("--batch-size", type=int, default=32)
    tt.add_argument("--lr", type=float, default=1e-3)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--device", default="auto")
    tt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    tr = sub.add_parser("train", help="run one training stage on DeepSpeed",
                        epilog="example:\n  " + EXAMPLES["train"] + "\n  unitoken train --stage 2 --recipe tiny "
                        "--data p --out runs/stage2 --init runs/stage1/handoff", formatter_class=fmt)
    tr.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    tr.add_argument("--recipe", required=True)
    tr.add_argument("--data", type=Path, help="pre-tokenised directory (unitoken data pretokenize)")
    tr.add_argument("--out", type=Path, help="stage output: checkpoints/, handoff/, metrics.jsonl, loss.png")
    tr.add_argument("--init", help="model to start from: `model init` dir (stage 1) or the previous stage's handoff")
    tr.add_argument("--resume", choices=("auto", "never"), default="auto")
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tr.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    tr.add_argument("--dry-run", action="store_true",
                    help="build the model on the meta device and the DeepSpeed config, then stop")

    ev = sub.add_parser("eval", help="evaluate understanding and generation suites",
                        epilog="example:\n  " + EXAMPLES["eval"], formatter_class=fmt)
    ev.add_argument("--model", required=True)
    ev.add_argument("--suite", required=True, help="comma list: shapes-vqa, shapes-geneval, mc, geneval")
    ev.add_argument("--out", required=True, type=Path)
    ev.add_argument("--data", type=Path, help="synthetic data dir for the shapes suites")
    ev.add_argument("--limit", type=int, help="at most N items per suite")
    ev.add_argument("--mc-file", type=Path, help="MMBench/SEED/MMStar-style JSONL for the mc suite")
    ev.add_argument("--circular", action="store_true", help="circular evaluation for the mc suite")
    ev.add_argument("--geneval-metadata", type=Path, help="GenEval evaluation_metadata.jsonl for the geneval suite")
    ev.add_argument("--detector", help="module:Class detector for generated images (default: the shapes detector)")
    ev.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's recipe's)")
    ev.add_argument("--top-k", type=int, help="image top-k, 0 = all (default: the model's recipe's)")
    ev.add_argument("--temperature", type=float, default=1.0, help="image sampling temperature")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--heldout-tokens", type=Path, metavar="DIR",
                    help="pre-tokenised data (`unitoken data pretokenize`): also report the loss per task on its "
                         "test split")
    ev.add_argument("--heldout-limit", type=int, default=500, help="held-out records per task (default 500)")
    gt = sub.add_parser("gate", help="two-track promotion gate against the champion",
                        epilog="example:\n  " + EXAMPLES["gate"], formatter_class=fmt)
    gt.add_argument("--candidate", required=True, type=Path, help="evaluation dir of the candidate")
    gt.add_argument("--champion", type=Path, help="evaluation dir, or a model dir (evaluated like the candidate)")
    gt.add_argument("--policy", type=Path, help="YAML: floors, margins, primary, min_improvement, bootstrap")
    gt.add_argument("--out", required=True, type=Path, help="decision JSON")

    reg = sub.add_parser("registry", help="register, promote, roll back models (MLflow registry)",
                         epilog="example:\n  " + EXAMPLES["registry"], formatter_class=fmt)
    rsub = reg.add_subparsers(dest="registry_command", required=True)
    rr = rsub.add_parser("register", help="register a gated model with its passport (alias challenger)")
    rr.add_argument("--model", required=True, type=Path)
    rr.add_argument("--eval", required=True, type=Path)
    rr.add_argument("--gate", required=True, type=Path)
    rr.add_argument("--name", required=True)
    rr.add_argument("--force", action="store_true", help="register although the gate failed (needs --reason)")
    rr.add_argument("--reason")
    rp = rsub.add_parser("promote", help="compare-and-swap an alias onto a version")
    rp.add_argument("name")
    rp.add_argument("--version", required=True)
    rp.add_argument("--alias", default="champion")
    rp.add_argument("--expect-current", help="fail unless the alias is held by this version ('none' if unset)")
    rp.add_argument("--reason", default="")
    rb = rsub.add_parser("rollback", help="move an alias back to its previous holder")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--reason", default="rollback")
    rh = rsub.add_parser("history", help="timeline of an alias")
    rh.add_argument("name")
    rh.add_argument("--alias", default="champion")
    lin = sub.add_parser("lineage", help="data-to-model lineage tree, every digest re-verified",
                         epilog="example:\n  " + EXAMPLES["lineage"], formatter_class=fmt)
    lin.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    lin.add_argument("--json", action="store_true")

    gen = sub.add_parser("generate", help="text-to-image", epilog="example:\n  " + EXAMPLES["generate"],
                         formatter_class=fmt)
    gen.add_argument("--model", required=True, help="model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, type=Path, help="PNG to write")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1.0 = off (default: the model's "
                     "recipe's: 5.5 for unitoken-7b*, 3.0 for small and tiny)")
    gen.add_argument("--top-k", type=int, help="sample among the k best image tokens, 0 = all (default: the model's "
                     "recipe's: 4000 for unitoken-7b*, 0 for small and tiny)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda")

    chat = sub.add_parser("chat", help="answer a question about images", epilog="example:\n  " + EXAMPLES["chat"],
                          formatter_class=fmt)
    chat.add_argument("--model", required=True, help="model directory")
    chat.add_argument("--image", type=Path, action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--prompt", required=True)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper's setting)")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--device", default="auto")
    from unitoken.pipeline.command import add_parser as add_pipeline_parser

    add_pipeline_parser(sub)
    return p


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _params_table(title: str, counts: dict[str, int]) -> Table:
    table = Table(title=title)
    table.add_column("module")
    table.add_column("parameters", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}")
    return table


# --------------------------------------------------------------------------- commands


def cmd_model_init(args) -> int:
    from unitoken.model.io import detect_format, init_model, save_model
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
    pretrained = list(args.pretrained)
    if args.tokenizer:
        if detect_format(args.tokenizer) != "vqgan":
            raise ValueError(f"--tokenizer {args.tokenizer}: expected a VQ-GAN directory (vqgan.yaml + vqgan.ckpt)")
        pretrained.append(args.tokenizer)
    with console.status(f"building {recipe.name} model"):
        model, tokenizer = init_model(recipe.model, pretrained, seed=args.seed)
        save_model(model, tokenizer, args.out, recipe=recipe.name)
    console.print(_params_table(f"{recipe.name} -> {args.out}", model.num_parameters()))
    return 0


def cmd_model_summary(args) -> int:
    import torch

    from unitoken.model.tokens import build_tokenizer
    from unitoken.model.unitoken import UniToken
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
    cfg = recipe.model
    tokenizer = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = UniToken(cfg, tokenizer.get_vocab())
    counts = model.num_parameters()
    if args.json:
        print(json.dumps({"recipe": recipe.name, "parameters": counts}))
    else:
        console.print(_params_table(f"{recipe.name} ({recipe.description})", counts))
    return 0


def cmd_generate(args) -> int:
    from rich.progress import Progress

    from unitoken.model.generation import decode_image, generate_image_codes
    from unitoken.model.io import load_model, local_dir
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import sampling_defaults

    path = local_dir(args.model)
    model, tokenizer = load_model(path, device=_device(args.device))
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)
    sampling, source = sampling_defaults(path)
    cfg = sampling.cfg if args.cfg is None else args.cfg
    top_k = sampling.top_k if args.top_k is None else args.top_k
    if args.cfg is None or args.top_k is None:
        err_console.print(f"sampling: CFG {cfg}, image top-k {top_k} (from the {source})", highlight=False)
    start = time.perf_counter()
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("generating rows", total=model.config.vq.codes_per_side)
        codes = generate_image_codes(model, builder, args.prompt, cfg_scale=cfg, temperature=args.temperature,
                                     top_k=top_k, seed=args.seed,
                                     progress=lambda done, total: bar.update(task, completed=done))
    image = decode_image(model, codes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    console.print(f"wrote {args.out} ({image.width}x{image.height}, {codes.numel()} VQ ids, "
                  f"{time.perf_counter() - start:.1f}s)")
    return 0


def cmd_chat(args) -> int:
    from PIL import Image

    from unitoken.model.generation import generate_text
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder

    images = []
    for path in args.image:
        if not path.is_file():
            raise FileNotFoundError(f"--image {path}: no such file")
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    model, tokenizer = load_model(args.model, device=_device(args.device))
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)
    answer = generate_text(model, builder, args.prompt, images, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed)
    print(answer)
    return 0


def _progress(description: str):
    """A rich progress bar usable as a ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err_console, transient=True)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def cmd_data_synth(args) -> int:
    from unitoken.data.synth import synthesize

    bar, update = _progress("rendering scenes")
    with bar:
        counts = synthesize(args.out, args.n, size=args.size, seed=args.seed, progress=update, workers=args.workers)
    table = Table(title=f"synthetic shapes -> {args.out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key, f"{value:,}")
    console.print(table)
    return 0


def cmd_data_validate(args) -> int:
    from unitoken.data.validate import validate_manifest

    if not 0 <= args.max_reject_fraction <= 1:
        raise ValueError(f"--max-reject-fraction {args.max_reject_fraction}: use a fraction in [0, 1]")
    bar, update = _progress("checking rows")
    with bar:
        res = validate_manifest(args.manifest, args.out, data_root=args.data_root, progress=update)
    table = Table(title=f"validation of {args.manifest}")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, n in sorted(res.reasons.items()):
        table.add_row(reason, str(n))
    table.add_row("[bold]clean", f"[bold]{res.clean_rows}")
    table.add_row("[bold]rejected", f"[bold]{res.rejected_rows} ({100 * res.reject_fraction:.2f} %)")
    console.print(table)
    console.print(f"report {res.report_path} sha256 {res.report_sha256}")
    if res.reject_fraction > args.max_reject_fraction:
        err_console.print(f"rejected fraction {res.reject_fraction:.4f} > --max-reject-fraction "
                          f"{args.max_reject_fraction}: see {args.out / 'rejected.jsonl'}")
        return 3
    return 0


def cmd_data_pretokenize(args) -> int:
    from unitoken.data.pretokenize import pretokenize
    from unitoken.model.io import load_model

    model, _ = load_model(args.model)
    bar, update = _progress("pre-tokenising shards")
    with bar:
        summary = pretokenize(args.manifest, model, args.out, shard_size=args.shard_size,
                              batch_size=args.batch_size, device=args.device, progress=update)
    table = Table(title=f"pre-tokenised -> {args.out}")
    for key in summary:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(*[str(v) for v in summary.values()])
    console.print(table)
    return 0


def cmd_tokenizer_train(args) -> int:
    from unitoken.data.tokenizer_train import train_tokenizer
    from unitoken.recipes import get_recipe

    cfg = get_recipe(args.recipe, args.overrides).model.vq
    bar, update = _progress("training VQ-GAN")
    with bar:
        report = train_tokenizer(args.data, args.out, cfg, steps=args.steps, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, device=args.device,
                                 progress=lambda done, total, loss: update(done, total))
    table = Table(title=f"VQ tokenizer -> {args.out}")
    for key in ("steps", "train_seconds", "psnr_db", "codebook_used", "codebook_usage", "recognition_rate"):
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(*[str(report.get(k)) for k in ("steps", "train_seconds", "psnr_db", "codebook_used",
                                                 "codebook_usage", "recognition_rate")])
    console.print(table)
    return 0


def cmd_train(args) -> int:
    from unitoken.recipes import get_recipe

    recipe = get_recipe(args.recipe, args.overrides)
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
        result = train_stage(args.stage, recipe, args.data, args.out, args.init, resume=args.resume,
                             max_steps=args.max_steps, track=not args.no_track)
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


def cmd_eval(args) -> int:
    from unitoken.eval.runner import evaluate

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1")
    if args.heldout_limit < 1:
        raise UsageError(f"--heldout-limit {args.heldout_limit}: must be >= 1")
    report = evaluate(args.model, [s.strip() for s in args.suite.split(",") if s.strip()], args.out, data=args.data,
                      limit=args.limit, mc_file=args.mc_file, circular=args.circular,
                      geneval_metadata=args.geneval_metadata, detector=args.detector, cfg_scale=args.cfg,
                      top_k=args.top_k, temperature=args.temperature, seed=args.seed, device=_device(args.device),
                      progress_factory=lambda name: _progress(name), heldout_tokens=args.heldout_tokens,
                      heldout_limit=args.heldout_limit)
    table = Table(title=f"evaluation -> {args.out}")
    for col in ("suite", "task", "score", "chance*", "items", "categories"):
        table.add_column(col)
    for name, s in report["suites"].items():
        table.add_row(name, s["task"], f"{s['overall']:.4f}", f"{s['chance']:.3f}", str(s["n"]),
                      ", ".join(f"{k} {v:.2f}" for k, v in s["categories"].items()))
    console.print(table)
    console.print("* chance: uniform guessing within each question's answer space (understanding); "
                  "random VQ codes through the same decoder and detector (generation)")
    for task, v in (report.get("heldout") or {}).items():
        if isinstance(v, dict):
            console.print(f"held-out loss, {task}: {v['mean']:.4f} (mean NLL per supervised token, {v['n']} test "
                          "records)")
    return 0


def cmd_gate(args) -> int:
    from unitoken.eval.gate import GatePolicy, decide, write_decision
    from unitoken.model.io import is_handoff_dir

    policy = GatePolicy.from_yaml(args.policy)
    champion = args.champion
    if champion is not None and is_handoff_dir(champion):
        from unitoken.eval.runner import evaluate_like

        champion = args.out.parent / (args.out.stem + "-champion-eval")
        evaluate_like(args.candidate, args.champion, champion, device=_device("auto"))
    decision = decide(args.candidate, champion, policy)
    write_decision(decision, args.out)
    table = Table(title=f"gate: {'PASS' if decision['passed'] else 'FAIL'}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("reason")
    for c in decision["checks"]:
        table.add_row(c["check"] + (f" ({c['task']})" if "task" in c else ""),
                      "[green]pass" if c["passed"] else "[red]fail", c["reason"])
    console.print(table)
    return 0 if decision["passed"] else 3


def cmd_registry(args) -> int:
    from unitoken import registry

    if args.registry_command == "register":
        if args.force and not args.reason:
            raise UsageError("--force needs --reason TEXT (it is recorded in the passport)")
        info = registry.register(args.model, args.eval, args.gate, args.name, force=args.force, reason=args.reason)
        console.print(registry.registration_note(info))
        print(json.dumps(info))
        return 0
    if args.registry_command == "promote":
        entry = registry.promote(args.name, args.version, args.alias, args.expect_current, args.reason)
        console.print(entry.get("note") or f"{args.name}@{args.alias}: {entry['from']} -> {entry['to']}")
        return 0
    if args.registry_command == "rollback":
        entry = registry.rollback(args.name, args.alias, args.reason)
        console.print(f"{args.name}@{args.alias}: rolled back {entry['from']} -> {entry['to']}")
        return 0
    moves = registry.history(args.name, args.alias)
    table = Table(title=f"{args.name}@{args.alias}")
    for col in ("#", "when", "action", "from", "to", "who", "reason"):
        table.add_column(col)
    for m in moves:
        table.add_row(str(m["seq"]), m["when"], m["action"], str(m["from"]), str(m["to"]), m["who"], m["reason"])
    console.print(table)
    return 0


def cmd_lineage(args) -> int:
    from rich.tree import Tree

    from unitoken.registry import lineage

    info = lineage(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["ok"] else 1
    broken = " ".join(info["problems"])
    p = {e["kind"]: e for e in info["passport"] if e["kind"] != "stage"}
    stages = [e for e in info["passport"] if e["kind"] == "stage"]

    def style(text: str, keys: tuple[str, ...]) -> str:
        return f"[red]{text}[/red]" if any(k in broken for k in keys) else text

    tree = Tree(style(f"[bold]{info['name']} v{info['version']}[/bold] aliases: {', '.join(info['aliases']) or '-'}",
                      ("passport",)))
    node = tree.add(f"data manifest {str(p['data']['manifest_sha256'])[:12]} -> validation report "
                    f"{str(p['data']['validation_report_sha256'])[:12]} -> shards {str(p['data']['pretokenized_sha256'])[:12]}")
    for st in stages:
        node = node.add(style(f"stage {st['stage']}: run {st['mlflow_run_id']} hand-off {st['handoff_sha256'][:12]} "
                              f"({'?' if st['compute_hours'] is None else format(st['compute_hours'], '.4f')} h)", (f"stage {st['stage']}", "stored model")))
    node = node.add(style(f"evaluation report {p['eval']['report_sha256'][:12]}", ("evaluation",)))
    node = node.add(style(f"gate {'passed' if p['gate']['passed'] else 'FORCED: ' + str(p['gate']['forced_reason'])} "
                          f"({p['gate']['decision_sha256'][:12]})", ("gate",)))
    node.add(f"version {info['version']} (unitoken {p['build']['package_version']}, commit {p['build']['git_commit'][:10]})")
    console.print(tree)
    for problem in info["problems"]:
        console.print(f"[red]broken link:[/red] {problem}")
    return 0 if info["ok"] else 1


COMMANDS = {
    ("registry", "register"): cmd_registry,
    ("registry", "promote"): cmd_registry,
    ("registry", "rollback"): cmd_registry,
    ("registry", "history"): cmd_registry,
    ("lineage", None): cmd_lineage,
    ("eval", None): cmd_eval,
    ("gate", None): cmd_gate,
    ("train", None): cmd_train,
    ("tokenizer", "train"): cmd_tokenizer_train,
    ("data", "pretokenize"): cmd_data_pretokenize,
    ("data", "synth"): cmd_data_synth,
    ("data", "validate"): cmd_data_validate,
    ("model", "init"): cmd_model_init,
    ("model", "summary"): cmd_model_summary,
    ("generate", None): cmd_generate,
    ("chat", None): cmd_chat,
    **{("pipeline", name): lambda args: _pipeline(args) for name in ("run", "compile", "rehearse", "submit", "schedule", "cache")},
}


def _pipeline(args) -> int:
    from unitoken.pipeline.command import cmd_pipeline

    return cmd_pipeline(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    key = (args.command, getattr(args, f"{args.command}_command", None))
    try:
        return COMMANDS[key](args)
    except UsageError as err:
        err_console.print(f"[red]usage error:[/red] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary: one clear line, exit 1
        if args.debug:
            raise
        err_console.print(f"[red]error:[/red] {type(err).__name__}: {err}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
