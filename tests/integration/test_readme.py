"""The README as a test: its set-up's PATH, "The `unitoken` command" and the dev deployment run from a
fresh temporary directory exactly as written (extracted from README.md, so the two cannot drift)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lines that show a form rather than a command: paths to released weights that no test machine has,
# and elided arguments. Everything else in a tested block runs.
PLACEHOLDERS = ("/models/", "...")


def bash_block(readme: str, heading: str, contains: str = "") -> list[str]:
    """The commands of the first ```bash block under ``heading`` (whose text has ``contains``):
    continuation lines joined, trailing comments dropped, placeholder forms left out."""
    section = readme.split(f"\n{heading}\n", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    block = next(b for b in blocks if contains in b)
    commands = re.sub(r"\\\n\s*", " ", block).splitlines()
    commands = [_drop_comment(c).strip() for c in commands]
    return [c for c in commands if c and not any(p in c for p in PLACEHOLDERS)]


def _drop_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a shell comment (after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def run_as_written(commands: list[str], cwd: Path, extra_env: dict | None = None) -> None:
    """Each command in bash with the venv activated, as the README's set-up says; the first failure
    raises, naming the command."""
    activate = Path(sys.executable).parent / "activate"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update({"PYTHONWARNINGS": "ignore", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **(extra_env or {})})
    for command in commands:
        proc = subprocess.run(["bash", "-c", f"source {activate} && {command}"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{proc.stderr[-2000:]}"


def test_the_setup_puts_the_commands_on_path():
    """`source .venv/bin/activate` (README) makes `unitoken`, `mlflow` and `uvicorn` the venv's."""
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    activate = Path(sys.executable).parent / "activate"
    out = subprocess.run(["bash", "-c", f"source {activate} && command -v unitoken mlflow uvicorn kubectl"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert [Path(p).parent for p in out] == [Path(sys.executable).parent] * 4


def test_the_unitoken_command_block_runs_as_written(tmp_path):
    commands = bash_block((ROOT / "README.md").read_text(), "## The `unitoken` command")
    assert [c.split()[1] for c in commands] == ["model", "model", "generate", "chat"]
    run_as_written(commands, tmp_path)
    assert (tmp_path / "g.png").stat().st_size > 0


def test_the_dev_deployment_renders_as_written(tmp_path):
    """The dev lines of the pipeline block: secrets generated, then the overlay kubectl would apply
    (no cluster here: rendered with the same kustomize, `kubectl kustomize`)."""
    block = bash_block((ROOT / "README.md").read_text(), "### The pipeline (Kubeflow)")
    dev = [c for c in block if "k8s/overlays/dev" in c]
    assert dev[0].startswith("python -m unitoken.pipeline.manifests k8s/overlays/dev --generate-dev-secrets")
    assert dev[1] == "kubectl apply -k k8s/overlays/dev"
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s", ignore=shutil.ignore_patterns("*.env"))
    run_as_written([dev[0], dev[1].replace("kubectl apply -k", "kubectl kustomize")], tmp_path)


def test_a_typo_in_the_readme_fails_the_readme_test(tmp_path):
    """The test reads the README, so a broken command there fails it: shown on a planted typo."""
    readme = (ROOT / "README.md").read_text().replace("unitoken model summary --recipe unitoken-7b",
                                                      "unitoken model sumary --recipe unitoken-7b")
    commands = bash_block(readme, "## The `unitoken` command")
    with pytest.raises(AssertionError, match="README command failed .*: unitoken model sumary"):
        run_as_written(commands, tmp_path)
