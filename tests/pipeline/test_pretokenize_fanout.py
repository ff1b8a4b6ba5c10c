"""Pre-tokenisation fanned out by the pipeline: KFP's ParallelFor of workers, each building its own
shard range, then a merge that gives one worker's bytes; a worker cut off mid-shard resumes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from unitoken.data.pretokenize import merge, pretokenize, shard_ranges
from unitoken.data.synth import synthesize
from unitoken.data.validate import validate_manifest
from unitoken.model.io import save_model
from unitoken.pipeline.cache import write_dataset_digest

SHARD_SIZE = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny):
    """A validated data set of ~60 records (4 shards of 16), the tiny model saved, and one worker's
    pre-tokenisation of everything: the bytes every fan-out must reproduce."""
    d = tmp_path_factory.mktemp("fanout")
    synthesize(d / "data", 6, seed=5)
    validate_manifest(d / "data" / "manifest.jsonl", d / "dataset")
    write_dataset_digest(d / "dataset")
    model, tok, _ = tiny
    save_model(model, tok, d / "model")
    pretokenize(d / "dataset" / "clean.jsonl", model, d / "single", shard_size=SHARD_SIZE)
    return d, model


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_shard_ranges_are_contiguous_balanced_and_cover_everything():
    """Ranges tile [0, n) in order, sizes differ by at most one; more workers than shards get empty ranges."""
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="num_workers=0"):
        shard_ranges(3, 0)


@pytest.mark.extended  # ~35-50 s on 2 cores: three subprocesses each import torch, kfp and mlflow; make test-all
def test_two_workers_through_kfp_local_give_the_single_worker_bytes(prepared, tmp_path, monkeypatch):
    """The pipeline's own fan-out (``pretokenize_fanout``: ParallelFor of 2 workers + merge) run by
    kfp.local's SubprocessRunner: each worker wrote only its shard range, the merged output is
    byte-identical to one worker's run over the whole manifest, and every worker's MLflow run
    nests under the pipeline run (found by the job id inside the loop)."""
    from kfp import dsl, local
    from mlflow import MlflowClient

    from pipelines.unitoken_training import pretokenize_fanout

    d, _ = prepared
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=store).search_experiments()  # the tables, once, before two workers write
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    from unitoken.pipeline import steps

    job = f"fanout-{tmp_path.name}"
    parent = steps.open_pipeline_run(job, "fan-out test", {})  # what open-run does first

    @dsl.pipeline(name="pretokenize-fanout")
    def fanout():
        dataset = dsl.importer(artifact_uri=str(d / "dataset"), artifact_class=dsl.Dataset)
        model = dsl.importer(artifact_uri=str(d / "model"), artifact_class=dsl.Model)
        pretokenize_fanout(dataset.output, model.output, SHARD_SIZE, parent, job, str(tmp_path / "checkpoints"),
                           False, None, workers=2, parallelism=2)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "workspace"), raise_on_error=True)
    fanout()
    (job,) = (tmp_path / "root").iterdir()
    merged = job / "pretokenize-merge" / "tokens"
    assert _digests(merged) == _digests(d / "single")
    parts = sorted(job.glob("for-loop-*-iteration-*/pretokenize/shards"))  # each worker's output artifact
    assert len(parts) == 2
    built = [sorted(s.name for s in (p / "shards").iterdir()) for p in parts]
    assert sorted(built) == [[f"shard_{i:05d}" for i in range(a, b)] for a, b in shard_ranges(4, 2)]
    assert not list((tmp_path / "checkpoints").glob("*/pretokenize-w*"))  # work directories go once published
    assert len(list((tmp_path / "checkpoints" / "cache" / "pretokenize").iterdir())) == 2  # one entry per range
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("unitoken").experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_name for r in runs} == {"pretokenize-w0", "pretokenize-w1", "pretokenize"}


def test_a_worker_cut_off_mid_shard_resumes_where_it_stopped(prepared, tmp_path, monkeypatch):
    """Worker 1 of 2 dies while writing its second shard (a half-written shard directory is
    left); run again on the same directory it keeps the finished shard, rebuilds the cut-off one,
    and merged with worker 0 the bytes are one worker's run (whatever each one's decoding threads)."""
    import unitoken.data.pretokenize as pt

    d, model = prepared
    manifest = d / "dataset" / "clean.jsonl"
    real_save, calls = pt.save_file, []

    def dies_on_the_second_shard(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # like SIGKILL: nothing after this line runs
        real_save(tensors, path)

    monkeypatch.setattr(pt, "save_file", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(manifest, model, tmp_path / "w1", shard_size=SHARD_SIZE, worker=1, num_workers=2, threads=1)
    assert [p.name for p in (tmp_path / "w1" / "shards").iterdir() if p.name.startswith("shard_")] == ["shard_00002"]
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "w1" / "shards").iterdir())
    monkeypatch.setattr(pt, "save_file", real_save)
    again = pretokenize(manifest, model, tmp_path / "w1", shard_size=SHARD_SIZE, worker=1, num_workers=2)
    assert (again["skipped_shards"], again["first_shard"], again["last_shard"]) == (1, 2, 4)
    pretokenize(manifest, model, tmp_path / "w0", shard_size=SHARD_SIZE, worker=0, num_workers=2, threads=3)
    summary = merge([tmp_path / "w0", tmp_path / "w1"], tmp_path / "merged")
    assert summary["shards"] == 4 and _digests(tmp_path / "merged") == _digests(d / "single")


def test_merge_refuses_parts_of_other_inputs_and_gaps(prepared, tmp_path):
    """Workers made with another shard size, a missing range or a shard made twice: no index is written."""
    d, model = prepared
    manifest = d / "dataset" / "clean.jsonl"
    pretokenize(manifest, model, tmp_path / "a", shard_size=SHARD_SIZE, worker=0, num_workers=2)
    with pytest.raises(ValueError, match="shard_00002 is missing"):
        merge([tmp_path / "a"], tmp_path / "gap")
    with pytest.raises(ValueError, match="shard_00000 is in both"):
        merge([tmp_path / "a", d / "single"], tmp_path / "twice")
    pretokenize(manifest, model, tmp_path / "b", shard_size=SHARD_SIZE * 2, worker=1, num_workers=2)
    with pytest.raises(ValueError, match=r"other inputs .*\['shard_size'\]"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "mixed")
    assert not any((tmp_path / name / "index.json").exists() for name in ("gap", "twice", "mixed"))
    assert json.loads((d / "single" / "index.json").read_text())["shard_size"] == SHARD_SIZE
