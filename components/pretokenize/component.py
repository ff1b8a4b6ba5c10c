"""One pre-tokenisation worker: VQ-encode the validated images of its shard range (a ParallelFor item)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretokenize(dataset: Input[Dataset], model: Input[Model], worker: int, num_workers: int, shard_size: int,
                job: str, checkpoint_root: str, use_cache: bool, shards: Output[Dataset]):
    """plan.json + the shards of range ``worker`` of ``num_workers`` (no index: ``pretokenize_merge``
    writes it). Images on S3 are fetched for these shards only. Shards are built under
    ``checkpoint_root/<job>/pretokenize-w<worker>`` (the checkpoint volume on a cluster), so a
    retried pod resumes at the shard that was cut off; reused from ``checkpoint_root/cache`` when
    the data, the model's tokenizer and the shard range are unchanged (``use_cache``). The MLflow
    parent run is found by ``job`` (the run's id), not passed in: see ``steps.pipeline_run_id``.
    """
    from pathlib import Path

    from unitoken.pipeline import steps
    from unitoken.pipeline.cache import StepCache

    work = Path(checkpoint_root) / steps.dns_name(job) / f"pretokenize-w{worker}" if checkpoint_root else None
    cache = StepCache(Path(checkpoint_root) / "cache" if checkpoint_root else None, use_cache)
    summary = steps.pretokenize_worker(Path(dataset.path), Path(model.path), Path(shards.path), steps.pipeline_run_id(job),
                                       worker=worker, num_workers=num_workers, shard_size=shard_size, work=work,
                                       cache=cache)
    shards.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(pretokenize, "pretokenize.yaml")
