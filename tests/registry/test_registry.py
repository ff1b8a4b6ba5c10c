"""Registry, promotion, lineage against a real MLflow server with artifacts on real S3 (SeaweedFS)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEYS = {"AWS_ACCESS_KEY_ID": "unitoken-test", "AWS_SECRET_ACCESS_KEY": "unitoken-test-secret"}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not start")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import boto3

    tmp = tmp_path_factory.mktemp("registry")
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    s3_port = _port()
    s3 = subprocess.Popen([weed, "mini", f"-dir={tmp / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.port={s3_port}",
                           "-s3.port.iceberg=0", "-s3.port.lance=0"], env={**os.environ, **KEYS},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    (tmp / "weed").mkdir(exist_ok=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    _wait(endpoint, s3, "SeaweedFS")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in KEYS.items()})
    for _ in range(60):
        try:
            client.create_bucket(Bucket="mlflow")
            break
        except Exception:  # noqa: BLE001 - the filer may need a moment after the port opens
            time.sleep(0.5)
    ml_port = _port()
    env = {**os.environ, **KEYS, "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    ml = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                           f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow/artifacts",
                           "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(f"http://127.0.0.1:{ml_port}/health", ml, "mlflow server")
    yield {"tmp": tmp, "uri": f"http://127.0.0.1:{ml_port}", "s3": client}
    for p in (ml, s3):
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _env(servers):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore",
            "MLFLOW_TRACKING_URI": servers["uri"], "UNITOKEN_ACTOR": "ci",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def run(servers, *args, check=True, popen=False):
    cmd = [sys.executable, "-m", "unitoken.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=servers["tmp"], env=_env(servers), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=servers["tmp"], env=_env(servers), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"unitoken {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def registered(servers):
    for args in (["data", "synth", "--out", "d", "--n", "40"], ["data", "validate", "d/manifest.jsonl", "--out", "v"],
                 ["model", "init", "--recipe", "tiny", "--out", "m"],
                 ["data", "pretokenize", "v/clean.jsonl", "--model", "m", "--out", "p"]):
        run(servers, *args)
    init = "m"
    for stage in (1, 2, 3):
        run(servers, "train", "--stage", str(stage), "--recipe", "tiny", "--data", "p", "--out", f"s{stage}",
            "--init", init, "--max-steps", "3")
        init = f"s{stage}/handoff"
    run(servers, "eval", "--model", "s3/handoff", "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", "e",
        "--limit", "3", "--device", "cpu")
    run(servers, "gate", "--candidate", "e", "--out", "gate.json")
    out = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
              "--name", "shapes")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _history(servers):
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=servers["uri"]).get_registered_model("shapes").tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("unitoken.history.champion.")]


def test_register_promote_history_rollback_lineage_chat(servers, registered):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["uri"])
    assert registered["version"] == "1"
    assert client.get_registered_model("shapes").aliases == {"challenger": "1"}
    objects = [o["Key"] for o in servers["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in objects), "model weights are not on S3"
    run(servers, "registry", "promote", "shapes", "--version", "1", "--expect-current", "none")
    v2 = json.loads(run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
                        "--name", "shapes").stdout.strip().splitlines()[-1])
    run(servers, "registry", "promote", "shapes", "--version", v2["version"], "--expect-current", "1",
        "--reason", "better")
    assert client.get_registered_model("shapes").aliases["champion"] == "2"
    run(servers, "registry", "rollback", "shapes")
    assert client.get_registered_model("shapes").aliases["champion"] == "1"
    moves = _history(servers)
    assert [(m["action"], m["from"], m["to"]) for m in moves] == [("promote", None, "1"), ("promote", "1", "2"),
                                                                  ("rollback", "2", "1")]
    assert moves[1]["who"] == "ci" and moves[1]["reason"] == "better"
    out = run(servers, "registry", "history", "shapes")
    assert "rollback" in out.stdout
    lin = json.loads(run(servers, "lineage", "models:/shapes@champion", "--json").stdout)
    assert lin["ok"] and lin["aliases"] == ["champion"]
    kinds = [e["kind"] for e in lin["passport"]]
    assert kinds == ["data", "stage", "stage", "stage", "eval", "gate", "build"]
    assert [e["stage"] for e in lin["passport"] if e["kind"] == "stage"] == [1, 2, 3]
    assert all(e["mlflow_run_id"] for e in lin["passport"] if e["kind"] == "stage")
    assert lin["passport"][0]["validation_report_sha256"]
    chat = run(servers, "chat", "--model", "models:/shapes@champion", "--image", "d/images/train/s000000.png",
               "--prompt", "What is this?", "--max-new-tokens", "4", "--device", "cpu")
    assert chat.returncode == 0


def test_racing_promotions_exactly_one_wins(servers, registered):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["uri"])
    v3 = json.loads(run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
                        "--name", "shapes").stdout.strip().splitlines()[-1])["version"]
    current = client.get_registered_model("shapes").aliases.get("champion")
    before = len(_history(servers))
    procs = [run(servers, "registry", "promote", "shapes", "--version", v3, "--expect-current", str(current),
                 "--reason", f"racer {i}", popen=True) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "ConflictError" in loser
    assert len(_history(servers)) == before + 1
    assert client.get_registered_model("shapes").aliases["champion"] == v3


def test_tampered_artifact_breaks_lineage_and_promotion(servers, registered):
    s3 = servers["s3"]
    run_id = registered["run_id"]
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]
               if run_id in o["Key"] and o["Key"].endswith("eval/report.json"))
    original = s3.get_object(Bucket="mlflow", Key=key)["Body"].read()
    s3.put_object(Bucket="mlflow", Key=key, Body=original.replace(b'"overall": ', b'"overall": 0.99 + '))
    try:
        lin = run(servers, "lineage", f"models:/shapes/{registered['version']}", check=False)
        assert lin.returncode == 1 and "stored evaluation report does not match the passport" in lin.stdout
        promo = run(servers, "registry", "promote", "shapes", "--version", registered["version"], check=False)
        assert promo.returncode == 1 and "refusing to promote" in promo.stderr
    finally:
        s3.put_object(Bucket="mlflow", Key=key, Body=original)


def test_register_refuses_failed_gate_without_force(servers, registered, tmp_path):
    decision = json.loads((servers["tmp"] / "gate.json").read_text())
    failed = servers["tmp"] / "gate_failed.json"
    failed.write_text(json.dumps({**decision, "passed": False, "reasons": ["generation below margin"]}))
    proc = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate_failed.json",
               "--name", "shapes", check=False)
    assert proc.returncode == 1 and "the gate did not pass (generation below margin)" in proc.stderr
    forced = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate_failed.json",
                 "--name", "shapes", "--force", "--reason", "hotfix approved by on-call")
    version = json.loads(forced.stdout.strip().splitlines()[-1])["version"]
    lin = json.loads(run(servers, "lineage", f"models:/shapes/{version}", "--json").stdout)
    gate = next(e for e in lin["passport"] if e["kind"] == "gate")
    assert gate["passed"] is False and gate["forced_reason"] == "hotfix approved by on-call"
