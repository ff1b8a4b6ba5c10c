"""Step-cache eviction (unitoken/pipeline/cache.py): least recently used entries go first once a
store takes the cache over its size limit; the entry just stored stays; a reuse counts as a use;
entries without a readable record go before any complete one; and a copy-out that an eviction
cuts off recomputes into a clean output."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from unitoken.pipeline.cache import GIB, MAX_GIB_ENV, StepCache


def _out(tmp: Path, name: str, size: int) -> Path:
    out = tmp / "outs" / name
    out.mkdir(parents=True)
    (out / "payload.bin").write_bytes(os.urandom(size))
    return out


def _store(cache: StepCache, tmp: Path, key: str, size: int = 1000, age_s: float = 0.0) -> Path:
    entry = cache.store("pretokenize", key, {"k": key}, _out(tmp, key, size), {"rows": 1}, f"run-{key}", "pipe")
    stamp = time.time() - age_s
    os.utime(entry / "cache.json", (stamp, stamp))
    return entry


def test_least_recently_used_entries_are_evicted_after_a_store(tmp_path):
    cache = StepCache(tmp_path / "cache", max_bytes=None)
    for key, age in (("a" * 64, 300), ("b" * 64, 200), ("c" * 64, 100)):
        _store(cache, tmp_path, key, age_s=age)
    assert cache.lookup("pretokenize", "a" * 64) is not None  # a reuse: "a" is now the most recent
    assert sum(e["bytes"] for e in cache.entries()) == 3000

    cache.max_bytes = 2500
    _store(cache, tmp_path, "d" * 64)  # 4,000 bytes: "b" and then "c" (least recently used) go
    assert sorted(e["key"][0] for e in cache.entries()) == ["a", "d"]
    assert cache.lookup("pretokenize", "b" * 64) is None and cache.lookup("pretokenize", "c" * 64) is None
    assert cache.lookup("pretokenize", "a" * 64)["mlflow_run_id"] == "run-" + "a" * 64
    assert not list((tmp_path / "cache" / "pretokenize").glob(".tmp-*"))  # nothing half-deleted left


def test_the_entry_just_stored_stays_even_alone_above_the_limit(tmp_path, caplog):
    cache = StepCache(tmp_path / "cache", max_bytes=None)
    _store(cache, tmp_path, "a" * 64, age_s=100)
    cache.max_bytes = 500
    with caplog.at_level(logging.WARNING, logger="unitoken.pipeline.cache"):
        _store(cache, tmp_path, "b" * 64, size=2000)
    assert [e["key"][0] for e in cache.entries()] == ["b"]
    assert "the newest entry alone is larger" in caplog.text


def test_entries_without_a_readable_record_go_first(tmp_path):
    cache = StepCache(tmp_path / "cache", max_bytes=None)
    _store(cache, tmp_path, "a" * 64)
    broken = tmp_path / "cache" / "pretokenize" / ("f" * 64)
    (broken / "output").mkdir(parents=True)
    (broken / "output" / "payload.bin").write_bytes(b"x" * 10)
    assert {(e["key"][0], e["complete"]) for e in cache.entries()} == {("a", True), ("f", False)}
    evicted = cache.prune(10 * GIB)  # far under the limit: only the broken entry goes
    assert [e["key"][0] for e in evicted] == ["f"] and not broken.exists()
    assert [e["key"][0] for e in cache.entries()] == ["a"]


def test_the_limit_comes_from_the_environment_and_a_bad_one_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_GIB_ENV, raising=False)
    assert StepCache(tmp_path).max_bytes is None
    monkeypatch.setenv(MAX_GIB_ENV, "0.5")
    assert StepCache(tmp_path).max_bytes == GIB // 2
    assert StepCache(tmp_path, max_bytes=123).max_bytes == 123
    for bad in ("lots", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(MAX_GIB_ENV, bad)
        with pytest.raises(ValueError, match=f"{MAX_GIB_ENV}=.*fix: set a number"):
            StepCache(tmp_path)


def test_cli_lists_and_prunes(tmp_path, capsys):
    from unitoken.cli import main

    cache = StepCache(tmp_path / "cache", max_bytes=None)
    _store(cache, tmp_path, "a" * 64, size=3 * 2**20, age_s=60)
    _store(cache, tmp_path, "b" * 64, size=2**20)
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert "a" * 16 in text and "b" * 16 in text and "2 entries" in text
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache"), "--prune-gib", str(2 / 1024)]) == 0
    text = capsys.readouterr().out
    assert "1 entries" in text and "evicted 1" in text and "a" * 16 not in text
    assert main(["pipeline", "cache", "--root", str(tmp_path / "nowhere")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_a_copy_out_cut_off_by_an_eviction_recomputes_into_a_clean_output(tmp_path, monkeypatch):
    from unitoken.pipeline import steps

    cache = StepCache(tmp_path / "cache", max_bytes=None)
    out = tmp_path / "step-out"

    def compute(tags):
        out.mkdir(parents=True, exist_ok=True)
        (out / "fresh.txt").write_text(tags["unitoken.cache"])
        return {"rows": 1}, "run-1"

    first = steps.cached_step("pretokenize", "pretokenize", lambda: {"x": 1}, out, cache, "", compute)
    assert first["cache"] == "miss"

    def cut_off(step, key, meta, dst):  # the entry vanished mid-copy: part of it is there
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "partial.bin").write_bytes(b"half")
        raise FileNotFoundError("evicted mid-copy")

    monkeypatch.setattr(cache, "restore", cut_off)
    again = steps.cached_step("pretokenize", "pretokenize", lambda: {"x": 1}, out, cache, "", compute)
    assert again["cache"] == "miss"
    assert sorted(p.name for p in out.iterdir()) == ["fresh.txt"]


def test_a_bad_limit_in_the_cluster_config_fails_at_compile_time(tmp_path):
    import yaml

    from unitoken.config import ConfigError

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml").read_text())
    assert load_cluster_env(tmp_path, doc)[MAX_GIB_ENV] == "600"  # the example sets one
    doc["cluster"]["env"][MAX_GIB_ENV] = "plenty"
    with pytest.raises(ConfigError, match=f"cluster.env.{MAX_GIB_ENV}='plenty'.*fix"):
        load_cluster_env(tmp_path, doc)


def load_cluster_env(tmp_path: Path, doc: dict) -> dict:
    import yaml

    from unitoken.pipeline.cluster import load_cluster

    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_cluster(f).env
