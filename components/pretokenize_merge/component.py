"""Put the pre-tokenisation workers' shards together: plan, shards and index.json."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pretokenize_merge(parts: Input[List[Dataset]], parent_run_id: str, tokens: Output[Dataset]):
    """The pre-tokenised data set the stages train on, byte-identical to one worker's run over the
    whole manifest; fails when the workers' plans differ or a shard is missing or made twice."""
    from pathlib import Path

    from unitoken.pipeline import steps

    summary = steps.pretokenize_merge([Path(p.path) for p in parts], Path(tokens.path), parent_run_id,
                                      worker_cache=[str(p.metadata.get("cache", "off")) for p in parts])
    tokens.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(pretokenize_merge, "pretokenize_merge.yaml")
