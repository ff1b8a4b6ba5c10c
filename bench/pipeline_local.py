"""How long the embedded default takes: `unitoken pipeline run --local` (what `make demo` runs)
in a fresh directory, end to end, with the time of every step. Target: <= 10 minutes on 2 CPU cores.

    python bench/pipeline_local.py [--out docs/results/pipeline_local.json] [--param NAME=VALUE ...]

Prints a table (step, seconds as KFP saw it, incl. the subprocess start and imports) and the
total against the target; writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

TARGET_S = 600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/pipeline_local.json"))
    ap.add_argument("--param", action="append", default=[])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unitoken-bench-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / '.unitoken' / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "unitoken.cli", "pipeline", "run", "--local", "--recipe", "tiny", "--promote"]
    for p in args.param:
        cmd += ["--param", p]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    job = next((work / ".unitoken" / "pipeline" / "artifacts").iterdir())
    # kfp.local writes each step's executor output when the step ends: consecutive end times
    ends = sorted((p.stat().st_mtime, p.parent.name) for p in job.glob("*/executor_output.json"))
    steps, previous = [], time.time() - total  # wall-clock time the command started
    for end, name in ends:
        steps.append({"step": name, "seconds": round(end - previous, 1)})
        previous = end
    result = {"total_seconds": round(total, 1), "target_seconds": TARGET_S, "exit_code": proc.returncode,
              "steps": steps, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "command": " ".join(cmd[1:]), "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"unitoken pipeline run --local (tiny), {os.cpu_count()} CPUs")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for s in steps:
        table.add_row(s["step"], f"{s['seconds']:.1f}")
    verdict = "within" if total <= TARGET_S else "OVER"
    table.add_row("[bold]total (incl. data synthesis and summary)", f"[bold]{total:.1f}")
    Console().print(table)
    Console().print(f"{verdict} the {TARGET_S} s target; exit code {proc.returncode}; JSON -> {args.out}")
    if proc.returncode not in (0, 3):
        print(proc.stdout[-2000:], proc.stderr[-2000:])
    return 0 if proc.returncode in (0, 3) else 1


if __name__ == "__main__":
    sys.exit(main())
