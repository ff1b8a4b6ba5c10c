"""``unitoken registry register|promote|rollback|history`` and ``unitoken lineage``: the MLflow
model registry, the passport of every version, and the data-to-model lineage."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from unitoken.cli.common import Group, UsageError, command, console
from unitoken.tracking.store import parent_run_from_env


def register(sub) -> None:
    reg = Group(sub, "registry", "register, promote, roll back models (MLflow registry)")
    rr = reg.command("register", "register a gated model with its passport (alias challenger)",
                     ["unitoken registry register --model runs/stage3/handoff --eval e --gate decision.json "
                      "--name shapes",
                      "unitoken registry register --model m --eval e --gate decision.json --name shapes --force "
                      "--reason 'hotfix, gate waived by the on-call'"], cmd_registry)
    rr.add_argument("--model", required=True, type=Path)
    rr.add_argument("--eval", required=True, type=Path)
    rr.add_argument("--gate", required=True, type=Path)
    rr.add_argument("--name", required=True)
    rr.add_argument("--force", action="store_true", help="register although the gate failed (needs --reason)")
    rr.add_argument("--reason")
    rp = reg.command("promote", "compare-and-swap an alias onto a version",
                     ["unitoken registry promote shapes --version 3 --expect-current 2 --reason 'gate passed'"],
                     cmd_registry)
    rp.add_argument("name")
    rp.add_argument("--version", required=True)
    rp.add_argument("--alias", default="champion")
    rp.add_argument("--expect-current", help="fail unless the alias is held by this version ('none' if unset)")
    rp.add_argument("--reason", default="")
    rb = reg.command("rollback", "move an alias back to its previous holder",
                     ["unitoken registry rollback shapes --reason 'VQA regression in production'"], cmd_registry)
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--reason", default="rollback")
    rh = reg.command("history", "timeline of an alias", ["unitoken registry history shapes --alias champion"],
                     cmd_registry)
    rh.add_argument("name")
    rh.add_argument("--alias", default="champion")
    lin = command(sub, "lineage", "data-to-model lineage tree, every digest re-verified; or what changed "
                  "between two versions",
                  ["unitoken lineage models:/shapes@champion", "unitoken lineage models:/shapes/3 --json",
                   "unitoken lineage --diff models:/shapes/2 models:/shapes@champion"],
                  cmd_lineage, notes="exit 1: a broken link (each one is named)")
    lin.add_argument("model", nargs="?", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    lin.add_argument("--diff", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                     help="per stage the mixture and recipe fields that differ, the code commit, the scores")
    lin.add_argument("--json", action="store_true")


# --------------------------------------------------------------------------- handlers


def cmd_registry(args) -> int:
    from unitoken import registry

    if args.registry_command == "register":
        if args.force and not args.reason:
            raise UsageError("--force needs --reason TEXT (it is recorded in the passport)")
        info = registry.register(args.model, args.eval, args.gate, args.name, force=args.force, reason=args.reason,
                                 parent_run_id=parent_run_from_env())
        console.print(registry.registration_note(info))
        print(json.dumps(info))
        return 0
    if args.registry_command in ("promote", "rollback"):
        if args.registry_command == "promote":
            entry = registry.promote(args.name, args.version, args.alias, args.expect_current, args.reason)
        else:
            entry = registry.rollback(args.name, args.alias, args.reason)
        verb = "rolled back" if args.registry_command == "rollback" else "moved"
        console.print(entry.get("note") or f"{args.name}@{args.alias}: {verb} {_v(entry['from'])} -> {entry['to']} "
                      f"(compare-and-swap against {_v(entry['from'])}: {entry['checked']})", soft_wrap=True)
        return 0
    moves = registry.history(args.name, args.alias)
    table = Table(title=f"{args.name}@{args.alias}")
    for col in ("#", "when", "action", "from", "to", "who", "reason"):
        table.add_column(col, overflow="fold")  # wrapped, never cut, at any terminal width
    for m in moves:
        table.add_row(str(m["seq"]), m["when"], m["action"], _v(m["from"]), _v(m["to"]), m["who"], m["reason"])
    console.print(table)
    return 0


def _v(version) -> str:
    """A version for people: "-" where the alias was unset."""
    return "-" if version is None else str(version)


def cmd_lineage(args) -> int:
    from rich.tree import Tree

    from unitoken.registry import lineage

    if args.diff:
        return _print_diff(args.diff, args.json)
    if not args.model:
        raise UsageError("lineage needs MODEL (or --diff MODEL_A MODEL_B)")
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


def _print_diff(uris: list[str], as_json: bool) -> int:
    from unitoken.registry.diff import diff_versions

    d = diff_versions(*uris)
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    a, b = d["a"], d["b"]
    console.print(f"[bold]A[/bold] {a['name']} v{a['version']} (commit {str(a['commit'])[:10]})   "
                  f"[bold]B[/bold] {b['name']} v{b['version']} (commit {str(b['commit'])[:10]})"
                  + ("" if d["commit_changed"] else "   same commit"))
    for n, st in d["stages"].items():
        table = Table(title=f"stage {n}: mixture (A -> B)", title_justify="left")
        table.add_column("source", no_wrap=True)
        for col in ("weight", "records", "samples"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("")
        for src, ab in st["mixture"].items():
            va, vb = ab["a"] or {}, ab["b"] or {}
            table.add_row(src, *(f"{va.get(f, '-')} -> {vb.get(f, '-')}" for f in ("weight", "records", "samples")),
                          "added" if not va else "removed" if not vb else "")
        if st["mixture"]:
            console.print(table)
        else:
            console.print(f"stage {n}: the same mixture ({', '.join(st['sources']['a']) or 'not recorded'})")
        for k, ab in st["recipe"].items():
            console.print(f"  {k}: {ab['a']} -> {ab['b']}")
    for k, ab in d["recipe"].items():
        console.print(f"recipe {k}: {ab['a']} -> {ab['b']}")
    scores = Table(title="evaluation (95 % interval)", title_justify="left")
    for col in ("suite", "A", "B"):
        scores.add_column(col)
    for suite, ab in d["scores"].items():
        scores.add_row(suite, *(f"{v['overall']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] n={v['n']}"
                                if v else "-" for v in (ab["a"], ab["b"])))
    console.print(scores)
    return 0
