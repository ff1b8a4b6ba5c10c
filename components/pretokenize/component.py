"""VQ-encode the validated images into resumable shards."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretokenize(dataset: Input[Dataset], model: Input[Model], parent_run_id: str, tokens: Output[Dataset]):
    """Shards + index.json (with the manifest's and validation report's digests)."""
    from pathlib import Path

    from unitoken.pipeline import steps

    summary = steps.pretokenize(Path(dataset.path), Path(model.path), Path(tokens.path), parent_run_id)
    tokens.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(pretokenize, "pretokenize.yaml")
