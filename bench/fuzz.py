"""The fuzz properties of tests/reliability at bench scale (>= 10,000 cases in all).

    python bench/fuzz.py [--configs 3000] [--images 1000] [--out runs/bench/fuzz.json]

Each property runs in its own pytest process with hypothesis's example count raised; the table
lists cases, outcome and seconds per property.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROPERTIES = [
    ("tests/reliability/test_fuzz_configs.py::test_gate_policy_files", "configs", "gate policy YAML"),
    ("tests/reliability/test_fuzz_configs.py::test_cluster_configs", "configs", "cluster config"),
    ("tests/reliability/test_fuzz_configs.py::test_set_overrides", "configs", "--set overrides"),
    ("tests/reliability/test_fuzz_images.py::test_any_image_is_validated_or_quarantined_never_crashes", "images",
     "images through validation (1-4 per case)"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=3000, help="cases per config property")
    ap.add_argument("--images", type=int, default=1000, help="cases of the image property")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/fuzz.json"))
    args = ap.parse_args()
    rows = []
    for node, kind, what in PROPERTIES:
        n = args.configs if kind == "configs" else args.images
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--hypothesis-show-statistics", node], cwd=ROOT,
                              env={**os.environ, "UNITOKEN_FUZZ_EXAMPLES": str(n)}, capture_output=True, text=True)
        # hypothesis reports how many examples really ran (it may stop early on a small input space)
        ran = [int(m) for m in re.findall(r"(\d+) passing(?: examples?)?,", proc.stdout)]
        rows.append({"property": what, "max_examples": n, "cases": sum(ran), "passed": proc.returncode == 0,
                     "seconds": round(time.perf_counter() - start, 1),
                     "failure": None if proc.returncode == 0 else proc.stdout[-1500:]})
    table = Table(title="fuzzing (hypothesis)")
    for col in ("property", "cases run", "outcome", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["property"], f"{r['cases']:,}", "[green]no crash" if r["passed"] else "[red]FAILED",
                      f"{r['seconds']:.0f}")
    total = sum(r["cases"] for r in rows)
    table.add_row("[bold]total", f"[bold]{total:,}", "", f"{sum(r['seconds'] for r in rows):.0f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"total_cases": total, "properties": rows}, indent=2) + "\n")
    for r in rows:
        if r["failure"]:
            print(r["failure"])
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
