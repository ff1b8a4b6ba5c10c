"""The registry tests share one trained, evaluated and gated candidate (registered as "shapes")."""

import json

import pytest

from tests.conftest import run


@pytest.fixture(scope="session")
def registered(trained):
    servers = trained
    run(servers, "eval", "--model", "s3/handoff", "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", "e",
        "--limit", "3", "--device", "cpu", "--heldout-tokens", "p", "--heldout-limit", "4")
    run(servers, "gate", "--candidate", "e", "--out", "gate.json", inprocess=True)
    out = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
              "--name", "shapes", inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
