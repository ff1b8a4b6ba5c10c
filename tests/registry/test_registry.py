"""Registry, promotion, lineage against a real MLflow server with artifacts on real S3 (SeaweedFS)."""

import json

import pytest

from tests.conftest import run
from tests.registry.conftest import distinct_handoff

pytestmark = pytest.mark.slow


def _history(servers):
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=servers["uri"]).get_registered_model("shapes").tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("unitoken.history.champion.")]


def test_register_promote_history_rollback_lineage_chat(servers, registered):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["uri"])
    assert registered["version"] == "1"
    assert client.get_registered_model("shapes").aliases == {"challenger": "1"}
    objects = [o["Key"] for o in servers["s3"].list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in objects), "model weights are not on S3"
    run(servers, "registry", "promote", "shapes", "--version", "1", "--expect-current", "none", inprocess=True)
    v2 = json.loads(run(servers, "registry", "register", "--model", distinct_handoff(servers, "v2"), "--eval", "e",
                        "--gate", "gate.json", "--name", "shapes", inprocess=True).stdout.strip().splitlines()[-1])
    run(servers, "registry", "promote", "shapes", "--version", v2["version"], "--expect-current", "1",
        "--reason", "better", inprocess=True)
    assert client.get_registered_model("shapes").aliases["champion"] == "2"
    run(servers, "registry", "rollback", "shapes", inprocess=True)
    assert client.get_registered_model("shapes").aliases["champion"] == "1"
    moves = _history(servers)
    assert [(m["action"], m["from"], m["to"]) for m in moves] == [("promote", None, "1"), ("promote", "1", "2"),
                                                                  ("rollback", "2", "1")]
    assert moves[1]["who"] == "ci" and moves[1]["reason"] == "better"
    out = run(servers, "registry", "history", "shapes", inprocess=True)
    assert "rollback" in out.stdout
    lin = json.loads(run(servers, "lineage", "models:/shapes@champion", "--json", inprocess=True).stdout)
    assert lin["ok"] and lin["aliases"] == ["champion"]
    kinds = [e["kind"] for e in lin["passport"]]
    assert kinds == ["data", "stage", "stage", "stage", "eval", "gate", "build"]
    assert [e["stage"] for e in lin["passport"] if e["kind"] == "stage"] == [1, 2, 3]
    assert all(e["mlflow_run_id"] for e in lin["passport"] if e["kind"] == "stage")
    assert lin["passport"][0]["validation_report_sha256"]
    chat = run(servers, "chat", "--model", "models:/shapes@champion", "--image", "d/images/train/s000000.png",
               "--prompt", "What is this?", "--max-new-tokens", "4", "--device", "cpu")
    assert chat.returncode == 0


def test_racing_promotions_exactly_one_wins(servers, registered):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["uri"])
    v3 = json.loads(run(servers, "registry", "register", "--model", distinct_handoff(servers, "racing"), "--eval", "e",
                        "--gate", "gate.json", "--name", "shapes", inprocess=True).stdout.strip().splitlines()[-1])["version"]
    current = client.get_registered_model("shapes").aliases.get("champion")
    before = len(_history(servers))
    procs = [run(servers, "registry", "promote", "shapes", "--version", v3, "--expect-current", str(current),
                 "--reason", f"racer {i}", popen=True) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "ConflictError" in loser
    assert len(_history(servers)) == before + 1
    assert client.get_registered_model("shapes").aliases["champion"] == v3


def test_tampered_artifact_breaks_lineage_and_promotion(servers, registered):
    s3 = servers["s3"]
    run_id = registered["run_id"]
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]
               if run_id in o["Key"] and o["Key"].endswith("eval/report.json"))
    original = s3.get_object(Bucket="mlflow", Key=key)["Body"].read()
    s3.put_object(Bucket="mlflow", Key=key, Body=original.replace(b'"overall": ', b'"overall": 0.99 + '))
    try:
        lin = run(servers, "lineage", f"models:/shapes/{registered['version']}", check=False, inprocess=True)
        assert lin.returncode == 1
        assert "stored evaluation report does not match the passport" in " ".join(lin.stdout.split())
        promo = run(servers, "registry", "promote", "shapes", "--version", registered["version"], check=False,
                    inprocess=True)
        assert promo.returncode == 1 and "refusing to promote" in " ".join(promo.stderr.split())
    finally:
        s3.put_object(Bucket="mlflow", Key=key, Body=original)
    # a flipped byte in the stored weights
    weights = next(o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]
                   if registered["model_id"] in o["Key"] and o["Key"].endswith("model.safetensors"))
    blob = bytearray(s3.get_object(Bucket="mlflow", Key=weights)["Body"].read())
    blob[-1] ^= 0x01
    s3.put_object(Bucket="mlflow", Key=weights, Body=bytes(blob))
    try:
        lin = run(servers, "lineage", f"models:/shapes/{registered['version']}", check=False, inprocess=True)
        assert lin.returncode == 1 and "model.safetensors is corrupted" in " ".join(lin.stdout.split())
    finally:
        blob[-1] ^= 0x01
        s3.put_object(Bucket="mlflow", Key=weights, Body=bytes(blob))


def test_a_registered_handoff_registers_nothing_new_and_says_which_version_it_is(servers, registered):
    """Registering s3/handoff again (a re-run whose steps were all cache hits): no new version,
    no registration run, no alias moved; the command names the version it already is."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=servers["uri"])
    before = client.search_model_versions("name='shapes'")
    aliases = client.get_registered_model("shapes").aliases
    runs = client.search_runs([client.get_experiment_by_name("unitoken").experiment_id],
                              "attributes.run_name = 'register-shapes'")
    again = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate.json",
                "--name", "shapes", inprocess=True)
    info = json.loads(again.stdout.strip().splitlines()[-1])
    assert info["duplicate"] and info["version"] == registered["version"] and info["run_id"] == registered["run_id"]
    assert f"already models:/shapes/{registered['version']}" in " ".join(again.stdout.split())
    assert len(client.search_model_versions("name='shapes'")) == len(before)
    assert client.get_registered_model("shapes").aliases == aliases
    assert len(client.search_runs([client.get_experiment_by_name("unitoken").experiment_id],
                                  "attributes.run_name = 'register-shapes'")) == len(runs)


def test_a_pipeline_rerun_of_a_registered_model_reports_its_version_and_moves_no_alias(servers, registered, monkeypatch):
    """The pipeline's register step on a hand-off already registered (every step a cache hit):
    even with --promote no alias moves; its run and the run's summary name the existing version."""
    from mlflow import MlflowClient

    from pipelines.launch import summarize
    from tests.conftest import _env
    from unitoken.pipeline import steps

    for k, v in _env(servers).items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=servers["uri"])
    aliases = client.get_registered_model("shapes").aliases
    parent = steps.open_pipeline_run("rerun-job", "rerun-job", {"recipe": "tiny"})
    tmp = servers["tmp"]
    info = steps.register(tmp / "s3" / "handoff", tmp / "e", tmp / "gate.json", "shapes", parent, promote=True)
    assert info["duplicate"] and info["version"] == registered["version"] and info["alias"] is None
    assert client.get_registered_model("shapes").aliases == aliases
    summary = summarize("rerun-job", "shapes")
    assert summary["duplicate_of"] == registered["version"]
    assert summary["model_uri"] == f"models:/shapes/{registered['version']}"


def test_register_refuses_failed_gate_without_force(servers, registered, tmp_path):
    decision = json.loads((servers["tmp"] / "gate.json").read_text())
    failed = servers["tmp"] / "gate_failed.json"
    failed.write_text(json.dumps({**decision, "passed": False, "reasons": ["generation below margin"]}))
    proc = run(servers, "registry", "register", "--model", "s3/handoff", "--eval", "e", "--gate", "gate_failed.json",
               "--name", "shapes", check=False, inprocess=True)
    assert proc.returncode == 1 and "the gate did not pass (generation below margin)" in proc.stderr
    forced = run(servers, "registry", "register", "--model", distinct_handoff(servers, "forced"), "--eval", "e",
                 "--gate", "gate_failed.json", "--name", "shapes", "--force", "--reason", "hotfix approved by on-call",
                 inprocess=True)
    version = json.loads(forced.stdout.strip().splitlines()[-1])["version"]
    lin = json.loads(run(servers, "lineage", f"models:/shapes/{version}", "--json", inprocess=True).stdout)
    gate = next(e for e in lin["passport"] if e["kind"] == "gate")
    assert gate["passed"] is False and gate["forced_reason"] == "hotfix approved by on-call"


def test_eval_reports_the_heldout_loss_beside_the_scores_and_the_gate_never_reads_it(registered, trained):
    """`unitoken eval --heldout-tokens`: the loss per task on the test split is in report.json,
    heldout.jsonl and the HTML, not in the metrics or items the gate reads as scores."""
    e = trained["tmp"] / "e"
    report = json.loads((e / "report.json").read_text())
    held = report["heldout"]
    assert held["split"] == "test" and set(held) >= {"understanding", "generation"}
    assert all(0 < held[t]["mean"] < 20 and 1 <= held[t]["n"] <= 4 for t in ("understanding", "generation"))
    rows = [json.loads(x) for x in (e / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == held["understanding"]["n"] + held["generation"]["n"]
    assert not any("heldout" in k for k in report["metrics"])
    assert {json.loads(x)["suite"] for x in (e / "items.jsonl").read_text().splitlines()} == {"shapes-vqa",
                                                                                            "shapes-geneval"}
    assert "Held-out loss" in (e / "report.html").read_text()
    assert json.loads((trained["tmp"] / "gate.json").read_text())["passed"] is True


def test_lineage_diff_of_two_versions_of_one_training_chain_changes_nothing_but_the_hand_off(servers, registered):
    """`unitoken lineage --diff` in make test (the changed-mixture case, two more trained versions, is
    tests/registry/test_lineage_diff.py in make test-all): version 1 against a copy of its hand-off
    registered beside it: the same stages 1 and 2 (mixture and recipe), stage 3 without a run on the
    copy's side (the copy names none, so its recipe fields are unknown, not changed), both versions'
    scores, equal."""
    v2 = json.loads(run(servers, "registry", "register", "--model", distinct_handoff(servers, "v2"), "--eval", "e",
                        "--gate", "gate.json", "--name", "shapes", inprocess=True).stdout.strip().splitlines()[-1])
    uris = [f"models:/shapes/{registered['version']}", f"models:/shapes/{v2['version']}"]
    doc = json.loads(run(servers, "lineage", "--diff", *uris, "--json", inprocess=True).stdout)
    assert doc["a"]["version"] == registered["version"] and doc["b"]["version"] == v2["version"]
    assert set(doc["stages"]) == {"1", "2", "3"} and not doc["commit_changed"]
    assert all(doc["stages"][n]["mixture"] == {} and doc["stages"][n]["recipe"] == {} for n in ("1", "2"))
    assert doc["stages"]["3"]["runs"]["a"] and doc["stages"]["3"]["runs"]["b"] is None
    assert doc["recipe"] and all(v["b"] is None for v in doc["recipe"].values())  # unknown on b's side
    assert set(doc["scores"]) == {"shapes-vqa", "shapes-geneval"}
    assert all(doc["scores"][s]["a"] == doc["scores"][s]["b"] for s in doc["scores"])
    text = run(servers, "lineage", "--diff", *uris, inprocess=True).stdout
    assert "evaluation (95 % interval)" in text
