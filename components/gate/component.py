"""Two-track gate: the candidate against the registered champion (or the floors alone)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(candidate: Input[Artifact], dataset: Input[Dataset], model_name: str, policy_yaml: str, recipe: str,
         overrides_json: str, parent_run_id: str, decision: Output[Artifact]) -> bool:
    """Returns ``passed`` (it drives the pipeline's dsl.If); decision.json explains every check and
    names the champion version compared against. An empty ``policy_yaml`` gates with the
    recipe's floors. (A single output: kfp.local cannot resolve a NamedTuple field in a
    condition inside an ExitHandler.)"""
    import json
    from pathlib import Path

    from unitoken.pipeline import steps

    result = steps.gate(Path(candidate.path), Path(dataset.path), model_name, policy_yaml, Path(decision.path),
                        parent_run_id, recipe, json.loads(overrides_json))
    decision.metadata.update({"passed": result["passed"], "champion_version": result["champion_version"],
                              "reasons": "; ".join(result["reasons"])})
    return result["passed"]


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(gate, "gate.yaml")
