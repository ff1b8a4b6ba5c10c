"""The MLflow server k8s/ deploys answers in-cluster clients: its Host-header allow-list (DNS
rebinding protection, mlflow >= 3.5) names the Service, and refuses every other host.

The server runs with the command, arguments and environment of the rendered dev overlay's
Deployment; only what cannot run here is swapped: the PostgreSQL store for SQLite, S3 artifacts
for a folder, the address, port and worker count."""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from unitoken.pipeline.manifests import render

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "k8s" / "overlays" / "dev"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
# what cannot run here, by flag or env name -> its local stand-in (filled per test)
_LOCAL_FLAGS = ("--backend-store-uri", "--artifacts-destination", "--host", "--port", "--workers")


def _find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _env(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's env as the kubelet would set it: config map and secret keys resolved,
    ``$(VAR)`` references expanded from the variables defined before them."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif ref := var["valueFrom"].get("configMapKeyRef"):
            value = _find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            value = base64.b64decode(_find(docs, "Secret", ref["name"])["data"][ref["key"]]).decode()
        env[var["name"]] = value
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, host: str, path: str = SEARCH) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def mlflow_deployment(docs: list[dict]) -> tuple[list[str], dict[str, str]]:
    """The rendered MLflow container's command line and environment."""
    container = _find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    return container["command"] + container.get("args", []), _env(docs, container)


def allowed_hosts(argv: list[str], env: dict[str, str]) -> list[str]:
    """The Host allow-list ``mlflow server`` reads: ``--allowed-hosts``, else its env var (click's order)."""
    value = argv[argv.index("--allowed-hosts") + 1] if "--allowed-hosts" in argv else env.get(
        "MLFLOW_SERVER_ALLOWED_HOSTS", "")
    return [host.strip() for host in value.split(",") if host.strip()]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(OVERLAY)[0]


@pytest.fixture(scope="module")
def server(rendered, tmp_path_factory) -> Iterator[int]:
    """The real ``mlflow server`` started as the manifest starts it; yields its port."""
    tmp = tmp_path_factory.mktemp("mlflow")
    argv, env = mlflow_deployment(rendered)
    assert argv[:2] == ["mlflow", "server"], argv
    port = _free_port()
    local = {"--backend-store-uri": f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination": str(tmp / "artifacts"),
             "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    args = argv[2:]
    for flag in _LOCAL_FLAGS:  # drop the manifest's value of each flag that cannot run here
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    env = {k: v for k, v in env.items() if k not in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION")}
    env.update(HOME=str(tmp), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=os.environ["PATH"])
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    cmd = [mlflow, "server", *args, *(x for kv in local.items() for x in kv)]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(port, f"127.0.0.1:{port}", "/health") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.mark.parametrize("host", ["mlflow.unitoken.svc.cluster.local:5000", "mlflow:5000", "localhost:5000"])
def test_in_cluster_host_names_reach_the_api(server, host):
    """A request naming the Service (full or short) or a port-forward reaches a real API endpoint."""
    assert _get(server, host) == 200


def test_an_unknown_host_is_refused(server):
    """DNS rebinding protection stays on: a host not on the list gets 403."""
    assert _get(server, "evil.example.com") == 403
    assert _get(server, "evil.example.com:5000") == 403


def test_the_cluster_configs_tracking_uri_is_allowed(rendered):
    """The host pipeline steps use (examples/cluster.yaml's MLFLOW_TRACKING_URI) is on the allow-list."""
    cluster = yaml.safe_load((ROOT / "examples" / "cluster.yaml").read_text())["cluster"]
    allowed = allowed_hosts(*mlflow_deployment(rendered))
    assert urlsplit(cluster["env"]["MLFLOW_TRACKING_URI"]).netloc in allowed
    config = _find(rendered, "ConfigMap", "unitoken-config")["data"]
    assert urlsplit(config["MLFLOW_TRACKING_URI"]).netloc in allowed


def test_the_allow_list_has_one_source():
    """Both overlays' MLflow read the list from the unitoken-config key, never from a literal flag or value."""
    for overlay in ("dev", "prod"):
        docs = render(ROOT / "k8s" / "overlays" / overlay)[0]
        container = _find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        [var] = [v for v in container["env"] if v["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS"]
        assert var["valueFrom"]["configMapKeyRef"] == {"name": "unitoken-config", "key": "MLFLOW_SERVER_ALLOWED_HOSTS"}
        assert "--allowed-hosts" not in container["args"]
