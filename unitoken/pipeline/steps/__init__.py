"""What each pipeline step does, as plain functions over local paths, by phase: ``runs`` (the
pipeline's MLflow runs and the step cache), ``data``, ``train``, ``evaluate`` and ``release``.

The KFP components in ``components/`` are thin: KFP hands them artifact paths and parameters,
they call one function here. The same code therefore runs under ``kfp.local`` (``make demo``),
in a pod on a cluster, and in tests without KFP. Nothing here imports ``kfp``.

MLflow: the pipeline run is the parent run (``open_pipeline_run``), found again by the tag
``unitoken.pipeline_job``; every step is a nested run (``mlflow.parentRunId``), and the parent
run's id is passed to the code that tracks by itself (training, registration) as an argument.
A ``parent_run_id`` of None runs a step with no MLflow at all: the small study
(``studies/small_study/``) runs these steps on a GPU machine that has no MLflow.
"""

from unitoken.pipeline.steps.data import (
    data_root,
    init_model,
    pretokenize,
    pretokenize_merge,
    pretokenize_worker,
    tokenizer,
    validate,
)
from unitoken.pipeline.steps.evaluate import eval_metrics, evaluate, gate, gate_summary
from unitoken.pipeline.steps.release import register, summarise_pipeline_run
from unitoken.pipeline.steps.runs import (
    PIPELINE_NAME_TAG,
    PIPELINE_TAG,
    StepError,
    cached_step,
    close_pipeline_run,
    open_pipeline_run,
    pipeline_run_id,
    readable_run_name,
    step_run,
)
from unitoken.pipeline.steps.train import (
    RunsOn,
    dns_name,
    publish_handoff,
    ratio_overrides,
    run_label,
    stage_input,
    tokens_digest,
    train_command,
    train_stage,
    trainjob_name,
)

__all__ = ["PIPELINE_NAME_TAG", "PIPELINE_TAG", "RunsOn", "StepError", "cached_step", "close_pipeline_run", "data_root",
           "dns_name", "eval_metrics", "evaluate", "gate", "gate_summary", "init_model", "open_pipeline_run",
           "pipeline_run_id", "pretokenize", "pretokenize_merge", "pretokenize_worker", "publish_handoff",
           "ratio_overrides", "readable_run_name", "register", "run_label", "stage_input", "step_run",
           "summarise_pipeline_run", "tokenizer", "tokens_digest", "train_command", "train_stage", "trainjob_name",
           "validate"]
