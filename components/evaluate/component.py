"""Evaluate a model on the understanding and generation suites."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], dataset: Input[Dataset], tokens: Input[Dataset], suites: str, limit: int, label: str,
             parent_run_id: str, cache_root: str, use_cache: bool, evaluation: Output[Artifact], report: Output[HTML],
             metrics: Output[Metrics]) -> str:
    """Writes report.json + items.jsonl (per-item results for the gate) and the HTML report;
    returns the overall scores and the held-out losses (``tokens``' test split) as JSON. Reused
    from ``cache_root`` for the same model, data and settings (``use_cache``)."""
    import json
    import shutil
    from pathlib import Path

    from unitoken.pipeline import steps
    from unitoken.pipeline.cache import StepCache

    scores = steps.evaluate(Path(model.path), Path(dataset.path), suites, limit, Path(evaluation.path), parent_run_id,
                            label, cache=StepCache(cache_root, use_cache), tokens=Path(tokens.path))
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    for key, value in scores.items():
        if key.startswith("cache"):
            continue
        metrics.log_metric(key.replace("/", "."), value)
    return json.dumps(scores)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(evaluate, "evaluate.yaml")
