"""The served champion under concurrent load: `mlflow models serve` of a registered model (as the
README serves it), then a bounded load from ``--clients`` threads on the loopback: ``--requests``
requests, understand and generate mixed, ``--bad-share`` of them malformed.

    python bench/serve_load.py [--model models:/unitoken@champion] [--clients 8] [--requests 200]
                               [--workers 1] [--out runs/bench/serve_load.json]

Run after `make demo` (the local store, ./.unitoken/mlflow.db, has a champion), or with
MLFLOW_TRACKING_URI set. Prints
one table (per kind: requests, 200s, 4xx, 5xx, no answer, p50 / p95 / p99 latency) and the
throughput and the scoring server's memory (start, peak, end); writes the same as JSON. Every
good request is also checked against its answer when sent alone (``mismatch``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from unitoken.registry import loadtest


def _image_b64() -> str:
    """A synthetic scene as the clients send it (base64 PNG)."""
    from unitoken.data.shapes import ShapeObject, render

    buf = io.BytesIO()
    render([ShapeObject("circle", "red", "large", 0, 0, 0.0, 0.0), ShapeObject("square", "blue", "small", 1, 1, 0.0, 0.0)],
           64).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def _serve(model: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    from unitoken.tracking import default_tracking_uri

    # the store `make demo` registered in, unless MLFLOW_TRACKING_URI names another
    env = {**os.environ, "MLFLOW_TRACKING_URI": default_tracking_uri(),
           "UNITOKEN_DEVICE": os.environ.get("UNITOKEN_DEVICE", "cpu"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port), "-w", str(workers)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    raise SystemExit("mlflow models serve did not answer /ping in 300 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models:/unitoken@champion")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--bad-share", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=1, help="scoring server workers (`mlflow models serve -w`)")
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve_load.json"))
    args = ap.parse_args()
    console = Console()
    log = Path(tempfile.mkdtemp(prefix="unitoken-serve-")) / "serve.log"
    t = time.perf_counter()
    proc = _serve(args.model, args.port, args.workers, log)
    start_s = time.perf_counter() - t
    url = f"http://127.0.0.1:{args.port}"
    try:
        image = _image_b64()
        good, bad = loadtest.good_requests(image), loadtest.bad_requests(image)
        alone = {id(r): loadtest.send(url, r) for r in good}
        rss, done = [_tree_rss(proc.pid)], threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss.append(_tree_rss(proc.pid))
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        requests = loadtest.plan(good, bad, args.requests, args.bad_share)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{args.requests} requests, {args.clients} clients", total=args.requests)
            answers, wall_s = loadtest.hammer(url, requests, args.clients,
                                              progress=lambda n, _: bar.update(task, completed=n))
        done.set()
        rss.append(_tree_rss(proc.pid))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    summary = loadtest.summarize(answers, wall_s)
    mismatch = sum(1 for a in answers if a.request.kind != "bad" and a.status == 200
                   and a.body.get("predictions") != alone[id(a.request)].body.get("predictions"))
    bad_not_4xx = sum(1 for a in answers if a.request.kind == "bad" and not 400 <= a.status < 500)
    mib = [round(x / 2**20) for x in rss]
    table = Table(title=f"{args.model} under load: {args.clients} clients, {args.requests} requests, "
                        f"{args.workers} scoring worker(s), {os.cpu_count()} CPU cores")
    for col in ("kind", "requests", "200", "4xx", "5xx", "no answer", "p50 s", "p95 s", "p99 s"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for kind, r in summary["by_kind"].items():
        table.add_row(kind, str(r["n"]), str(r["ok"]), str(r["4xx"]), str(r["5xx"]), str(r["no_answer"]),
                      f"{r['p50_s']:.2f}", f"{r['p95_s']:.2f}", f"{r['p99_s']:.2f}")
    console.print(table)
    solo = {k: statistics.median(a.seconds for r, a in zip(good, alone.values()) if r.kind == k)
            for k in ("understand", "generate")}
    console.print(f"alone (one request at a time, before the load): understand {solo['understand']:.2f} s, "
                  f"generate {solo['generate']:.2f} s (median)")
    console.print(f"throughput {summary['requests_per_s']:.2f} requests/s over {wall_s:.1f} s; server start "
                  f"{start_s:.0f} s; memory (server and workers) start {mib[0]} MiB, peak {max(mib)} MiB, end {mib[-1]} "
                  f"MiB; good answers unlike their answer alone: {mismatch}; bad requests not answered 4xx: {bad_not_4xx}")
    doc = {**summary, "clients": args.clients, "workers": args.workers, "bad_share": args.bad_share,
           "model": args.model, "server_start_s": start_s, "rss_mib": {"start": mib[0], "peak": max(mib), "end": mib[-1]},
           "alone_median_s": solo, "mismatch": mismatch, "bad_not_4xx": bad_not_4xx, "cpu_count": os.cpu_count(), "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    return 1 if mismatch or bad_not_4xx or summary["by_kind"]["all"]["5xx"] or summary["by_kind"]["all"]["no_answer"] else 0


if __name__ == "__main__":
    sys.exit(main())
