"""What `make demo` runs.

The embedded default is the whole pipeline through kfp.local (data validation, pre-tokenisation,
three training stages, evaluation, gate, MLflow registration). Until those steps exist, this
runs the longest real path that does: build the tiny model from its recipe, generate an image
from a prompt, and answer a question about that image, all on the CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console

from unitoken.cli import main as unitoken

console = Console()


def main(out: Path = Path(".unitoken/demo")) -> int:
    console.rule("[bold]UniToken demo (CPU)")
    console.print("[yellow]Note:[/yellow] the local KFP pipeline (validate -> pretokenize -> stages 1-3 -> eval -> "
                  "gate -> register) is not built yet; this demo runs the longest path that exists today: "
                  "model init -> generate -> chat, on an untrained tiny model (its outputs are noise).")
    out.mkdir(parents=True, exist_ok=True)
    steps = [
        ["model", "init", "--recipe", "tiny", "--out", str(out / "model")],
        ["generate", "--model", str(out / "model"), "--prompt", "a red circle", "--out", str(out / "g.png")],
        ["chat", "--model", str(out / "model"), "--image", str(out / "g.png"), "--prompt", "What is this?",
         "--max-new-tokens", "16"],
    ]
    start = time.perf_counter()
    for args in steps:
        console.print(f"\n[bold]$ unitoken {' '.join(args)}")
        code = unitoken(args)
        if code != 0:
            return code
    console.print(f"\n[green]demo finished in {time.perf_counter() - start:.1f}s[/green]; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
