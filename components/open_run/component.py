"""Open the pipeline's parent MLflow run (found again by job name when the step is retried)."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_run(job: str, params_json: str) -> str:
    """Returns the parent run id every later step nests under."""
    import json

    from unitoken.pipeline import steps

    return steps.open_pipeline_run(job, json.loads(params_json))


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(open_run, "open_run.yaml")
