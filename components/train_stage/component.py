"""One training stage; its input is the previous stage's hand-off artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_stage(stage: int, recipe: str, overrides_json: str, mixture_ratio: str, tokens: Input[Dataset],
                init: Input[Model], parent_run_id: str, job: str, checkpoint_root: str, max_steps: int,
                num_nodes: int, gpus: int, cluster_json: str, use_cache: bool, handoff: Output[Model], metrics: Output[Metrics]):
    """Trains on this pod (num_nodes 1; one process per GPU when ``gpus`` > 1) or through a
    Kubeflow Trainer TrainJob (num_nodes > 1).

    ``job`` is the run's id. Periodic checkpoints go to ``checkpoint_root/<job>/stage<N>`` (the checkpoint volume on a
    cluster), so a retried step resumes where the failed attempt stopped. Completed hand-offs
    are cached under ``checkpoint_root/cache`` and reused for the same inputs (``use_cache``).
    """
    import json
    from pathlib import Path

    from unitoken.pipeline import steps
    from unitoken.pipeline.cache import StepCache

    overrides = json.loads(overrides_json) + steps.ratio_overrides(stage, mixture_ratio if stage == 2 else "")
    root = Path(checkpoint_root) if checkpoint_root else Path(handoff.path).parent / "work"
    work = root / steps.dns_name(job) / f"stage{stage}"
    cache = StepCache(Path(checkpoint_root) / "cache" if checkpoint_root else None, use_cache)
    runs_on = steps.RunsOn.pod(num_nodes, gpus, job, json.loads(cluster_json) if num_nodes > 1 else None)
    info = steps.train_stage(stage, recipe, overrides, Path(tokens.path), Path(init.path), Path(handoff.path), work,
                             parent_run_id, runs_on, max_steps=max_steps, cache=cache)
    handoff.metadata.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))})
    for key in ("final_loss", "first_loss", "seconds"):
        if isinstance(info.get(key), (int, float)):
            metrics.log_metric(key, info[key])


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(train_stage, "train_stage.yaml")
