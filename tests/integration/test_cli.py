"""The `unitoken` command end to end, as a user runs it (subprocesses, CPU)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

UNITOKEN = [sys.executable, "-m", "unitoken.cli"]


def run(*args, cwd, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run([*UNITOKEN, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"unitoken {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_init_generate_chat(tmp_path):
    """model init -> generate (a decoded PNG at the recipe resolution) -> chat (prints text)."""
    run("model", "init", "--recipe", "tiny", "--out", "m", cwd=tmp_path)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    run("generate", "--model", "m", "--prompt", "a red circle", "--out", "g.png", "--top-k", "32", cwd=tmp_path)
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    out = run("chat", "--model", "m", "--image", "g.png", "--prompt", "What is this?", "--max-new-tokens", "8",
              cwd=tmp_path)
    assert out.stdout.strip(), "chat printed nothing"


def test_model_summary_json(tmp_path):
    out = run("model", "summary", "--recipe", "unitoken-7b", "--json", cwd=tmp_path)
    counts = json.loads(out.stdout)["parameters"]
    assert counts["llm"] + counts["lm_head"] == 7_013_666_816


@pytest.mark.parametrize("args,code,needle", [
    (["model", "init", "--recipe", "tiny", "--out", "x", "--set", "model.llm.num_heads=3"], 1,
     "model.llm.hidden_size: 128 is not divisible by num_heads=3; fix:"),
    (["model", "init", "--recipe", "nope", "--out", "x"], 1, "unknown recipe"),
    (["generate", "--model", "missing", "--prompt", "p", "--out", "g.png"], 1, "not a unitoken model directory"),
    (["chat", "--model", "m", "--image", "nope.png", "--prompt", "p"], 1, "--image nope.png: no such file"),
    (["generate", "--model"], 2, "expected one argument"),
])
def test_errors_are_one_clear_line(tmp_path, monkeypatch, capsys, args, code, needle):
    from unitoken.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        got = main(args)
    except SystemExit as exit_:  # argparse usage errors
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code, err
    assert needle in " ".join(err.split())
    assert "Traceback" not in err


def test_help_has_examples(tmp_path):
    for cmd in (["model", "init"], ["generate"], ["chat"]):
        out = run(*cmd, "--help", cwd=tmp_path)
        assert "Example" in out.stdout and "unitoken" in out.stdout
