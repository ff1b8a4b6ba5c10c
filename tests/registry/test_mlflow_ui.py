"""Lineage review in the MLflow UI, looked at with a real browser (headless Chromium from the system
packages), on the store `make demo` leaves, served as `mlflow ui` serves it: the champion's model page shows its evaluation metrics and its registered version; the
version page shows the signature and the Markdown lineage; the registration run's page shows its
dataset inputs, its registered model and the model's metrics.

Set UNITOKEN_UI_SCREENSHOTS=DIR to keep the screenshots (docs/images/ holds the committed ones)."""

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.registry.conftest import NAME

pytestmark = pytest.mark.slow
BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed "
                                   "(apt-get install chromium-headless-shell)")


def _browse(url: str, shot: Path) -> str:
    """The page's text after its scripts ran (and, with $UNITOKEN_UI_SCREENSHOTS set, a screenshot of
    it kept there: one browser start less per page when it is not, ~20 s each on 2 cores)."""
    flags = [BROWSER, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1300",
             "--virtual-time-budget=20000"]
    keep = os.environ.get("UNITOKEN_UI_SCREENSHOTS")
    if keep:
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / f"mlflow-ui-{shot.name}")
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


@needs_browser
def test_the_mlflow_ui_shows_the_champion_with_its_metrics_signature_and_lineage(local_ui, champion, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=local_ui)
    mv = client.get_model_version(NAME, champion)
    lm = client.get_logged_model(mv.tags["unitoken.logged_model"])
    base = local_ui
    model_page = _browse(f"{base}/#/experiments/{lm.experiment_id}/models/{lm.model_id}", tmp_path / "model.png")
    scores = {m.key: m.value for m in lm.metrics}
    assert "shapes-vqa/overall" in scores and "heldout_loss/understanding" in scores
    assert "Metrics (" in model_page and all(k in model_page for k in scores), model_page[:3000]
    assert f"{NAME} v{champion}" in model_page or f"Version {champion}" in model_page, model_page[:3000]
    assert "Lineage" in model_page  # the description
    version_page = _browse(f"{base}/#/models/{NAME}/versions/{champion}", tmp_path / "version.png")
    assert "Inputs (3)" in version_page and "Outputs (2)" in version_page, version_page[-3000:]
    for text in ("Lineage", "Stage 3", "Evaluation", "Gate", "champion"):
        assert text in version_page, text
    run_id = mv.tags["unitoken.registration_run"]
    run_page = _browse(f"{base}/#/experiments/{lm.experiment_id}/runs/{run_id}", tmp_path / "run.png")
    for text in ("validated-manifest", "Registered models", f"v{champion}", "Metrics (", "shapes-vqa/overall"):
        assert text in run_page, (text, run_page[:3000])


@needs_browser
def test_the_experiment_opens_on_its_runs_and_the_pipeline_run_links_the_version(local_ui, champion, tmp_path):
    """Issue 37: the experiment is tagged as model development and opened as model training, it
    lists its runs (not the GenAI overview); the pipeline run has a readable name, a description linking the
    registered version, the logged model, each stage run and the gate, and the headline scores as
    metrics; the registered model's description is its alias history."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=local_ui)
    exp = client.get_experiment_by_name("unitoken")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the pipeline run that registered the champion (make test-all runs more pipelines in that store)
    registration = client.get_run(client.get_model_version(NAME, champion).tags["unitoken.registration_run"])
    parent = client.get_run(registration.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["unitoken.kind"] == "pipeline"
    assert re.fullmatch(r"training \d\d-\d\d \d\d:\d\d:\d\d", parent.info.run_name), parent.info.run_name
    note = parent.data.tags["mlflow.note.content"]
    assert f"#/models/{NAME}/versions/" in note and "stage 3" in note and "**Gate**" in note
    assert "shapes-vqa/overall" in parent.data.metrics
    base = local_ui
    # MLflow 3.17's UI picks GenAI or model training by a switch it keeps in the browser (default
    # GenAI), not by the experiment's tag; the links unitoken prints carry the workflow type
    ml = "?workflowType=machine_learning"
    experiment_page = _browse(f"{base}/#/experiments/{exp.experiment_id}{ml}", tmp_path / "experiment.png")
    assert parent.info.run_name in experiment_page and "No data available" not in experiment_page, experiment_page[:3000]
    run_page = _browse(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}{ml}",
                       tmp_path / "pipeline.png")
    for text in ("Registered", f"{NAME} v", "stage 1", "stage 3", "Gate", "shapes-vqa/overall"):
        assert text in run_page, (text, run_page[:3000])
    model_page = _browse(f"{base}/#/models/{NAME}", tmp_path / "registered.png")
    assert "Alias history" in model_page and "champion" in model_page, model_page[:3000]
