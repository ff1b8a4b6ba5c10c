"""Mixtures by source: the sampler draws sources by weight (binomial noise, exact resume), a stage
trains on a 3:1 mixture and resumes to the same draws, and the reference's data configs (META:
path, ratio) import with their meaning; bad entries fail naming the entry."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest

from tests.conftest import build_tiny
from unitoken.config import ConfigError
from unitoken.data.dataset import MixtureSampler
from unitoken.data.mixture import (
    MixtureError,
    effective_mixture,
    read_reference_config,
    reference_weights,
)
from unitoken.data.pretokenize import pretokenize
from unitoken.data.synth import synthesize
from unitoken.model.io import save_model
from unitoken.recipes import get_recipe
from unitoken.train import train as train_module
from unitoken.train.train import Stopped
from unitoken.train.train import main as train_stage

MIX = {"synth-vqa": 3.0, "synth-t2i": 1.0}


def test_the_sampler_draws_sources_by_weight_and_resumes_exactly():
    pools = ["a"] * 50 + ["b"] * 700  # the weights decide, not the records
    sampler = MixtureSampler(pools, {"a": 3, "b": 1}, seed=7, kind="sources")
    first = [next(sampler) for _ in range(2000)]
    state = json.loads(json.dumps(sampler.state_dict()))  # as a checkpoint stores it
    rest = [next(sampler) for _ in range(2000)]
    n_a = sum(1 for i in first + rest if pools[i] == "a")
    sd = math.sqrt(4000 * 0.75 * 0.25)
    assert abs(n_a - 3000) < 4 * sd, n_a  # 4 standard deviations of Binomial(4000, 3/4)
    again = MixtureSampler(pools, {"a": 3, "b": 1}, seed=7, kind="sources")
    again.load_state_dict(state)
    assert [next(again) for _ in range(2000)] == rest
    with pytest.raises(ValueError, match=r"sources \['c'\] but the data has none"):
        MixtureSampler(pools, {"a": 1, "c": 1}, kind="sources")


def test_effective_mixture_counts_records_samples_and_epochs():
    rows = {m.source: m for m in effective_mixture(["a"] * 10 + ["b"] * 40, {"a": 3, "b": 1}, draws=200)}
    assert rows["a"].records == 10 and rows["a"].samples == 150 and rows["a"].epochs == 15.0
    assert rows["b"].records == 40 and rows["b"].samples == 50 and rows["b"].epochs == 1.25


def test_bad_weights_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="source_weights: weights must be >= 0"):
        get_recipe("tiny", ["train.stage2.source_weights={synth-vqa: -1}"])
    with pytest.raises(ConfigError, match=r"names \['bogus'\], which are not among the stage's sources"):
        get_recipe("tiny", ["train.stage2.source_weights={bogus: 1}"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    synthesize(d / "d", 40, seed=2)
    model, tok, _ = build_tiny()
    save_model(model, tok, d / "m", recipe="tiny")
    pretokenize(d / "d" / "manifest.jsonl", model, d / "p", shard_size=1000)
    return d


def _stage(data, out, steps, overrides=(), save_every=1000):
    sets = ["train.stage1.sources=[]", f"train.stage1.source_weights={json.dumps(MIX)}", "train.stage1.batch_size=16",
            f"train.save_every={save_every}", "train.dropout=0", *overrides]
    return train_stage(1, get_recipe("tiny", sets), data / "p", out, data / "m", max_steps=steps, track=False,
                       show_progress=False)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class _Flag(dict):
    """The loop's SIGTERM flag, set from its ``after``-th reading (one reading a step)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.reads = after, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.reads >= self.after


@contextlib.contextmanager
def _stop_after(step: int):
    yield _Flag(step)


def test_a_stage_trains_on_a_3_to_1_mixture_and_resumes_to_the_same_draws(data, tmp_path, monkeypatch):
    _stage(data, tmp_path / "a", 30)
    rows = _rows(tmp_path / "a")
    drawn = rows[-1]["drawn"]
    n = drawn["synth-vqa"] + drawn["synth-t2i"]
    assert set(drawn) == set(MIX) and n == 30 * 16
    assert abs(drawn["synth-vqa"] - 0.75 * n) < 4 * math.sqrt(n * 0.75 * 0.25), drawn
    mixture = json.loads((tmp_path / "a" / "mixture.json").read_text())
    assert mixture["by"] == "sources"
    assert {r["source"]: r["share"] for r in mixture["sources"]} == {"synth-t2i": 0.25, "synth-vqa": 0.75}
    # stopped at step 3 (as SIGTERM stops a stage: a checkpoint, then Stopped), resumed: the draws and
    # losses of steps 4-6 are those of one uninterrupted run
    _stage(data, tmp_path / "b", 6)
    with pytest.raises(Stopped):
        with monkeypatch.context() as m:
            m.setattr(train_module, "_sigterm_flag", lambda: _stop_after(3))
            _stage(data, tmp_path / "c", 6)
    _stage(data, tmp_path / "c", 6)
    whole, resumed = _rows(tmp_path / "b"), _rows(tmp_path / "c")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["drawn"]) for r in resumed[3:]] == [(r["loss"], r["drawn"]) for r in whole[3:]]


REFERENCE = """\
# the reference's format: unitoken/configs/data/*.yaml
META:
  - path: 'vqa/record.jsonl'
    ratio: 0.5      # half of this file's records per epoch
  - path: 't2i/record.jsonl'
    ratio: 2.0      # every record twice
"""


def _reference_files(data: Path, root: Path) -> Path:
    """The synthetic manifest's vqa and t2i records as two files, and a data config naming them."""
    rows = [json.loads(x) for x in (data / "d" / "manifest.jsonl").read_text().splitlines()]
    for name, src in (("vqa", "synth-vqa"), ("t2i", "synth-t2i")):
        (root / name).mkdir(parents=True)
        (root / name / "record.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["source"] == src))
    (root / "stage2.yaml").write_text(REFERENCE)
    return root / "stage2.yaml"


def test_a_reference_data_config_imports_with_its_meaning_and_drives_a_stage(data, tmp_path, capsys):
    from unitoken.cli import main

    config = _reference_files(data, tmp_path / "ref")
    entries = read_reference_config(config)
    assert [(e.index, e.ratio) for e in entries] == [(1, 0.5), (2, 2.0)]
    records = {src: sum(1 for _ in open(tmp_path / "ref" / name / "record.jsonl"))
               for name, src in (("vqa", "synth-vqa"), ("t2i", "synth-t2i"))}
    assert reference_weights(entries) == {"synth-vqa": 0.5 * records["synth-vqa"], "synth-t2i": 2.0 * records["synth-t2i"]}
    assert main(["data", "mixture", "import", str(config), "--stage", "1"]) == 0
    assert "train.stage1.source_weights=" in capsys.readouterr().out
    assert main(["train", "--stage", "1", "--recipe", "tiny", "--data", str(data / "p"), "--init", str(data / "m"),
                 "--out", str(tmp_path / "s1"), "--max-steps", "2", "--no-track", "--mixture", str(config)]) == 0
    mixture = json.loads((tmp_path / "s1" / "mixture.json").read_text())
    weights = reference_weights(entries)
    total = sum(weights.values())
    assert {r["source"]: r["share"] for r in mixture["sources"]} == {k: round(w / total, 4) for k, w in weights.items()}


@pytest.mark.parametrize("entry,message", [
    ("  - path: 'vqa/record.jsonl'\n    ratio: 1\n    weight: 2\n", r"META entry 1: unknown key 'weight'"),
    ("  - path: 'nowhere/record.jsonl'\n    ratio: 1\n", r"META entry 1: .*nowhere/record.jsonl does not exist"),
    ("  - path: 'vqa/record.jsonl'\n    ratio: -0.5\n", r"META entry 1 \(vqa/record.jsonl\): ratio -0.5 must be"),
    ("  - 'vqa/record.jsonl'\n", r"META entry 1: expected a mapping"),
])
def test_bad_entries_fail_naming_the_entry(data, tmp_path, entry, message):
    _reference_files(data, tmp_path / "ref")
    config = tmp_path / "ref" / "bad.yaml"
    config.write_text("META:\n" + entry)
    with pytest.raises(MixtureError, match=message):
        read_reference_config(config)
