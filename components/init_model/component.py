"""The model the first stage starts from: new from the recipe, or a registered model."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def init_model(recipe: str, overrides_json: str, base_model: str, model: Output[Model],
               tokenizer: Input[Model] = None):
    """With ``base_model`` (models:/NAME@ALIAS) the registered model is fetched and verified
    (stage-scoped retraining); otherwise a new model is built with the tokenizer."""
    import json
    from pathlib import Path

    from unitoken.pipeline import steps

    if not base_model and tokenizer is None:
        raise ValueError("this pipeline starts after stage 1: set base_model=models:/NAME@champion (the model to retrain)")
    info = steps.init_model(recipe, json.loads(overrides_json), Path(tokenizer.path) if tokenizer else None,
                            base_model, Path(model.path))
    model.metadata.update(info)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(init_model, "init_model.yaml")
