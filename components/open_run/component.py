"""Open the pipeline's parent MLflow run (found again by job name when the step is retried)."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_run(job: str, job_name: str, stages: str, data_uri: str, recipe: str, overrides_json: str, mixture_ratio: str,
             model_name: str, base_model: str, gate_policy: str) -> str:
    """Returns the parent run id every later step nests under (keyed by the run id ``job``; named
    ``job_name``, the run's display name); the run's params are the pipeline's."""
    from unitoken.pipeline import steps

    return steps.open_pipeline_run(job, job_name, {
        "stages": stages, "data_uri": data_uri, "recipe": recipe, "overrides": overrides_json,
        "mixture_ratio": mixture_ratio, "model_name": model_name, "base_model": base_model or "none",
        "gate_policy": gate_policy or "default"})


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(open_run, "open_run.yaml")
