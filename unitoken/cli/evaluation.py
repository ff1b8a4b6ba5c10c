"""``unitoken eval`` and ``unitoken gate``: score a model, and decide whether it beats the champion."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from unitoken.cli.common import UsageError, command, console, device, progress


def register(sub) -> None:
    ev = command(sub, "eval", "evaluate understanding and generation suites",
                 ["unitoken eval --model runs/stage3/handoff --suite shapes-vqa,shapes-geneval --data d --out e",
                  "unitoken eval --model m --suite mc --mc-file mmbench.jsonl --circular --out e_mc"], cmd_eval)
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
    gt = command(sub, "gate", "two-track promotion gate against the champion",
                 ["unitoken gate --candidate e --champion e_prev --policy gate.yaml --out decision.json",
                  "unitoken gate --candidate e --recipe demo --out decision.json   # a first model: the recipe's floors"],
                 cmd_gate,
                 notes="exit 3: the candidate failed the gate (decision.json says which check)")
    gt.add_argument("--candidate", required=True, type=Path, help="evaluation dir of the candidate")
    gt.add_argument("--champion", type=Path, help="evaluation dir, or a model dir (evaluated like the candidate)")
    gt.add_argument("--policy", type=Path, help="YAML: floors, margins, primary, min_improvement, bootstrap")
    gt.add_argument("--recipe", help="without --policy: the default policy with this recipe's floors, as the "
                                     "pipeline's gate uses (default: no floors)")
    gt.add_argument("--out", required=True, type=Path, help="decision JSON")


# --------------------------------------------------------------------------- handlers


def cmd_eval(args) -> int:
    from unitoken.eval.runner import evaluate
    from unitoken.registry import model_dir

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: must be >= 1")
    if args.heldout_limit < 1:
        raise UsageError(f"--heldout-limit {args.heldout_limit}: must be >= 1")
    report = evaluate(model_dir(args.model), [s.strip() for s in args.suite.split(",") if s.strip()], args.out, data=args.data,
                      limit=args.limit, mc_file=args.mc_file, circular=args.circular,
                      geneval_metadata=args.geneval_metadata, detector=args.detector, cfg_scale=args.cfg,
                      top_k=args.top_k, temperature=args.temperature, seed=args.seed, device=device(args.device),
                      progress_factory=progress, heldout_tokens=args.heldout_tokens,
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

    if args.policy is not None and args.recipe:
        raise UsageError("--policy and --recipe both set the gate's floors; pass one")
    if args.recipe:
        from unitoken.recipes import get_recipe

        policy = GatePolicy.from_recipe(get_recipe(args.recipe).gate)
    else:
        policy = GatePolicy.from_yaml(args.policy)
    champion = args.champion
    if champion is not None and is_handoff_dir(champion):
        from unitoken.eval.runner import evaluate_like

        champion = args.out.parent / (args.out.stem + "-champion-eval")
        evaluate_like(args.candidate, args.champion, champion, device=device("auto"))
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
