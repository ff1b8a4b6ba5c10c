"""The recipe's VQ tokenizer: the released one (tokenizer_uri) or one trained on the data."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_tokenizer(dataset: Input[Dataset], recipe: str, overrides_json: str, tokenizer_uri: str, steps: int,
                    batch_size: int, lr: float, parent_run_id: str, cache_root: str, use_cache: bool,
                    tokenizer: Output[Model]):
    """Writes a VQ-GAN directory (vqgan.yaml + vqgan.ckpt, taming layout); reused from
    ``cache_root`` when the data and settings are unchanged (``use_cache``)."""
    import json
    from pathlib import Path

    from unitoken.pipeline import steps as s
    from unitoken.pipeline.cache import StepCache

    info = s.tokenizer(Path(dataset.path), recipe, json.loads(overrides_json), tokenizer_uri, steps,
                       Path(tokenizer.path), parent_run_id, batch_size, lr, cache=StepCache(cache_root, use_cache))
    tokenizer.metadata.update({k: v for k, v in info.items() if v is not None})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(train_tokenizer, "train_tokenizer.yaml")
