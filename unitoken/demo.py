"""What `make demo` runs: the embedded default of the platform.

The UniToken Kubeflow pipeline runs locally through ``kfp.local`` (``unitoken pipeline run
--local --recipe demo``): synthetic shapes data -> great-expectations validation -> VQ
tokenizer -> model init -> pre-tokenisation -> stages 1, 2, 3 (each evaluated) -> the
two-track gate (the recipe's floors; against the champion once there is one) -> registration
(and promotion) in a sqlite MLflow under ./.unitoken/. Then the champion's lineage, its answer
to a test question and an image it generates.

The ``demo`` recipe is the ``tiny`` model trained just long enough on 2 CPU cores to answer
shapes-VQA above chance (docs/results.md, "Issue 26"); its images are not good yet. Run it
again with the same inputs and every step is a cache hit: the model is the registered one, so
nothing new is registered.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()
NAME = "unitoken"
PROMPT = "a red circle"
SCENES = 500  # ~300 test questions: enough for a 95 % interval that can clear chance (0.26)


def main() -> int:
    # One OpenMP thread in every step's process (they inherit it): the steps run one at a time,
    # and a torch process with a thread per core slows to a crawl beside any other busy process
    # (a tokenizer step on 2 shared cores: 2.8 s with 2 threads, 0.7 s with 1; docs/results.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from unitoken.cli import main as unitoken
    from unitoken.files import unitoken_home

    state = unitoken_home()  # the checkout's .unitoken/ when `make demo` runs it
    start = time.perf_counter()
    code = unitoken(["pipeline", "run", "--local", "--recipe", "demo", "--scenes", str(SCENES), "--name", NAME,
                     "--promote"])
    if code == 1:
        console.print(f"[red]demo stopped: the pipeline failed (its log is {state}/pipeline/pipeline.log)")
        return 1
    if code == 3:
        console.print("[yellow]the gate refused the new model (reasons above); the champion stays as it was")
    from unitoken.tracking.store import client as _client

    aliases = _client().get_registered_model(NAME).aliases if _registered(NAME) else {}
    if not aliases:
        console.print("[red]no model is registered: nothing to ask")
        return code or 1
    uri = f"models:/{NAME}@{'champion' if 'champion' in aliases else 'challenger'}"
    question, image = first_test_question(state / "pipeline" / "data")
    generated = state / "demo" / "generated.png"
    steps = (["lineage", uri],
             ["chat", "--model", uri, "--image", str(image), "--prompt", question["question"], "--max-new-tokens", "8"],
             ["generate", "--model", uri, "--prompt", PROMPT, "--out", str(generated)])
    answer = ""
    for args in steps:
        console.print(f"\n[bold]$ unitoken {' '.join(_quote(a) for a in args)}", highlight=False)
        if args[0] == "chat":  # the answer is printed below, beside the expected one
            with contextlib.redirect_stdout(io.StringIO()) as out:
                code = unitoken(args)
            answer = out.getvalue().strip()
        else:
            code = unitoken(args)
        if code != 0:
            return 1
        if args[0] == "chat":
            console.print(f"answer: [bold]{answer or '(empty)'}[/]   (the test set's answer: {question['answer']})",
                          highlight=False)
    console.print(f"generated image ({PROMPT!r}): {generated.resolve()}", highlight=False)
    report = _newest(state / "pipeline" / "artifacts", "evaluate-stage3/evaluation/report.html")
    if report is not None:
        console.print(f"every evaluated answer and image of stage 3: {report.resolve()}", highlight=False)
    console.rule(f"[green]demo finished in {time.perf_counter() - start:.0f}s")
    if not answer:
        console.print(f"[red]{uri} answered nothing")
        return 1
    return 0


def first_test_question(data: Path) -> tuple[dict, Path]:
    """The first open (not multiple-choice) question of the synthetic test split, never trained
    on, with its answer and image."""
    with open(data / "manifest.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("source") == "synth-vqa" and rec.get("split") == "test" and not rec["meta"]["qtype"].startswith("mc_"):
                question = rec["conversations"][0]["value"].split("\n", 1)[1]
                return {"question": question, "answer": rec["meta"]["answer"]}, data / rec["image"][0]
    raise FileNotFoundError(f"{data}/manifest.jsonl has no test question")


def _registered(name: str) -> bool:
    from unitoken.tracking.store import client as _client

    return bool(_client().search_registered_models(f"name = '{name}'"))


def _newest(root: Path, rel: str) -> Path | None:
    """``rel`` inside the newest pipeline job's artifacts (a cache hit keeps its files' old times)."""
    jobs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return jobs[-1] / rel if jobs and (jobs[-1] / rel).is_file() else None


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


if __name__ == "__main__":
    sys.exit(main())
