"""Validate the data (great-expectations) with quarantine; clean rows become the Dataset."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(data_uri: str, parent_run_id: str, max_reject_fraction: float, dataset: Output[Dataset],
                  report: Output[HTML]) -> int:
    """Fails when more rows are rejected than allowed; returns the number of clean rows.

    Args:
        data_uri: a data directory or manifest (local/shared volume) or s3://bucket/prefix.
    """
    import shutil
    from pathlib import Path

    from unitoken.pipeline import steps

    summary = steps.validate(data_uri, Path(dataset.path), parent_run_id, max_reject_fraction)
    shutil.copyfile(Path(dataset.path) / "report.html", report.path)
    dataset.metadata.update(summary)
    return summary["clean_rows"]


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(validate_data, "validate_data.yaml")
