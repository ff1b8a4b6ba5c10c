"""``unitoken pipeline run|compile|rehearse|submit|schedule|cache``: the CLI side of ``pipelines/``.

``run --local`` is the embedded default (``make demo``): synthetic data, the whole pipeline
through ``kfp.local`` (one subprocess per step, the same components as on a cluster), a
sqlite-backed MLflow under ``unitoken_home()`` (the checkout's ``.unitoken/``), then a summary read back from MLflow.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unitoken.cli.common import Group, UsageError

console = Console()
DEFAULT_OVERLAY = Path("k8s/overlays/prod")
# Laptop-sized defaults of `run --local` (the pipeline's own defaults are sized for a GPU);
# any of them can be overridden with --param. The VQ-GAN trains on 2 CPU cores in ~1 min
# (150 steps of 8 images: 17 dB, against 19.5 dB for 300 x 16 in ~4 min; shapes-VQA after the
# demo's stages was the same with either). eval_limit 0 evaluates the whole test split: 500
# scenes give ~300 questions, so a shapes-VQA score has a 95 % interval of about +-0.05.
LOCAL_DEFAULTS = {"tokenizer_steps": 150, "tokenizer_batch_size": 8, "tokenizer_lr": 2e-3, "eval_limit": 0}


def register(sub) -> None:
    pl = Group(sub, "pipeline", "the Kubeflow pipeline: run locally, compile, submit, schedule")

    def common(p, params=True):
        p.add_argument("--stages", default="1,2,3", help="stages this pipeline runs: 1,2,3 | 2,3 | 3 (from --base-model)")
        p.add_argument("--cluster", type=Path, help="cluster YAML: image, per-step GPUs/placement, PVC, secrets")
        if params:
            p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                           help="pipeline argument (data_uri, recipe, model_name, mixture_ratio, gate_policy, ...)")
            p.add_argument("--no-cache", action="store_true",
                           help="recompute every step (use_cache=false); outputs are still stored for later runs")

    run = pl.command("run", "run the pipeline (--local: here, through kfp.local)",
                     ["unitoken pipeline run --local --recipe tiny",
                      "unitoken pipeline run --local --stages 3 --base-model models:/unitoken@champion --data d "
                      "--promote"], cmd_pipeline, notes="exit 3: the pipeline ran and its gate said no")
    run.add_argument("--local", action="store_true", required=True, help="run here (kfp.local); a cluster: `submit`")
    run.add_argument("--recipe", default="tiny")
    run.add_argument("--data", help="data directory, manifest or s3:// URI (default: synthesise --scenes scenes)")
    run.add_argument("--scenes", type=int, default=300, help="synthetic scenes when --data is not given")
    run.add_argument("--name", default="unitoken", help="registered model name")
    run.add_argument("--base-model", default="", help="models:/NAME@ALIAS to start from (stage-scoped retraining)")
    run.add_argument("--promote", action="store_true", help="move the champion alias to the model if the gate passes")
    run.add_argument("--root", type=Path, help="artifacts, checkpoints and logs (default: .unitoken/pipeline of "
                     "the checkout, ~/.unitoken/pipeline elsewhere, or $UNITOKEN_HOME/pipeline)")
    run.add_argument("--pretokenize-workers", type=int, default=1,
                     help="pre-tokenisation workers (a ParallelFor; kfp.local runs at most 2 at a time)")
    common(run)
    comp = pl.command("compile", "write the pipeline YAML for a KFP server",
                      ["unitoken pipeline compile --out p.yaml --cluster examples/cluster.yaml"], cmd_pipeline)
    comp.add_argument("--out", required=True, type=Path)
    common(comp, params=False)
    reh = pl.command("rehearse", "render every pod and object one cluster run creates and check them offline",
                     ["unitoken pipeline rehearse --cluster examples/cluster.yaml --k8s k8s/overlays/prod"],
                     cmd_pipeline, notes="rules: schema, restricted (Pod Security), fit (node pools), launcher, rbac, "
                                         "run-key, mlflow-host; exit 1 names each failure")
    reh.add_argument("--k8s", type=Path, default=DEFAULT_OVERLAY if DEFAULT_OVERLAY.is_dir() else None,
                     help=f"the kustomize overlay the cluster runs (default {DEFAULT_OVERLAY} when present)")
    reh.add_argument("--package", type=Path, help="rehearse this compiled pipeline YAML instead of compiling one")
    common(reh, params=False)
    cache = pl.command("cache", "list the step cache's entries; --prune-gib: evict the least recently used",
                       ["unitoken pipeline cache", "unitoken pipeline cache --prune-gib 50"], cmd_pipeline)
    cache.add_argument("--root", type=Path,
                       help="the cache directory (a cluster: <checkpoint volume>/cache, e.g. from a pod mounting it)")
    cache.add_argument("--prune-gib", type=float, metavar="GIB",
                       help="delete entries, least recently used first, until the rest total at most GIB")
    for name, text, example in (
            ("submit", "start one run on a KFP server",
             "unitoken pipeline submit --host http://kfp:8888 --cluster examples/cluster.yaml --param data_uri=s3://b/d"),
            ("schedule", "a recurring run on a KFP server (scheduled retraining)",
             "unitoken pipeline schedule --host http://kfp:8888 --cron '0 0 3 * * 0' --stages 3 "
             "--param base_model=models:/unitoken@champion --param data_uri=s3://b/new")):
        p = pl.command(name, text, [example], cmd_pipeline)
        p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
        p.add_argument("--experiment", default="unitoken")
        common(p)
        p.add_argument("--service-account", help="the run's Kubernetes service account (default: the cluster "
                       "config's service_account, k8s/base/rbac.yaml; KFP's profile default is default-editor)")
        if name == "submit":
            p.add_argument("--run-name")
            p.add_argument("--plan-data", type=Path, help="pre-tokenised data like the run's (a sample will do): "
                           "print the run's plan (unitoken plan) before submitting")
            p.add_argument("--yes", action="store_true", help="submit a run whose plan is above the cluster "
                           "config's confirm_gpu_hours")
        else:
            p.add_argument("--catch-up", action="store_true",
                           help="run once per missed interval after a pause (default: only the latest)")
            p.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * 0' = Sundays 03:00")
            p.add_argument("--job-name", default="unitoken-retraining")
            p.add_argument("--max-concurrency", type=int, default=1)


def _stages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--stages {text!r}: a comma list such as 1,2,3 or 3") from None


def local_root() -> Path:
    """The local pipeline's root: artifacts, checkpoints, logs (``unitoken_home()/pipeline``)."""
    from unitoken.files import unitoken_home

    return unitoken_home() / "pipeline"


def cmd_pipeline(args) -> int:
    from pipelines import launch
    from unitoken.pipeline.cluster import load_cluster

    if args.pipeline_command == "cache":
        return _cache(args.root or local_root() / "checkpoints" / "cache", args.prune_gib)
    stages = _stages(args.stages)
    if args.pipeline_command == "run":
        return _run_local(args, stages)
    cluster = load_cluster(args.cluster)
    if args.pipeline_command == "rehearse":
        import tempfile

        from unitoken.pipeline.rehearse import print_findings, rehearse

        with tempfile.TemporaryDirectory() as tmp:
            package = args.package or launch.compile_pipeline(Path(tmp) / "pipeline.yaml", stages, cluster)
            found, warnings = rehearse(cluster, args.k8s, package, stages)
        return print_findings(found, warnings, console)
    if args.pipeline_command == "compile":
        console.print(f"compiled {launch.compile_pipeline(args.out, stages, cluster)} (stages {args.stages})")
        return 0
    params = launch.parse_params(args.param)
    if args.no_cache:
        params["use_cache"] = False
    if "data_uri" not in params:
        raise ValueError("--param data_uri=URI is required (s3://bucket/prefix or a path on a shared volume)")
    package = local_root() / f"{args.pipeline_command}-{int(time.time())}.yaml"
    launch.compile_pipeline(package, stages, cluster)
    account = args.service_account or cluster.service_account
    if args.pipeline_command == "submit":
        _confirm_plan(args, params, cluster, stages)
        run_id = launch.submit(args.host, package, params, args.experiment, args.run_name, account)
        console.print(f"submitted run {run_id} to {args.host} (experiment {args.experiment}, "
                      f"service account {account})\n{launch.run_link(args.host, run_id)}")
        return 0
    job = launch.schedule(args.host, package, params, args.cron, args.job_name, args.experiment, args.max_concurrency,
                          account, args.catch_up)
    console.print(f"recurring run {job} ({args.cron}, service account {account}, "
                  f"{'catching up' if args.catch_up else 'no catch-up'}) on {args.host}")
    return 0


def _confirm_plan(args, params: dict, cluster, stages: tuple[int, ...]) -> None:
    """Print the run's plan (with --plan-data) and refuse, above the cluster config's
    ``confirm_gpu_hours``, without --yes.

    Raises:
        UsageError: a threshold is set, and the plan is above it (or unknown) and --yes is absent.
    """
    limit = cluster.confirm_gpu_hours
    hours = None
    if args.plan_data is not None:
        import json

        from unitoken.pipeline.plan import plan
        from unitoken.recipes import get_recipe

        recipe = get_recipe(params.get("recipe", "tiny"), json.loads(params.get("overrides_json", "[]")))
        doc = plan(recipe, args.plan_data, cluster, stages=stages)
        for st in doc["stages"]:
            console.print(f"stage {st['stage']}: {st['samples']:,} samples, {st['tokens']:,} tokens, "
                          f"{st['gpu_hours']:,.1f} GPU-hours on {st['gpus']} GPUs = {st['wall_hours']:,.1f} h"
                          + "".join(f"; {n}" for n in st["fits"] if n.startswith("NO")))
        hours = doc["gpu_hours"]
        console.print(f"plan: {hours:,.1f} GPU-hours at MFU {doc['mfu']:.1%} (unitoken plan)")
    if limit is None or args.yes:
        return
    if hours is None:
        raise UsageError(f"the cluster config asks to confirm runs above {limit:g} GPU-hours: pass --plan-data "
                         "(pre-tokenised data like the run's) to see the plan, then --yes")
    if hours > limit:
        raise UsageError(f"the plan is {hours:,.1f} GPU-hours, above the cluster config's confirm_gpu_hours "
                         f"{limit:g}: submit again with --yes to start it")


def _cache(root: Path, prune_gib: float | None) -> int:
    from unitoken.pipeline.cache import GIB, KEY_RE, MIB, StepCache

    if not Path(root).is_dir():
        raise ValueError(f"--root {root}: no such directory; fix: point it at the step cache "
                         "(<checkpoint root>/cache; locally .unitoken/pipeline/checkpoints/cache)")
    if prune_gib is not None and not 0 <= prune_gib < float("inf"):
        raise ValueError(f"--prune-gib {prune_gib}: expected a size in GiB of 0 or more")
    cache = StepCache(root, max_bytes=None)  # no limit of its own: only --prune-gib evicts
    evicted = cache.prune(int(prune_gib * GIB)) if prune_gib is not None else []
    table = Table(title=f"step cache {root}")
    for col in ("step", "key", "MiB", "last used", "computed by MLflow run"):
        table.add_column(col, justify="right" if col == "MiB" else "left")
    rows = cache.entries()
    for e in sorted(rows, key=lambda e: e["last_used"], reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["complete"] else "incomplete"
        table.add_row(e["step"], e["key"][:16], f"{e['bytes'] / MIB:.1f}", used, e["mlflow_run_id"] or "-")
    console.print(table)
    odd = [g for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".") for g in d.iterdir()
           if not g.name.startswith(".") and not KEY_RE.fullmatch(g.name)]
    if not rows and odd:  # folders, but no step folders of keys
        console.print(f"[yellow]no cache entries under {root}[/yellow]: is it the cache folder itself "
                      "(<checkpoint root>/cache, holding one folder per step)?")
    console.print(f"{len(rows)} entries, {sum(e['bytes'] for e in rows) / GIB:.3f} GiB"
                  + (f"; evicted {len(evicted)} ({sum(e['bytes'] for e in evicted) / GIB:.3f} GiB)"
                     if prune_gib is not None else ""))
    return 0


def _run_local(args, stages: tuple[int, ...]) -> int:
    from pipelines import launch
    from unitoken.tracking import default_tracking_uri

    root = Path(args.root or local_root())
    os.environ["MLFLOW_TRACKING_URI"] = default_tracking_uri()  # the steps' processes use the same store
    data = args.data
    if data is None:
        from unitoken.data.synth import synthesize

        data = str((root / "data").resolve())
        if not (Path(data) / "manifest.jsonl").is_file():
            with console.status(f"synthesising {args.scenes} scenes -> {data}"):
                synthesize(data, args.scenes)
    params = {"recipe": args.recipe, "model_name": args.name, "base_model": args.base_model,
              "promote": args.promote, **LOCAL_DEFAULTS, **launch.parse_params(args.param)}
    if args.no_cache:
        params["use_cache"] = False
    log_file = root / "pipeline.log"
    root.mkdir(parents=True, exist_ok=True)
    console.rule(f"[bold]UniToken pipeline (kfp.local), stages {args.stages}, recipe {args.recipe}")
    console.print(f"data {data}\nstep logs -> {log_file}")
    with _progress(root / "artifacts", Console(file=sys.stdout)), _kfp_logs_to(log_file):
        result = launch.run_local(data, root, params, stages, pretokenize_workers=args.pretokenize_workers)
    _print_summary(result, args.name)
    if result["state"] not in ("SUCCEEDED", "FINISHED"):
        console.print(f"[red]pipeline {result['state']}[/red]: {result.get('error') or ''} (see {log_file})")
        return 1
    return 0 if result["gate"] and result["gate"]["passed"] else 3


def score_table(scores: dict, heldout: dict) -> Table:
    """One row per evaluated stage and suite: the score, its 95 % interval, the chance level and
    the held-out loss of the suite's task (lower is better)."""
    from unitoken.eval.runner import SUITES

    table = Table(title="scores per stage; held-out loss of the suite's task")
    for col in ("after", "suite", "score", "95 % interval", "chance", "held-out loss"):
        table.add_column(col, justify="left" if col in ("after", "suite") else "right")
    order = {s: i for i, s in enumerate(SUITES)}  # understanding first
    for label in sorted(set(scores) | set(heldout)):
        for i, suite in enumerate(sorted(scores.get(label) or {}, key=lambda s: (order.get(s, len(order)), s))):
            v = scores[label][suite]
            task = SUITES.get(suite)
            loss = (heldout.get(label) or {}).get(task)
            table.add_row(label if i == 0 else "", suite, f"{v['score']:.3f}",
                          f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v.get("ci95") else "-",
                          f"{v['chance']:.3f}" if v.get("chance") is not None else "-",
                          f"{loss:.3f}" if loss is not None else "-")
        table.add_section()
    return table


@contextlib.contextmanager
def _kfp_logs_to(path: Path):
    """kfp.local logs every step (and its executor input) to stdout: into a file instead."""
    with open(path, "w", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


@contextlib.contextmanager
def _progress(artifacts: Path, term: Console):
    """A live line per finished step (kfp.local writes its executor output when a step ends)."""
    stop = threading.Event()
    start = time.time()

    def watch():
        seen: set[str] = set()
        while not stop.wait(1.0):
            jobs = sorted((p for p in artifacts.glob("*") if p.is_dir() and p.stat().st_mtime >= start - 1),
                          key=lambda p: p.stat().st_mtime) if artifacts.is_dir() else []
            for done in sorted(jobs[-1].glob("**/executor_output.json"), key=lambda p: p.stat().st_mtime) if jobs else []:
                name = done.parent.name
                if done.parent.parent != jobs[-1]:  # a ParallelFor iteration: <loop>-iteration-<i>/<task>
                    name += f"-w{done.parent.parent.name.rsplit('-', 1)[-1]}"
                if name not in seen:
                    seen.add(name)
                    term.print(f"  [green]done[/green] {name:<22} {time.time() - start:6.0f} s")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        with term.status("running the pipeline (one subprocess per step)"):
            yield
    finally:
        stop.set()
        thread.join()


def _print_summary(result: dict, name: str) -> None:
    steps = Table(title=f"pipeline {result['job']}: {result['state']} in {result.get('seconds', 0):.0f} s")
    for col in ("MLflow run", "status", "seconds", "cache"):
        steps.add_column(col)
    for s in result["steps"]:
        steps.add_row(s["name"], s["status"], f"{s['seconds']:.1f}", s.get("cache") or "")
    console.print(steps)
    if result["scores"]:
        console.print(score_table(result["scores"], result.get("heldout") or {}))
    gate = result["gate"]
    if gate is not None:
        verdict = "[green]PASSED" if gate["passed"] else "[red]FAILED"
        console.print(f"gate: {verdict}[/] (champion compared: {gate['champion_version']}); "
                      f"decision.json under the gate step's artifacts", highlight=False)
        for line in (gate.get("checks") or "").splitlines():
            console.print(f"  {line}", highlight=False, markup=False)
    if result.get("duplicate_of"):
        console.print(f"model: {result['model_uri']}: this run's model is already version {result['duplicate_of']}; "
                      "registered nothing new, aliases left as they are", highlight=False)
    else:
        console.print(f"model: {result['model_uri'] or 'not registered'}")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    console.print(f"\nbrowse runs and lineage:  .venv/bin/mlflow ui --backend-store-uri {uri}")
    if result.get("experiment_id"):
        # MLflow 3.17's UI opens experiments on its GenAI overview unless told the workflow type
        console.print(f"  then open http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs/"
                      f"{result['parent_run_id']}?workflowType=machine_learning  (this run: what it registered, "
                      "its stages, the gate, the scores)", highlight=False, soft_wrap=True)
    if result["model_uri"]:
        console.print(f"                          .venv/bin/unitoken lineage {result['model_uri']}")
        console.print(f"                          .venv/bin/unitoken lineage models:/{name}@champion")
