"""``unitoken data synth|validate|pretokenize|mixture``: the data a model trains on."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from unitoken.cli.common import Group, console, count_table, err_console, progress


def register(sub) -> None:
    data = Group(sub, "data", "synthesise, validate and pre-tokenise data")
    synth = data.command("synth", "synthetic shapes data set (manifest + images + annotations)",
                         ["unitoken data synth --out d --n 500"], cmd_data_synth)
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--n", required=True, type=int, help="number of scenes")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, help="rendering threads (default: CPU count, at most 8); "
                       "the files do not depend on it")
    synth.add_argument("--views", action="store_true",
                       help="training scenes also become a generation record for every other category's prompt "
                            "that is true of them (up to four phrasings per image)")
    synth.add_argument("--position-drill", action="store_true",
                       help="training scenes also ask each uniquely described object's quadrant, plainly and as "
                            "multiple choice")
    val = data.command("validate", "great-expectations validation with quarantine",
                       ["unitoken data validate d/manifest.jsonl --out v",
                        "unitoken data validate d/manifest.jsonl --out v --max-reject-fraction 0.05"],
                       cmd_data_validate, notes="exit 3: more rows rejected than --max-reject-fraction allows")
    val.add_argument("manifest", type=Path)
    val.add_argument("--out", required=True, type=Path)
    val.add_argument("--max-reject-fraction", type=float, default=0.01)
    val.add_argument("--data-root", type=Path, help="images must stay under this directory (default: the manifest's)")
    val.add_argument("--chunk-rows", type=int, help="rows per great-expectations batch: memory grows with it, "
                     "the result does not depend on it (default 20,000)")
    pre = data.command("pretokenize", "VQ-encode images into resumable shards",
                       ["unitoken data pretokenize v/clean.jsonl --model m --out p"], cmd_data_pretokenize)
    pre.add_argument("manifest", type=Path, help="a validated manifest (clean.jsonl)")
    pre.add_argument("--model", required=True, help="model directory whose VQ-GAN and vision config to use")
    pre.add_argument("--out", required=True, type=Path)
    pre.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    pre.add_argument("--batch-size", type=int, default=64, help="images per VQ forward pass")
    pre.add_argument("--device", default="auto")
    pre.add_argument("--summary-json", type=Path, help="also write the summary (counts, seconds, images/s) here")
    mix = data.command("mixture", "read a UniToken reference data config (META: path, ratio) as a stage's mixture",
                       ["unitoken data mixture import configs/data/stage2.yaml --stage 2"], cmd_data_mixture,
                       notes="ratio keeps the reference's meaning (the share of a file's records per epoch): "
                             "weight = ratio x records. Train on it with `unitoken train --mixture CONFIG.yaml`.")
    mix.add_argument("action", choices=("import",))
    mix.add_argument("config", type=Path, help="a reference data config (unitoken/configs/data/*.yaml)")
    mix.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="the stage the override is for")


# --------------------------------------------------------------------------- handlers


def mixture_overrides(config: Path, stage: int) -> tuple[list[str], dict[str, float], list]:
    """(``--set`` overrides that make ``config`` stage ``stage``'s mixture, the weights, the entries)."""
    from unitoken.data.mixture import read_reference_config, reference_weights

    entries = read_reference_config(config)
    weights = reference_weights(entries)
    return ([f"train.stage{stage}.sources=[]", f"train.stage{stage}.source_weights={json.dumps(weights)}"],
            weights, entries)


def cmd_data_mixture(args) -> int:
    from unitoken.data.mixture import manifest_sources

    sets, weights, entries = mixture_overrides(args.config, args.stage)
    total = sum(weights.values())
    table = Table(title=f"mixture of {args.config} (stage {args.stage})")
    for col in ("entry", "file", "source", "records", "ratio", "weight", "share"):
        table.add_column(col, justify="right" if col in ("records", "ratio", "weight", "share") else "left")
    for e in entries:
        for src, n in manifest_sources(e.path).items():
            share = weights[src] / total if total else 0.0
            table.add_row(str(e.index), str(e.path), src, f"{n:,}", f"{e.ratio:g}", f"{weights[src]:,.1f}", f"{share:.1%}")
    console.print(table)
    console.print("as overrides: " + " ".join(f"--set '{s}'" for s in sets), soft_wrap=True)
    return 0


def cmd_data_synth(args) -> int:
    from unitoken.data.synth import synthesize

    bar, update = progress("rendering scenes")
    with bar:
        counts = synthesize(args.out, args.n, size=args.size, seed=args.seed, progress=update, workers=args.workers,
                            views=args.views, position_drill=args.position_drill)
    console.print(count_table(f"synthetic shapes -> {args.out}", "what", counts))
    return 0


def cmd_data_validate(args) -> int:
    from unitoken.data.validate import validate_manifest

    if not 0 <= args.max_reject_fraction <= 1:
        raise ValueError(f"--max-reject-fraction {args.max_reject_fraction}: use a fraction in [0, 1]")
    bar, update = progress("checking rows")
    with bar:
        res = validate_manifest(args.manifest, args.out, data_root=args.data_root, progress=update,
                                **({"chunk_rows": args.chunk_rows} if args.chunk_rows is not None else {}))
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
    from unitoken.registry import model_dir

    model, _ = load_model(model_dir(args.model))
    bar, update = progress("pre-tokenising shards")
    with bar:
        summary = pretokenize(args.manifest, model, args.out, shard_size=args.shard_size,
                              batch_size=args.batch_size, device=args.device, progress=update)
    table = Table(title=f"pre-tokenised -> {args.out}")
    for key in summary:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_row(*[str(v) for v in summary.values()])
    console.print(table)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0
