"""`pip install .` without extras is enough for `unitoken train` on the CPU: the data, model and
training commands import nothing that only the [pipeline] extra installs. A child Python sees a
copy of this venv's site-packages without the extras' packages (links to everything else), and
runs the commands a user of the core install runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what only the [pipeline] extra brings (pyproject.toml), by top-level module / distribution name
EXTRAS = re.compile(r"^(mlflow|kfp|great_expectations|kubernetes|boto3|botocore|s3transfer|tenacity|pandas|flask_wtf)"
                    r"([-_.].*)?$", re.IGNORECASE)


def _core_site(dest: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        if not EXTRAS.match(entry.name) and not entry.name.endswith(".pth") and entry.name != "__pycache__":
            (dest / entry.name).symlink_to(entry)
    return dest


def test_the_core_install_trains_on_the_cpu(tmp_path):
    site = _core_site(tmp_path / "site")
    w = tmp_path / "w"
    w.mkdir()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{site}")
    probe = subprocess.run([sys.executable, "-S", "-c", "import importlib.util as u; "
                            "print([m for m in ('mlflow', 'kfp', 'pandas', 'tenacity') if u.find_spec(m)])"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # the extras are really out of reach
    for argv in (["data", "synth", "--out", "d", "--n", "12", "--size", "32"],
                 ["model", "init", "--recipe", "tiny", "--out", "m"],
                 ["data", "pretokenize", "d/manifest.jsonl", "--model", "m", "--out", "p", "--device", "cpu"],
                 ["train", "--stage", "1", "--recipe", "tiny", "--data", "p", "--init", "m", "--out", "s1",
                  "--max-steps", "2"]):
        done = subprocess.run([sys.executable, "-S", "-m", "unitoken.cli", *argv], cwd=w, env=env,
                              capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"unitoken {' '.join(argv)}:\n{out[-3000:]}"
        assert "ModuleNotFoundError" not in out and "ImportError" not in out, out[-3000:]
    assert "not tracked: MLflow is not installed" in out  # said, not hidden
    doc = json.loads((w / "s1" / "handoff" / "handoff.json").read_text())
    assert doc["stage"] == 1 and doc["step"] == 2
