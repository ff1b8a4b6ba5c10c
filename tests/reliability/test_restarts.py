"""The production stack restarted under the pipeline's steps (issue 35): MLflow on PostgreSQL with
its artifacts on S3 (SeaweedFS), as k8s/ runs it, each part a real process the test kills and
starts again on the same port and data.

- The MLflow server killed while a training stage logs, and restarted: the stage finishes, every
  step's metrics reach the run (the tracker queues them meanwhile) and the run ends FINISHED.
- PostgreSQL restarted between two steps: the next step's calls reach it through the same MLflow
  server (its connection pool reconnects) and its run is complete.
- SeaweedFS down when a registration uploads, restarted while the step retries: the version is
  registered once and its artifacts verify against the passport (nothing truncated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack import MlflowServer, Postgres, SeaweedFS, have_postgres

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not have_postgres():
        pytest.skip("PostgreSQL (initdb, pg_ctl, createdb) is not installed: apt-get install postgresql")
    tmp = tmp_path_factory.mktemp("stack")
    pg = Postgres()
    weed = SeaweedFS(tmp).start()
    weed.bucket("mlflow")
    ml = MlflowServer(pg.uri, "s3://mlflow/artifacts", s3_endpoint=weed.endpoint, log=tmp / "mlflow.log").start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": ml.uri, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "UNITOKEN_ACTOR": "ci", "PYTHONWARNINGS": "ignore"}
    s = {"tmp": tmp, "pg": pg, "weed": weed, "mlflow": ml, "env": env}
    for args in (["data", "synth", "--out", "d", "--n", "12"], ["data", "validate", "d/manifest.jsonl", "--out", "v"],
                 ["model", "init", "--recipe", "tiny", "--out", "m"],
                 ["data", "pretokenize", "v/clean.jsonl", "--model", "m", "--out", "p"]):
        cli(s, *args)
    yield s
    ml.kill()
    weed.kill()
    pg.close()


def cli(stack, *args, popen=False, **kw):
    cmd = [sys.executable, "-m", "unitoken.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=stack["tmp"], env=stack["env"], text=True, **kw)
    proc = subprocess.run(cmd, cwd=stack["tmp"], env=stack["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"unitoken {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack["mlflow"].uri)


def _stage_run(stack, out: str):
    run_id = json.loads((stack["tmp"] / out / "handoff" / "handoff.json").read_text())["mlflow_run_id"]
    return _client(stack).get_run(run_id)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _assert_complete(stack, out: str) -> None:
    """The stage's run ended FINISHED with the loss of every step it trained, nothing left pending."""
    run = _stage_run(stack, out)
    steps = [r["step"] for r in _rows(stack["tmp"] / out / "metrics.jsonl") if "loss" in r]
    logged = [m.step for m in _client(stack).get_metric_history(run.info.run_id, "loss")]
    assert run.info.status == "FINISHED"
    assert steps and sorted(logged) == steps, (steps, logged)
    assert not (stack["tmp"] / out / "pending.jsonl").exists()


def test_mlflow_killed_while_a_stage_logs_then_restarted(stack):
    log = open(stack["tmp"] / "s1.log", "w")
    proc = cli(stack, "train", "--stage", "1", "--recipe", "tiny", "--data", "p", "--out", "s1", "--init", "m",
               "--max-steps", "40", popen=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(_rows(stack["tmp"] / "s1" / "metrics.jsonl")) < 3:  # logging has begun
        assert proc.poll() is None and time.time() < deadline, (stack["tmp"] / "s1.log").read_text()[-3000:]
        time.sleep(0.05)
    stack["mlflow"].kill()
    at_kill = len(_rows(stack["tmp"] / "s1" / "metrics.jsonl"))
    time.sleep(3)
    stack["mlflow"].start()
    assert proc.wait(timeout=300) == 0, (stack["tmp"] / "s1.log").read_text()[-3000:]
    log.close()
    text = (stack["tmp"] / "s1.log").read_text()
    assert at_kill < 40 and "unreachable" in text  # the outage hit the stage while it trained
    _assert_complete(stack, "s1")


def test_postgres_restarted_between_two_steps(stack):
    if not (stack["tmp"] / "s1" / "handoff" / "handoff.json").is_file():
        cli(stack, "train", "--stage", "1", "--recipe", "tiny", "--data", "p", "--out", "s1", "--init", "m",
            "--max-steps", "3")
    stack["pg"].stop("fast")  # every connection the MLflow server pooled is closed under it
    stack["pg"].start()
    cli(stack, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", "s2", "--init", "s1/handoff",
        "--max-steps", "4")
    _assert_complete(stack, "s2")
    assert _stage_run(stack, "s2").data.tags.get("mlflow.runName")


def test_seaweedfs_down_during_a_registration_then_restarted(stack, monkeypatch):
    from unitoken import registry

    if not (stack["tmp"] / "s1" / "handoff" / "handoff.json").is_file():
        cli(stack, "train", "--stage", "1", "--recipe", "tiny", "--data", "p", "--out", "s1", "--init", "m",
            "--max-steps", "3")
    cli(stack, "eval", "--model", "s1/handoff", "--suite", "shapes-vqa", "--data", "d", "--out", "e", "--limit", "3",
        "--device", "cpu")
    cli(stack, "gate", "--candidate", "e", "--out", "gate.json")
    stack["weed"].kill()
    err = open(stack["tmp"] / "register.log", "w")
    proc = cli(stack, "registry", "register", "--model", "s1/handoff", "--eval", "e", "--gate", "gate.json",
               "--name", "restarts", popen=True, stdout=subprocess.PIPE, stderr=err)
    deadline = time.time() + 120
    while "artifact store error" not in (stack["tmp"] / "register.log").read_text():  # an upload failed
        assert proc.poll() is None and time.time() < deadline, (stack["tmp"] / "register.log").read_text()[-3000:]
        time.sleep(0.2)
    stack["weed"].start()
    out, _ = proc.communicate(timeout=300)
    err.close()
    assert proc.returncode == 0, (stack["tmp"] / "register.log").read_text()[-3000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert info["version"] == "1" and not info["duplicate"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["mlflow"].uri)
    report = registry.lineage(info["uri"])
    assert report["ok"], report  # every artifact's digest matches the passport: none is partial
