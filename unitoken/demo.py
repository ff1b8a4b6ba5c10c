"""What `make demo` runs: the embedded default of the platform.

The UniToken Kubeflow pipeline runs locally through ``kfp.local`` (``unitoken pipeline run
--local``): synthetic shapes data -> great-expectations validation -> VQ tokenizer -> model init
-> pre-tokenisation -> stages 1, 2, 3 (each evaluated) -> the two-track gate against the
champion -> registration (and promotion) in a sqlite MLflow under ./.unitoken/. Then the
champion's lineage, and a question to it.

The tiny model trains for seconds per stage on 2 CPU cores, so its answers and images are not
good; the point is the platform path, whose lineage you can browse in `mlflow ui`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console

from unitoken.cli import main as unitoken

console = Console()
NAME = "unitoken"


def main() -> int:
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('.unitoken/mlflow.db').resolve()}")
    start = time.perf_counter()
    code = unitoken(["pipeline", "run", "--local", "--recipe", "tiny", "--name", NAME, "--promote"])
    if code == 1:
        console.print("[red]demo stopped: the pipeline failed (its log is .unitoken/pipeline/pipeline.log)")
        return 1
    if code == 3:
        console.print("[yellow]the gate refused the new model (reasons above); the champion stays as it was")
    from unitoken.registry import _client

    aliases = _client().get_registered_model(NAME).aliases
    alias = "champion" if "champion" in aliases else "challenger"
    data = Path(".unitoken/pipeline/data")
    image = sorted((data / "images" / "test").iterdir())[0]
    for args in (["lineage", f"models:/{NAME}@{alias}"],
                 ["chat", "--model", f"models:/{NAME}@{alias}", "--image", str(image),
                  "--prompt", "What color is the object in the top left?", "--max-new-tokens", "8"]):
        console.print(f"\n[bold]$ unitoken {' '.join(args)}")
        if unitoken(args) != 0:
            return 1
    console.rule(f"[green]demo finished in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
