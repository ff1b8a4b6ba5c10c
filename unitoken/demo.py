"""What `make demo` runs.

The embedded default is meant to be the Kubeflow pipeline run through ``kfp.local``
(``unitoken pipeline run --local``, issue 7). That pipeline does not exist yet, so this runs the
longest real path that does, with the same commands the pipeline's components will call, on
the CPU: synthesise data -> validate -> train a VQ tokenizer -> model init -> pre-tokenise ->
stages 1, 2, 3 -> evaluate -> gate -> register in a sqlite MLflow under ./.unitoken/ ->
promote to champion -> lineage -> chat with the champion.

The tiny model trains for seconds per stage, so its answers and images are not good; the point
is the platform path, whose lineage you can browse in `mlflow ui`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from unitoken.cli import main as unitoken

console = Console()


def main(out: Path = Path(".unitoken/demo")) -> int:
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('.unitoken/mlflow.db').resolve()}")
    console.rule("[bold]UniToken demo (CPU)")
    console.print("[yellow]Note:[/yellow] the Kubeflow pipeline (`unitoken pipeline run --local`) is not built yet; "
                  "this runs the same steps as plain commands, in order.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    d, v, vq, m, p = (str(out / x) for x in ("data", "validated", "vq", "model", "pretokenized"))
    steps = [
        ["data", "synth", "--out", d, "--n", "300"],
        ["data", "validate", f"{d}/manifest.jsonl", "--out", v],
        ["tokenizer", "train", "--data", d, "--out", vq, "--recipe", "tiny", "--steps", "300", "--batch-size", "16",
         "--lr", "2e-3"],
        ["model", "init", "--recipe", "tiny", "--tokenizer", vq, "--out", m],
        ["data", "pretokenize", f"{v}/clean.jsonl", "--model", m, "--out", p],
    ]
    init = m
    for stage in (1, 2, 3):
        steps.append(["train", "--stage", str(stage), "--recipe", "tiny", "--data", p, "--out", f"{out}/stage{stage}",
                      "--init", init])
        init = f"{out}/stage{stage}/handoff"
    steps += [
        ["eval", "--model", init, "--suite", "shapes-vqa,shapes-geneval", "--data", d, "--out", f"{out}/eval",
         "--limit", "12", "--device", "cpu"],
        ["gate", "--candidate", f"{out}/eval", "--out", f"{out}/gate.json"],
        ["registry", "register", "--model", init, "--eval", f"{out}/eval", "--gate", f"{out}/gate.json",
         "--name", "unitoken-demo"],
    ]
    start = time.perf_counter()
    for args in steps:
        console.print(f"\n[bold]$ unitoken {' '.join(args)}")
        code = unitoken(args)
        if code != 0:
            console.print(f"[red]demo stopped: `unitoken {args[0]}` exited {code}")
            return code
    from unitoken.registry import _client

    version = max(int(v.version) for v in _client().search_model_versions("name='unitoken-demo'"))
    current = _client().get_registered_model("unitoken-demo").aliases.get("champion")
    for args in (["registry", "promote", "unitoken-demo", "--version", str(version), "--expect-current",
                  str(current) if current else "none", "--reason", "make demo"],
                 ["lineage", "models:/unitoken-demo@champion"],
                 ["chat", "--model", "models:/unitoken-demo@champion", "--image", f"{d}/images/test/"
                  + sorted(os.listdir(f"{d}/images/test"))[0], "--prompt", "What color is the object in the top left?",
                  "--max-new-tokens", "8"]):
        console.print(f"\n[bold]$ unitoken {' '.join(args)}")
        if unitoken(args) != 0:
            return 1
    console.rule(f"[green]demo finished in {time.perf_counter() - start:.0f}s")
    console.print(f"outputs: {out}/   evaluation report: {out}/eval/report.html\n"
                  f"browse the lineage:  .venv/bin/mlflow ui --backend-store-uri {os.environ['MLFLOW_TRACKING_URI']}\n"
                  "                     .venv/bin/unitoken lineage models:/unitoken-demo@champion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
