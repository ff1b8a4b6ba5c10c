"""What a new user gets wrong in the first hour ends in one line naming the problem and the fix,
with exit code 1 and no third-party noise (issue 37)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def unitoken(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONWARNINGS="ignore",
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"), COLUMNS="200")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "unitoken.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(errors) == 1 and len([x for x in proc.stderr.splitlines() if x.strip()]) == 1, proc.stderr
    for needle in (*needles, "fix:"):
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("first_hour")
    for args in (["data", "synth", "--out", "d", "--n", "4"], ["model", "init", "--recipe", "tiny", "--out", "m"]):
        assert unitoken(d, *args).returncode == 0
    return d


def test_an_unreachable_kfp_host_is_one_line_without_retry_warnings(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    proc = unitoken(tmp_path, "pipeline", "submit", "--host", f"http://127.0.0.1:{port}",
                    "--cluster", str(ROOT / "examples" / "cluster.yaml"), "--param", "data_uri=s3://b/d")
    one_line_error(proc, f"http://127.0.0.1:{port} does not answer", "--host")
    assert "Retrying" not in proc.stderr and "MaxRetryError" not in proc.stderr


@pytest.mark.parametrize("init,needle", [("nowhere", "no such directory"), ("d", "not a stage hand-off")])
def test_train_init_that_is_not_a_handoff_names_what_to_pass(work, init, needle):
    proc = unitoken(work, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", "s2", "--init", init,
                    "--no-track")
    one_line_error(proc, needle, "runs/stage1/handoff")


def test_pretokenize_of_a_missing_image_names_the_manifest_line(work):
    rows = (work / "d" / "manifest.jsonl").read_text().splitlines()
    import json

    gone = json.loads(rows[2])["image"]
    gone = gone[0] if isinstance(gone, list) else gone
    (work / "d" / gone).rename(work / "moved.png")
    try:
        proc = unitoken(work, "data", "pretokenize", "d/manifest.jsonl", "--model", "m", "--out", "p-bad")
    finally:
        (work / "moved.png").rename(work / "d" / gone)
    first = next(i for i, r in enumerate(rows) if gone in r) + 1
    one_line_error(proc, f"d/manifest.jsonl:{first}: image {gone!r}", "unitoken data validate")


def test_no_deepspeed_accelerator_warning_on_the_cpu(work):
    proc = unitoken(work, "train", "--dry-run", "--stage", "1", "--recipe", "tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Setting accelerator" not in proc.stderr + proc.stdout
