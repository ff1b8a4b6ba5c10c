"""Pipeline step logic without KFP: data from real S3 (SeaweedFS), MLflow nesting, parameters."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import KEYS
from unitoken.data.remote import RemoteDataError, materialise, s3_client, upload_dir
from unitoken.pipeline import steps


@pytest.fixture
def s3_env(servers, monkeypatch):
    endpoint = servers["s3"].meta.endpoint_url
    for k, v in {**KEYS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": servers["uri"]}.items():
        monkeypatch.setenv(k, v)
    return servers


def test_validate_from_s3_keeps_the_images_on_s3(s3_env, tmp_path):
    """s3:// data is checked where it was fetched to, but the validated Dataset holds only the
    manifest and reports: it records the prefix as its data root (readers fetch what they need),
    its data digest equals that of the same data validated locally, and the step is a nested
    MLflow run. Evaluation's reader fetches the prefix once, into a directory named by the digest."""
    from mlflow import MlflowClient

    from unitoken.data.manifest import data_location
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "src", 12)
    assert upload_dir(tmp_path / "src", "s3://mlflow/datasets/shapes12") > 12
    parent = steps.open_pipeline_run("job-s3-test", "s3 test", {"case": "s3"})
    summary = steps.validate("s3://mlflow/datasets/shapes12/", tmp_path / "validated", parent)
    assert summary["rejected_rows"] == 0 and summary["clean_rows"] == summary["input_rows"] > 0
    assert data_location(tmp_path / "validated" / "clean.jsonl") == "s3://mlflow/datasets/shapes12"
    assert not any(p.suffix == ".png" for p in (tmp_path / "validated").rglob("*"))
    assert summary["data_sha256"] == steps.validate(str(tmp_path / "src"), tmp_path / "local", parent)["data_sha256"]
    root = steps.data_root(tmp_path / "validated")
    first = json.loads((tmp_path / "validated" / "clean.jsonl").read_text().splitlines()[0])
    assert (root / first["image"][0]).read_bytes() == (tmp_path / "src" / first["image"][0]).read_bytes()
    assert root.name == summary["data_sha256"][:32]
    client = MlflowClient(s3_env["uri"])
    run = client.search_runs([client.get_experiment_by_name("unitoken").experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")[-1]
    assert run.info.run_name == "validate" and run.data.metrics["clean_rows"] == summary["clean_rows"]
    assert steps.open_pipeline_run("job-s3-test", "s3 test", {}) == parent  # a retried first step finds its run
    assert steps.pipeline_run_id("job-s3-test") == parent  # what a task inside a ParallelFor looks up
    with pytest.raises(steps.StepError, match="no MLflow pipeline run"):
        steps.pipeline_run_id("job-never-opened")


def test_a_pretokenize_worker_fetches_only_the_images_of_its_shards(s3_env, tmp_path, monkeypatch, tiny):
    """Data validated from S3: worker 1 of 3 downloads exactly the images its shard range's rows
    reference (counted at the S3 client), not the corpus, and leaves no downloaded image behind."""
    import tempfile

    from unitoken.data import remote
    from unitoken.data.pretokenize import pretokenize, shard_ranges
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "src", 8, seed=2)
    upload_dir(tmp_path / "src", "s3://mlflow/datasets/shapes8")
    steps.validate("s3://mlflow/datasets/shapes8", tmp_path / "validated", "")
    records = [json.loads(x) for x in (tmp_path / "validated" / "clean.jsonl").read_text().splitlines()]
    fetched = []

    def counting_client(**kw):
        client = s3_client(**kw)
        download = client.download_file
        client.download_file = lambda bucket, key, path: (fetched.append(key), download(bucket, key, path))[1]
        return client

    monkeypatch.setattr(remote, "s3_client", counting_client)
    (tmp_path / "spool").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spool"))  # where the fetched images go
    summary = pretokenize(tmp_path / "validated" / "clean.jsonl", tiny[0], tmp_path / "w1", shard_size=8, worker=1,
                          num_workers=3)
    first, last = shard_ranges(-(-len(records) // 8), 3)[1]
    mine = {f"datasets/shapes8/{rel}" for r in records[first * 8:last * 8] for rel in r.get("image", [])}
    every = {f"datasets/shapes8/{rel}" for r in records for rel in r.get("image", [])}
    assert set(fetched) == mine and len(mine) < len(every) / 2
    assert summary["fetched_images"] == len(fetched) and summary["records"] == len(records[first * 8:last * 8])
    assert not list((tmp_path / "spool").iterdir())


def test_persistent_s3_failure_names_the_uri(tmp_path, monkeypatch):
    """An S3 endpoint that never answers: retried, then one clear error; nothing half-written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    for k, v in {**KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RemoteDataError, match="s3://bucket/data: S3 failed after retries"):
        materialise("s3://bucket/data", tmp_path / "dest", client=s3_client(max_attempts=2))
    assert not (tmp_path / "dest" / ".complete").exists()


def test_missing_local_data_and_empty_prefixes_are_clear(s3_env, tmp_path):
    with pytest.raises(RemoteDataError, match="no such file or directory"):
        materialise(str(tmp_path / "nothing"), tmp_path / "x")
    with pytest.raises(RemoteDataError, match="no objects under this prefix"):
        materialise("s3://mlflow/no-such-prefix", tmp_path / "y")


def test_too_many_rejects_fail_the_step(s3_env, tmp_path):
    """The validation step fails (the pipeline stops) when the rejected fraction is too high,
    with the counts in the message; the quarantine file is written first."""
    from unitoken.data.synth import synthesize

    synthesize(tmp_path / "d", 6)
    manifest = tmp_path / "d" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"broken": true\n')
    with pytest.raises(steps.StepError, match=r"1 of \d+ rows rejected"):
        steps.validate(str(tmp_path / "d"), tmp_path / "v", "", max_reject_fraction=0.0)
    assert len((tmp_path / "v" / "rejected.jsonl").read_text().splitlines()) == 1


def test_mixture_ratio_parameter():
    assert steps.ratio_overrides(2, "2:1") == ["train.stage2.understanding_ratio=2.0",
                                               "train.stage2.generation_ratio=1.0"]
    assert steps.ratio_overrides(2, "") == []
    for bad in ("2", "a:b", "0:0", "-1:1"):
        with pytest.raises(steps.StepError, match="mixture_ratio"):
            steps.ratio_overrides(2, bad)


def test_kubernetes_names_are_valid_and_distinct():
    names = {steps.dns_name("unitoken-training-2026-11-28-21-06-01-325385", f"stage{n}") for n in (1, 2, 3)}
    assert len(names) == 3
    for name in names | {steps.dns_name("9 Weird JOB name!" * 10)}:
        assert len(name) <= 63 and name[0].isalpha() and name.replace("-", "").isalnum() and name == name.lower()


def test_kfp_mlflow_integration_parent_run_is_reused(s3_env, monkeypatch):
    """With KFP 2.17's MLflow plugin on (KFP_MLFLOW_CONFIG names the run KFP opened for the
    pipeline run), that run is the parent: no second one is opened, steps nest under it in its
    experiment, and closing marks it; a parent unknown to our server falls back to our own."""
    from mlflow import MlflowClient

    client = MlflowClient(s3_env["uri"])
    kfp_exp = client.create_experiment("KFP-Default-test")
    kfp_run = client.create_run(kfp_exp, run_name="my run", tags={"kfp.pipeline_run_id": "uuid-1"}).info.run_id
    monkeypatch.setenv("KFP_MLFLOW_CONFIG", json.dumps({"endpoint": s3_env["uri"], "parentRunId": kfp_run,
                                                       "experimentId": kfp_exp, "authType": "none"}))
    assert steps.open_pipeline_run("uuid-1", "my run", {"recipe": "tiny"}) == kfp_run
    with steps.step_run("validate", kfp_run) as run:
        pass
    nested = client.get_run(run.run_id)
    assert nested.info.experiment_id == kfp_exp and nested.data.tags["mlflow.parentRunId"] == kfp_run
    parent = client.get_run(kfp_run)
    assert parent.data.tags[steps.PIPELINE_TAG] == "uuid-1" and parent.data.params["recipe"] == "tiny"
    assert steps.close_pipeline_run("uuid-1", "SUCCEEDED") == "FINISHED"
    assert client.get_run(kfp_run).info.status == "FINISHED"
    monkeypatch.setenv("KFP_MLFLOW_CONFIG", json.dumps({"parentRunId": "0" * 32}))
    own = steps.open_pipeline_run("uuid-2", "other run", {})
    assert own != kfp_run and client.get_run(own).data.tags[steps.PIPELINE_TAG] == "uuid-2"


def test_a_step_with_no_parent_run_id_touches_no_mlflow(monkeypatch):
    """parent_run_id None (the small study on a machine without MLflow): the step's run records
    nothing and no MLflow client is made."""
    from unitoken.tracking import store

    monkeypatch.setattr(store, "client", lambda *a: pytest.fail("an MLflow client was made"))
    with steps.step_run("validate", None, {"x": 1}) as run:
        run.params({"y": 2})
        run.metrics({"a/b": 1.0})
        run.tags({"t": "v"})
        run.artifact(__file__)
    assert run.run_id is None
