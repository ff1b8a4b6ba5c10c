"""MLflow's basic-auth mode: a real `mlflow server --app-name basic-auth`; the platform's client code
(pipeline runs, nested step runs, the training tracker) authenticates from the environment only
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), and a wrong password fails clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.extended

from tests.conftest import _port, _wait

ADMIN_PASSWORD = "admin-Secr3t-for-tests"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basic-auth")
    ini = tmp / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / 'auth.db'}\nadmin_username = admin\n"
                   f"admin_password = {ADMIN_PASSWORD}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = _port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-tests",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    _wait(f"{uri}/health", proc, "mlflow basic-auth server")
    yield {"uri": uri, "tmp": tmp}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def as_user(auth_server, monkeypatch):
    """A non-admin user created by the admin; the code under test sees only env credentials."""
    from mlflow.server.auth.client import AuthServiceClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server["uri"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    try:
        AuthServiceClient(auth_server["uri"]).create_user("pipeline", "pipeline-Pa55word")
    except Exception as err:  # noqa: BLE001 - created by an earlier test of this module
        assert "already exists" in str(err).lower() or "RESOURCE_ALREADY_EXISTS" in str(err)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pipeline-Pa55word")
    return auth_server


def test_pipeline_and_training_tracking_authenticate_from_the_environment(as_user, tmp_path):
    from mlflow import MlflowClient

    from unitoken.pipeline import steps
    from unitoken.tracking import MLflowTracker

    parent = steps.open_pipeline_run("job-basic-auth", "basic auth", {"recipe": "tiny"})
    with steps.step_run("validate", parent, {"rows": 3}) as run:
        run.metrics({"clean_rows": 3})
    tracker = MLflowTracker("stage1", tmp_path, parent_run_id=parent, final_wait_s=5)
    tracker.log_params({"stage": 1})
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.close("FINISHED")
    assert steps.close_pipeline_run("job-basic-auth", "SUCCEEDED") == "FINISHED"
    assert not (tmp_path / "pending.jsonl").exists()
    client = MlflowClient(as_user["uri"])
    stage = client.get_run(tracker.run_id)
    assert stage.data.metrics["loss"] == 1.5 and stage.data.tags["mlflow.parentRunId"] == parent


def test_wrong_password_fails_clearly(as_user, monkeypatch, tmp_path):
    """A pipeline step fails with the server's 401; training keeps going and queues its tracking
    to pending.jsonl (the documented outage policy) instead of dying mid-stage."""
    from unitoken.pipeline import steps
    from unitoken.tracking import MLflowTracker

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(Exception, match="401|[Uu]nauthori|credentials"):
        steps.open_pipeline_run("job-wrong-password", "wrong password", {})
    tracker = MLflowTracker("stage1", tmp_path, final_wait_s=1, min_flush_interval_s=0)
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.close("FINISHED")
    assert (tmp_path / "pending.jsonl").is_file()
    assert "wrong" not in (tmp_path / "pending.jsonl").read_text()
