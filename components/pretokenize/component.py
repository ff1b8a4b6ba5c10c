"""VQ-encode the validated images into resumable shards."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretokenize(dataset: Input[Dataset], model: Input[Model], parent_run_id: str, cache_root: str, use_cache: bool,
                tokens: Output[Dataset]):
    """Shards + index.json (with the manifest's and validation report's digests); reused from
    ``cache_root`` when the data and the model's tokenizer are unchanged (``use_cache``)."""
    from pathlib import Path

    from unitoken.pipeline import steps
    from unitoken.pipeline.cache import StepCache

    summary = steps.pretokenize(Path(dataset.path), Path(model.path), Path(tokens.path), parent_run_id,
                               cache=StepCache(cache_root, use_cache))
    tokens.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(pretokenize, "pretokenize.yaml")
