"""Shared fixtures: tiny random models built in-process (no hub, no network)."""

from __future__ import annotations

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
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Local state (the default MLflow store, the local pipeline's root) in each test's working
# directory, as a relative UNITOKEN_HOME resolves: tests stay apart from each other and from ~/.unitoken.
os.environ.setdefault("UNITOKEN_HOME", ".unitoken")
torch.set_num_threads(2)


# the launcher's variables `unitoken.train.parallel.init_distributed` sets when a test trains in this process
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_variables_leak():
    """A test that trains in this process leaves RANK and MASTER_PORT in os.environ (and its process
    group listening on that port): every process started afterwards would inherit them, take itself
    for a rank of that group and fail to listen on the port (EADDRINUSE). They are put back."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def build_tiny(mode: str = "dual", anyres: bool = False, seed: int = 0):
    """(model, tokenizer, builder) for the tiny recipe in the given encoder mode."""
    from unitoken.model.io import init_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import get_recipe

    overrides = [f"model.encoder_mode={mode}", f"model.vision.anyres={str(anyres).lower()}"]
    recipe = get_recipe("tiny", overrides)
    model, tok = init_model(recipe.model, seed=seed)
    return model, tok, SequenceBuilder(model.tokens, tok, model.config)


@pytest.fixture(scope="session")
def tiny():
    return build_tiny()


ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """A real MLflow server (sqlite) with artifacts on a real S3 server (SeaweedFS), on 127.0.0.1."""
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


def run(servers, *args, check=True, popen=False, inprocess=False):
    """`unitoken ARGS` against the test servers: a subprocess, or (inprocess=True, for commands that
    start no DeepSpeed process group) a call of the CLI in this process with the same environment."""
    if inprocess:
        return _run_inprocess(servers, args, check)
    cmd = [sys.executable, "-m", "unitoken.cli", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=servers["tmp"], env=_env(servers), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=servers["tmp"], env=_env(servers), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"unitoken {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def _run_inprocess(servers, args, check):
    import contextlib
    import io

    from unitoken.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in _env(servers)}
    cwd = os.getcwd()
    os.environ.update(_env(servers))
    os.chdir(servers["tmp"])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from unitoken import cli

            cli.console.file, cli.err_console.file = out, err
            code = main(list(args))
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        from unitoken import cli

        cli.console.file, cli.err_console.file = sys.stdout, sys.stderr
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"unitoken {' '.join(args)} -> {code}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def trained(servers):
    """Synthetic data -> validate -> model init -> pretokenize -> stages 1, 2, 3 (tracked on the server)."""
    for args in (["data", "synth", "--out", "d", "--n", "40"], ["data", "validate", "d/manifest.jsonl", "--out", "v"],
                 ["model", "init", "--recipe", "tiny", "--out", "m"],
                 ["data", "pretokenize", "v/clean.jsonl", "--model", "m", "--out", "p"]):
        run(servers, *args)
    init = "m"
    for stage in (1, 2, 3):
        run(servers, "train", "--stage", str(stage), "--recipe", "tiny", "--data", "p", "--out", f"s{stage}",
            "--init", init)
        init = f"s{stage}/handoff"
    return servers


