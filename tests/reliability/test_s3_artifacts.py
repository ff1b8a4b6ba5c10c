"""S3 failing under MLflow artifact logging: a real `mlflow server` whose artifact store is a real
S3 (SeaweedFS) reached through a TCP relay that the test cuts (every open connection closed,
new ones closed on accept) and restores. The cut is made at the n-th file upload (counted on
the client), so each case fails at a known point of the logging.

Policy under test (docs/reliability.md): registration and pipeline steps retry each upload with
exponential backoff, then fail with an error naming the artifact and the fix, and register
nothing; training defers its artifacts (metrics keep flowing), stores them once S3 is back,
or leaves them in pending.jsonl for `replay`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import KEYS, _port, _wait

pytestmark = pytest.mark.faults  # make test-faults (a second MLflow server and retries: ~45 s in all)


class Relay:
    """127.0.0.1:port -> target; ``down()`` cuts every connection and refuses new ones (closed on accept)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.alive = target, True
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.alive:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (a, b):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self.lock:
            self.conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def down(self) -> None:
        self.alive = False
        with self.lock:
            conns = list(self.conns)
        for s in conns:
            self._close(s)

    def up(self) -> None:
        self.alive = True


@pytest.fixture(scope="module")
def faulty(servers, tmp_path_factory):
    """A second MLflow server (sqlite) whose S3 artifact store is the session's SeaweedFS behind a Relay."""
    tmp = tmp_path_factory.mktemp("faulty-s3")
    endpoint = servers["s3"].meta.endpoint_url
    host, port = endpoint.split("//")[1].split(":")
    relay = Relay((host, int(port)))
    ml_port = _port()
    # The server's own boto3 retries are cut to 2 attempts so each failing request answers in ~1 s;
    # the retry policy under test is ours, on the client side.
    env = {**os.environ, **KEYS, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
           "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    ml = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                           f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow/faulty",
                           "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(f"http://127.0.0.1:{ml_port}/health", ml, "mlflow server")
    yield {"uri": f"http://127.0.0.1:{ml_port}", "relay": relay, "tmp": tmp, "s3": servers["s3"]}
    os.killpg(ml.pid, signal.SIGKILL)
    ml.wait()


@pytest.fixture
def env(faulty, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", faulty["uri"])
    monkeypatch.setenv("UNITOKEN_ARTIFACT_ATTEMPTS", "3")
    monkeypatch.setenv("UNITOKEN_ARTIFACT_BACKOFF_S", "0.5")
    faulty["relay"].up()
    yield faulty
    faulty["relay"].up()


@pytest.fixture
def cut_at(env, monkeypatch):
    """cut_at(n, restore_after_s=None): S3 goes down as the n-th file upload starts (and comes back
    ``restore_after_s`` later). Returns the list of uploaded file names, in order."""
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    real = HttpArtifactRepository.log_artifact
    uploads: list[str] = []
    plan: dict = {}

    def counted(self, local_file, artifact_path=None):
        uploads.append(Path(local_file).name)
        if len(uploads) == plan.get("n"):
            env["relay"].down()
            if plan.get("restore") is not None:
                threading.Timer(plan["restore"], env["relay"].up).start()
        return real(self, local_file, artifact_path)

    monkeypatch.setattr(HttpArtifactRepository, "log_artifact", counted)

    def arm(n: int, restore_after_s: float | None = None) -> list[str]:
        plan.update(n=n, restore=restore_after_s)
        return uploads

    return arm


_candidates = [0]


def _candidate(tmp: Path) -> tuple[Path, Path, Path]:
    """A stage-1 hand-off of a fresh tiny model, an evaluation and a passing gate decision (no
    training: registration reads only these files)."""
    from unitoken.config import config_hash
    from unitoken.model.handoff import write_handoff
    from unitoken.model.io import init_model, save_model
    from unitoken.recipes import get_recipe

    _candidates[0] += 1
    model_dir = tmp / f"handoff{_candidates[0]}"
    recipe = get_recipe("tiny")
    model, tok = init_model(recipe.model, seed=_candidates[0])
    save_model(model, tok, model_dir)
    state = model.state_dict()
    write_handoff(model_dir, {"stage": 1, "step": 0, "recipe": "tiny", "model_config_hash": config_hash(recipe.model),
                              "data_digest": "0" * 64, "ancestors": []}, state, [])
    ev = tmp / f"eval{_candidates[0]}"
    ev.mkdir()
    (ev / "report.json").write_text(json.dumps({"metrics": {"shapes-vqa/overall": 0.5}, "suites": ["shapes-vqa"]}))
    (ev / "items.jsonl").write_text('{"id": 1, "correct": true}\n')
    gate = tmp / f"decision{_candidates[0]}.json"
    gate.write_text(json.dumps({"passed": True, "reasons": [], "checks": []}))
    return model_dir, ev, gate


def _client(env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["uri"])


def _read(call, *args):
    """A read of the test's own: the server may drop a keep-alive connection a failed upload used."""
    for attempt in range(3):
        try:
            return call(*args)
        except Exception:  # noqa: BLE001
            if attempt == 2:
                raise
            time.sleep(0.5)


def _registration_runs(client, name):
    exp = client.get_experiment_by_name("unitoken").experiment_id
    return client.search_runs([exp], f"attributes.run_name = 'register-{name}'")


def test_short_s3_outage_during_registration_is_ridden_out(env, cut_at, tmp_path, caplog):
    """S3 cut as the 6th file (a model file) uploads, back 1.5 s later: the upload is retried with
    backoff, the version is registered, and its lineage verifies against what S3 holds."""
    from unitoken import registry

    uploads = cut_at(6, restore_after_s=1.5)
    with caplog.at_level(logging.WARNING, logger="unitoken.tracking.store"):
        info = registry.register(*_candidate(tmp_path), name="riding")
    assert any("retrying in" in r.getMessage() for r in caplog.records)
    assert len(uploads) > 6 + 1  # the cut upload was tried again (with the rest of the model files)
    assert registry.lineage(info["uri"])["ok"]
    assert str(_client(env).get_registered_model("riding").aliases["challenger"]) == info["version"]


@pytest.mark.parametrize("at,what", [(1, "passport.json of run"), (3, "eval/items.jsonl of run"),
                                     (6, "model files of")])
def test_persistent_s3_outage_registers_nothing_and_says_what_to_do(env, cut_at, tmp_path, at, what):
    """S3 cut for good at the passport, an evaluation file or the model files: one error naming
    the artifact, the attempts and the fix; no version, no alias; the registration run FAILED
    (and its logged model, once created). With S3 back the same registration goes through."""
    from unitoken import registry

    name = f"stuck{at}"
    candidate = _candidate(tmp_path)
    cut_at(at)
    t0 = time.monotonic()
    with pytest.raises(registry.RegistryError) as err:
        registry.register(*candidate, name=name)
    msg = str(err.value)
    assert what in msg and "after 3 attempt(s)" in msg and "Nothing was registered" in msg
    assert "artifact store (S3)" in msg and "run the registration again" in msg
    assert time.monotonic() - t0 < 60
    client = _client(env)
    assert client.search_model_versions(f"name='{name}'") == []
    (run,) = _read(_registration_runs, client, name)
    assert run.info.status == "FAILED" and what in run.data.tags["unitoken.registration_error"]
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name}'")
    assert [str(m.status).rsplit(".", 1)[-1] for m in models] == (["FAILED"] if at == 6 else [])
    env["relay"].up()
    info = registry.register(*candidate, name=name)
    assert info["version"] == "1" and registry.lineage(info["uri"])["ok"]


def test_training_keeps_logging_metrics_while_s3_is_down_and_stores_artifacts_when_back(env, tmp_path):
    """The training tracker: an artifact S3 refuses is set aside, metrics keep arriving, the
    artifact is stored once S3 answers again, then the run is FINISHED."""
    from unitoken.tracking import MLflowTracker

    curve = tmp_path / "metrics.jsonl"
    curve.write_text("".join(json.dumps({"step": i, "loss": 3 - i / 10}) + "\n" for i in range(50)))
    tracker = MLflowTracker("stage1", tmp_path, tracking_uri=env["uri"], min_flush_interval_s=0, final_wait_s=20)
    tracker.log_params({"lr": 0.001})
    env["relay"].down()
    tracker.log_artifact(curve)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 3 - step / 10}, step=step)
    assert len(tracker.deferred) == 1 and not tracker.queue
    client = _client(env)
    assert [m.step for m in _read(client.get_metric_history, tracker.run_id, "loss")] == [1, 2, 3]  # S3 still down
    threading.Timer(2.0, env["relay"].up).start()
    tracker.close()
    assert not (tmp_path / "pending.jsonl").exists() and not tracker.deferred
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    got = Path(client.download_artifacts(tracker.run_id, "metrics.jsonl", str(tmp_path / "dl")))
    assert got.read_bytes() == curve.read_bytes()


def test_training_artifacts_outlasting_the_stage_go_to_pending_and_replay(env, tmp_path):
    """S3 down past the end of the stage: metrics are delivered, the artifact and the run's end
    go to pending.jsonl; a replay while S3 is still down keeps exactly those two calls (nothing
    sent twice); once S3 is back the replay stores the artifact and finishes the run."""
    from unitoken.tracking import MLflowTracker, replay

    handoff = tmp_path / "handoff.json"
    handoff.write_text('{"stage": 2}\n')
    tracker = MLflowTracker("stage2", tmp_path, tracking_uri=env["uri"], min_flush_interval_s=0, final_wait_s=1)
    env["relay"].down()
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_artifact(handoff, "handoff")
    tracker.close()
    pending = tmp_path / "pending.jsonl"
    ops = [json.loads(x)["op"] for x in pending.read_text().splitlines()]
    assert ops == ["run", "artifact", "terminate"]
    client = _client(env)
    run = _read(client.get_run, tracker.run_id)
    assert run.info.status == "RUNNING" and run.data.metrics == {"loss": 2.0}
    with pytest.raises(ConnectionError, match="2 calls kept"):
        replay(pending, env["uri"])
    assert [json.loads(x)["op"] for x in pending.read_text().splitlines()] == ["run", "artifact", "terminate"]
    env["relay"].up()
    assert replay(pending, env["uri"]) == 2 and not pending.exists()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [f.path for f in client.list_artifacts(tracker.run_id, "handoff")] == ["handoff/handoff.json"]


def test_pipeline_step_fails_naming_the_artifact(env, tmp_path):
    """A pipeline step whose report cannot be stored: StepError naming the file and the fix; the
    step's MLflow run is FAILED (KFP's retry or a re-run, with the step cache, takes over)."""
    from unitoken.pipeline import steps

    report = tmp_path / "report.json"
    report.write_text("{}")
    env["relay"].down()
    with pytest.raises(steps.StepError, match=r"validation/report.json of run \w+: storing it .* failed after 3 "
                                              r"attempt\(s\).*check the tracking server's artifact store \(S3\)"):
        with steps.step_run("validate", "") as run:
            run.artifact(report, "validation")
    assert _read(_client(env).get_run, run.run_id).info.status == "FAILED"


def test_model_download_rides_out_a_short_s3_outage_and_fails_clearly_on_a_long_one(env, tmp_path, caplog):
    """`models:/` loads (every command that takes a registered model) retry their downloads with
    the same backoff: S3 down for 1.5 s -> the model arrives and verifies; down for good -> one
    RegistryError naming what was being read, the attempts and the fix."""
    from unitoken import registry

    info = registry.register(*_candidate(tmp_path), name="fetched")
    env["relay"].down()
    threading.Timer(1.5, env["relay"].up).start()
    with caplog.at_level(logging.WARNING, logger="unitoken.tracking.store"):
        model_dir = registry.load_uri(info["uri"])
    assert any("retrying in" in r.getMessage() for r in caplog.records)  # the outage was met, and ridden out
    assert (model_dir / "model.safetensors").is_file()
    env["relay"].down()
    with pytest.raises(registry.RegistryError, match=r"of fetched version 1: reading it from MLflow's artifact store "
                                                      r"failed after 3 attempt\(s\).*artifact store \(S3\)"):
        registry.load_uri(info["uri"])
    env["relay"].up()
    assert registry.lineage(info["uri"])["ok"]
