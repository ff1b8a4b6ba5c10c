"""Exit handler: close the parent MLflow run with the pipeline's final state."""

from kfp import dsl

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def close_run(status: dsl.PipelineTaskFinalStatus, job: str) -> str:
    """Marks the parent run FINISHED (pipeline succeeded) or FAILED, with the error message."""
    from unitoken.pipeline import steps

    return steps.close_pipeline_run(job, status.state, status.error_message)


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(close_run, "close_run.yaml")
