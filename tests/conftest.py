"""Shared fixtures: tiny random models built in-process (no hub, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.stack import KEYS, MlflowServer, SeaweedFS, _port, _wait  # noqa: F401 - re-exported to the tests

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


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """A real MLflow server (sqlite) with artifacts on a real S3 server (SeaweedFS), on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("registry")
    weed = SeaweedFS(tmp).start()
    weed.bucket("mlflow")
    ml = MlflowServer(f"sqlite:///{tmp / 'mlflow.db'}", "s3://mlflow/artifacts", s3_endpoint=weed.endpoint,
                      workers=1).start(timeout=120)
    endpoint, ml_port = weed.endpoint, ml.port
    client = weed.client()
    yield {"tmp": tmp, "uri": f"http://127.0.0.1:{ml_port}", "s3": client, "endpoint": endpoint, "backend": "sqlite"}
    ml.kill()
    weed.kill()


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


# The local pipeline as `make demo` runs it (kfp.local, the sqlite store under .unitoken/), run once
# per session: tests/pipeline/test_local_run.py checks the run; the serving and MLflow UI tests use
# its champion from that store, as a user does after `make demo`.
LOCAL_FAST = ["--param", "tokenizer_steps=3", "--param", "max_steps=2", "--param", "eval_limit=2"]
# Planted credentials: they must not appear in any MLflow record, artifact, log or output.
PLANTED = {"AWS_SECRET_ACCESS_KEY": "planted-aws-7f3c91d2e8", "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-b41e09a7c5",
           "KFP_TOKEN": "planted-kfp-55d2c8e1f0"}


def local_env(home: Path) -> dict:
    return {**os.environ, **PLANTED, "MLFLOW_TRACKING_URI": f"sqlite:///{home / '.unitoken' / 'mlflow.db'}",
            "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "UNITOKEN_ACTOR": "ci",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}


def local_unitoken(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unitoken.cli", *args], cwd=home, env=local_env(home),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def local_home(tmp_path_factory):
    return tmp_path_factory.mktemp("local-pipeline")


@pytest.fixture(scope="session")
def local_run(local_home):
    """`unitoken pipeline run --local --scenes 40 --promote` (tiny recipe, short steps) in ``local_home``."""
    proc = local_unitoken(local_home, "pipeline", "run", "--local", "--scenes", "40", "--promote", *LOCAL_FAST)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
