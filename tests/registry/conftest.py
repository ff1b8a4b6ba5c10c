"""The registry tests share one trained, evaluated and gated candidate (registered as "shapes")."""

import json
import shutil

import pytest

from tests.conftest import run

NAME = "unitoken"  # what the pipeline registers
FAST = ["--param", "tokenizer_steps=3", "--param", "max_steps=2", "--param", "eval_limit=2"]


@pytest.fixture(scope="session")
def registered(trained):
    servers = trained
    run(servers, "eval", "--model", "s3/handoff", "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", "e",
        "--limit", "3", "--device", "cpu", "--heldout-tokens", "p", "--heldout-limit", "4")
    run(servers, "gate", "--candidate", "e", "--out", "gate.json", inprocess=True)
    out = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
              "--name", "shapes", inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def champion(servers, registered):
    """The pipeline's own registration and promotion, tracked on the real server."""
    run(servers, "pipeline", "run", "--local", "--scenes", "40", "--promote", *FAST)
    from mlflow import MlflowClient

    return str(MlflowClient(tracking_uri=servers["uri"]).get_registered_model(NAME).aliases["champion"])


def distinct_handoff(servers, label: str) -> str:
    """A second hand-off to register beside s3/handoff (the registry keeps one version per
    hand-off): the same files, with a handoff.json of its own that says it is a copy. The copy
    names no training run (stage 3's run records the original's digest), so its lineage shows
    stage 3 without a run. Returns its path relative to the servers' directory."""
    from unitoken.files import write_json
    from unitoken.model.handoff import HANDOFF, handoff_digest

    src, rel = servers["tmp"] / "s3" / "handoff", f"copies/{label}"
    dst = servers["tmp"] / rel
    if not dst.is_dir():
        shutil.copytree(src, dst)
        doc = json.loads((src / HANDOFF).read_text())
        write_json(dst / HANDOFF, {**doc, "mlflow_run_id": None, "copy_of": handoff_digest(src), "copy_label": label})
    return rel
