"""`unitoken lineage --diff A B`: two registered versions whose stage-2 mixtures differ; the diff
names the changed source weights (and the sources that came and went) and both versions' scores."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run

MIX = {"synth-vqa": 3, "synth-t2i": 1}


def _register(servers, handoff: str, eval_dir: str, name: str) -> dict:
    run(servers, "eval", "--model", handoff, "--suite", "shapes-vqa,shapes-geneval", "--data", "d", "--out", eval_dir,
        "--limit", "3", "--device", "cpu")
    run(servers, "gate", "--candidate", eval_dir, "--out", f"{eval_dir}-gate.json", inprocess=True)
    out = run(servers, "registry", "register", "--model", handoff, "--eval", eval_dir, "--gate",
              f"{eval_dir}-gate.json", "--name", name, "--force", "--reason", "diff test", inprocess=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

# ~90 s on 2 cores (two versions trained, evaluated, gated and registered): make test-all, for make
# test's 15 minutes
pytestmark = [pytest.mark.slow, pytest.mark.extended]


@pytest.fixture(scope="module")
def versions(trained):
    """Version 1: the shared run's stage 3 (stage 2 by task ratio); version 2: stage 2 on a 3:1
    mixture by source from the same stage-1 hand-off."""
    servers = trained
    run(servers, "train", "--stage", "2", "--recipe", "tiny", "--data", "p", "--out", "s2mix", "--init", "s1/handoff",
        "--max-steps", "3", "--set", "train.stage2.sources=[]", "--set", f"train.stage2.source_weights={json.dumps(MIX)}")
    a = _register(servers, "s3/handoff", "e-diff-a", "mixdiff")
    b = _register(servers, "s2mix/handoff", "e-diff-b", "mixdiff")
    return servers, [f"models:/mixdiff/{a['version']}", f"models:/mixdiff/{b['version']}"]


def test_the_diff_names_the_changed_mixture_and_both_scores(versions):
    servers, uris = versions
    doc = json.loads(run(servers, "lineage", "--diff", *uris, "--json", inprocess=True).stdout)
    stage2 = doc["stages"]["2"]
    assert stage2["mixture"]["synth-vqa"]["b"]["weight"] == 3 and stage2["mixture"]["synth-t2i"]["b"]["weight"] == 1
    assert stage2["mixture"]["synth-vqa"]["a"] is None  # version 1 mixed by task: the sources came with version 2
    assert set(stage2["sources"]["a"]) == {"generation", "understanding"}
    assert doc["stages"]["3"]["runs"]["b"] is None  # version 2 is a stage-2 model
    assert stage2["recipe"]["train.stage2.source_weights.synth-vqa"] == {"a": None, "b": "3.0"}
    assert stage2["recipe"]["train.stage2.sources"]["b"] == "[]"
    assert doc["stages"]["1"]["mixture"] == {}  # the same stage 1
    assert set(doc["scores"]) == {"shapes-vqa", "shapes-geneval"}
    assert all(doc["scores"][s]["a"]["n"] == 3 and doc["scores"][s]["b"]["n"] == 3 for s in doc["scores"])
    text = run(servers, "lineage", "--diff", *uris, inprocess=True).stdout
    assert "stage 2: mixture" in text and "evaluation (95 % interval)" in text
    assert any("synth-vqa" in line and "- -> 3" in line and "added" in line for line in text.splitlines()), text
    assert "stage 1: the same mixture" in text


def test_the_stage_run_page_shows_the_mixture_as_dataset_inputs(versions, tmp_path):
    """A stage run's inputs are its mixture (one input naming every source and its share, shown on
    the run page in a real browser) and one input per source."""
    from mlflow import MlflowClient

    from tests.registry.test_mlflow_ui import BROWSER, _browse

    servers, _ = versions
    run_id = json.loads((servers["tmp"] / "s2mix" / "handoff" / "handoff.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=servers["uri"])
    inputs = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
    assert {"source:synth-vqa", "source:synth-t2i"} <= inputs, inputs
    if BROWSER is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium-headless-shell)")
    exp = client.get_run(run_id).info.experiment_id
    page = _browse(f"{servers['uri']}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning",
                   tmp_path / "stage-run.png")
    assert "mixture synth-t2i 25%, synth-vqa 75%" in page, page[:3000]  # the first of the run's inputs
