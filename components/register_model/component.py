"""Register the gated model in MLflow with its passport (and optionally promote it)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(model: Input[Model], evaluation: Input[Artifact], decision: Input[Artifact], model_name: str,
                   parent_run_id: str, promote: bool) -> str:
    """Returns the model URI (models:/NAME/VERSION). With ``promote`` the champion alias moves
    to it by compare-and-swap against the champion the gate compared with (decision.json)."""
    from pathlib import Path

    from unitoken.pipeline import steps

    info = steps.register(Path(model.path), Path(evaluation.path), Path(decision.path) / "decision.json", model_name,
                          parent_run_id, promote)
    return info["uri"]


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(register_model, "register_model.yaml")
