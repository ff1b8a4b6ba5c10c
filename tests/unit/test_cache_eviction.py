"""Step-cache eviction (unitoken/pipeline/cache.py): least recently used entries go first once a
store takes the cache over its size limit; the entry just stored stays; a reuse counts as a use;
broken entries go once stale; nothing but entries is ever deleted; and an entry evicted while a
step reads it makes that step recompute into a clean output."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import pytest

from unitoken.pipeline import cache as cache_mod
from unitoken.pipeline.cache import ENTRY, GIB, MAX_GIB_ENV, STALE_S, StepCache


@pytest.fixture(autouse=True)
def no_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_GIB_ENV, raising=False)


def _out(tmp: Path, name: str, size: int) -> Path:
    out = tmp / "outs" / name
    out.mkdir(parents=True)
    (out / "payload.bin").write_bytes(os.urandom(size))
    return out


def _store(cache: StepCache, tmp: Path, key: str, size: int = 1000, age_s: float = 0.0) -> Path:
    entry = cache.store("pretokenize", key, {"k": key}, _out(tmp, key, size), {"rows": 1}, f"run-{key[0]}", "pipe")
    _age(entry / ENTRY, age_s)
    return entry


def _age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def _freeze_listing(cache: StepCache, monkeypatch) -> list[dict]:
    """The cache's listing now is what its next prune sees (as if it listed before what follows)."""
    listing, real = cache.entries(), cache.entries
    calls = iter([listing])
    monkeypatch.setattr(cache, "entries", lambda: next(calls, None) or real())
    return listing


def test_least_recently_used_entries_are_evicted_after_a_store(tmp_path):
    """Over the limit after a store: the least recently used go until the rest fit; a reuse is a use."""
    cache = StepCache(tmp_path / "cache")
    assert cache.max_bytes is None
    for key, age in (("a" * 64, 300), ("b" * 64, 200), ("c" * 64, 100)):
        _store(cache, tmp_path, key, age_s=age)
    assert cache.lookup("pretokenize", "a" * 64) is not None  # a reuse: "a" is now the most recent
    assert sum(e["bytes"] for e in cache.entries()) == 3000

    cache.max_bytes = 2500
    _store(cache, tmp_path, "d" * 64)  # 4,000 bytes: "b" and then "c" (least recently used) go
    assert sorted(e["key"][0] for e in cache.entries()) == ["a", "d"]
    assert cache.lookup("pretokenize", "b" * 64) is None and cache.lookup("pretokenize", "c" * 64) is None
    assert cache.lookup("pretokenize", "a" * 64)["mlflow_run_id"] == "run-a"
    assert not list((tmp_path / "cache" / "pretokenize").glob(".tmp-*"))  # nothing half-deleted left


@pytest.mark.parametrize("before", [0, 1])
def test_the_entry_just_stored_stays_even_alone_above_the_limit(tmp_path, caplog, before):
    """A new entry larger than the whole limit is kept (the others go), with a warning, also in
    an otherwise empty cache."""
    cache = StepCache(tmp_path / "cache")
    if before:
        _store(cache, tmp_path, "a" * 64, age_s=100)
    cache.max_bytes = 500
    with caplog.at_level(logging.WARNING, logger="unitoken.pipeline.cache"):
        _store(cache, tmp_path, "b" * 64, size=2000)
    assert [e["key"][0] for e in cache.entries()] == ["b"]
    assert "above its limit" in caplog.text


def test_eviction_trouble_is_a_warning_and_what_stays_is_not_counted_as_gone(tmp_path, monkeypatch, caplog):
    """A prune that fails does not fail the store (the output is computed); an entry that cannot
    be set aside stays and is not reported as evicted."""
    cache = StepCache(tmp_path / "cache", max_bytes=10)

    def broken(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(cache, "prune", broken)
    with caplog.at_level(logging.WARNING, logger="unitoken.pipeline.cache"):
        entry = _store(cache, tmp_path, "a" * 64)
    assert entry.is_dir() and "eviction failed" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(StepCache, "_set_aside", staticmethod(lambda entry: None))
    assert cache.prune(0) == [] and [e["key"][0] for e in cache.entries()] == ["a"]


def test_an_entry_used_since_the_listing_is_not_evicted(tmp_path, monkeypatch):
    """Eviction lists first and deletes after: an entry a reader touched in between stays."""
    cache = StepCache(tmp_path / "cache")
    _store(cache, tmp_path, "a" * 64, age_s=300)
    _store(cache, tmp_path, "b" * 64, age_s=200)
    _freeze_listing(cache, monkeypatch)
    os.utime(tmp_path / "cache" / "pretokenize" / ("a" * 64) / ENTRY)  # a reader, after the listing
    evicted = cache.prune(0)
    assert [e["key"][0] for e in evicted] == ["b"]
    assert [e["key"][0] for e in cache.entries()] == ["a"]


def test_broken_entries_go_once_stale_and_nothing_but_entries_is_ever_deleted(tmp_path):
    """An entry without its record is deleted when untouched for an hour, whatever the total; a
    root one level too high (the checkpoint root, with training checkpoints beside the cache)
    finds no entries and deletes nothing."""
    root = tmp_path / "checkpoints"
    cache = StepCache(root / "cache")
    _store(cache, tmp_path, "a" * 64)
    broken = root / "cache" / "pretokenize" / ("f" * 64)
    (broken / "output").mkdir(parents=True)
    (broken / "output" / "payload.bin").write_bytes(b"x" * 10)
    assert {(e["key"][0], e["complete"]) for e in cache.entries()} == {("a", True), ("f", False)}
    assert cache.prune(10 * GIB) == [] and broken.exists()  # young: perhaps not ours to judge yet
    _age(broken, STALE_S + 60)
    assert [e["key"][0] for e in cache.prune(10 * GIB)] == ["f"] and not broken.exists()
    assert [e["key"][0] for e in cache.entries()] == ["a"]

    ckpt = root / "job-abc" / "stage1" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.pt").write_bytes(b"weights")
    _age(ckpt, 10 * STALE_S)
    _age(ckpt.parent, 10 * STALE_S)
    named_like_a_key = root / "job-abc" / ("e" * 64)  # not an entry's shape: a file beside output/
    (named_like_a_key / "output").mkdir(parents=True)
    (named_like_a_key / "notes.txt").write_text("mine")
    _age(named_like_a_key, 10 * STALE_S)
    too_high = StepCache(root)
    assert too_high.entries() == [] and too_high.prune(0) == []
    assert (ckpt / "model.pt").is_file() and (named_like_a_key / "notes.txt").is_file()
    assert cache.lookup("pretokenize", "a" * 64) is not None


def test_a_reuse_is_recorded_before_the_re_hash(tmp_path, monkeypatch):
    """While an entry is re-hashed (as long as its copy-out) it is already the most recent."""
    cache = StepCache(tmp_path / "cache")
    entry = _store(cache, tmp_path, "a" * 64, age_s=1000)
    real, seen = cache_mod.sha256_file, []

    def watch(path):
        seen.append(time.time() - (entry / ENTRY).stat().st_mtime)
        return real(path)

    monkeypatch.setattr(cache_mod, "sha256_file", watch)
    assert cache.lookup("pretokenize", "a" * 64) is not None
    assert seen and max(seen) < 60


def test_a_broken_entry_stored_again_since_the_listing_stays(tmp_path, monkeypatch):
    """A stale broken entry that another step stores again after the listing is not deleted."""
    cache = StepCache(tmp_path / "cache")
    broken = tmp_path / "cache" / "pretokenize" / ("a" * 64)
    (broken / "output").mkdir(parents=True)
    _age(broken, STALE_S + 60)
    listing = _freeze_listing(cache, monkeypatch)
    assert [(e["key"][0], e["complete"], e["stale"]) for e in listing] == [("a", False, True)]
    _store(cache, tmp_path, "a" * 64)  # stored again (no limit on this cache: no prune of its own)
    assert cache.prune(10 * GIB) == []
    assert cache.lookup("pretokenize", "a" * 64) is not None


def test_a_stray_file_beside_output_makes_the_entry_corrupt(tmp_path):
    """verify and the listing agree on an entry's shape: junk beside output/ is never reused."""
    cache = StepCache(tmp_path / "cache")
    entry = _store(cache, tmp_path, "a" * 64)
    (entry / "notes.txt").write_text("x")
    assert cache.lookup("pretokenize", "a" * 64) is None and not entry.exists()


def test_an_entry_evicted_while_it_is_verified_is_a_miss_not_a_crash(tmp_path, monkeypatch):
    """Another step evicts the entry while this one re-hashes it: a miss (recompute), no error."""
    cache = StepCache(tmp_path / "cache")
    entry = _store(cache, tmp_path, "a" * 64)
    real = cache_mod.sha256_file

    def evict_first(path):
        StepCache._discard(entry)
        return real(path)

    monkeypatch.setattr(cache_mod, "sha256_file", evict_first)
    assert cache.lookup("pretokenize", "a" * 64) is None
    assert not entry.exists()


def test_the_limit_comes_from_the_environment_and_a_bad_one_names_the_fix(tmp_path, monkeypatch):
    """UNITOKEN_CACHE_MAX_GIB sets the limit of a cache with a root; a bad value names the fix."""
    assert StepCache(tmp_path).max_bytes is None
    monkeypatch.setenv(MAX_GIB_ENV, "0.5")
    assert StepCache(tmp_path).max_bytes == GIB // 2
    assert StepCache(tmp_path, max_bytes=123).max_bytes == 123
    assert StepCache(tmp_path, max_bytes=None).max_bytes is None
    for bad in ("lots", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(MAX_GIB_ENV, bad)
        with pytest.raises(ValueError, match=f"{MAX_GIB_ENV}=.*fix: set a number"):
            StepCache(tmp_path)
        assert StepCache(None).max_bytes is None  # no cache: the limit is not read


def test_cli_lists_and_prunes(tmp_path, monkeypatch):
    """`unitoken pipeline cache` lists the entries; --prune-gib evicts; a wrong root is named."""
    from rich.console import Console

    from unitoken.cli import main
    from unitoken.cli import pipeline as command

    buf = io.StringIO()
    monkeypatch.setattr(command, "console", Console(file=buf, width=200))
    cache = StepCache(tmp_path / "cache")
    _store(cache, tmp_path, "a" * 64, size=3 * 2**20, age_s=60)
    _store(cache, tmp_path, "b" * 64, size=2**20)
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache")]) == 0
    text = buf.getvalue()
    assert "a" * 16 in text and "b" * 16 in text and "2 entries" in text
    buf.truncate(0)
    buf.seek(0)
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache"), "--prune-gib", str(2 / 1024)]) == 0
    text = buf.getvalue()
    assert "1 entries" in text and "evicted 1" in text and "a" * 16 not in text
    buf.truncate(0)
    buf.seek(0)
    assert main(["pipeline", "cache", "--root", str(tmp_path)]) == 0  # one level too high
    assert "no cache entries" in buf.getvalue() and cache.lookup("pretokenize", "b" * 64) is not None
    assert main(["pipeline", "cache", "--root", str(tmp_path / "nowhere")]) == 1
    with pytest.raises(ValueError, match="--prune-gib inf: expected a size in GiB"):
        command._cache(tmp_path / "cache", float("inf"))
    buf.truncate(0)
    buf.seek(0)
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache"), "--prune-gib", "0"]) == 0
    assert main(["pipeline", "cache", "--root", str(tmp_path / "cache")]) == 0  # emptied, but the right root
    assert "0 entries" in buf.getvalue() and "no cache entries" not in buf.getvalue()


def test_a_copy_out_cut_off_by_an_eviction_recomputes_into_a_clean_output(tmp_path, monkeypatch):
    """The entry vanishes mid-copy: no part of the copy stays beside the recomputed output."""
    from unitoken.pipeline import steps

    cache = StepCache(tmp_path / "cache")
    out = tmp_path / "step-out"

    def compute(tags):
        out.mkdir(parents=True, exist_ok=True)
        (out / "fresh.txt").write_text(tags["unitoken.cache"])
        return {"rows": 1}, "run-1"

    first = steps.cached_step("pretokenize", "pretokenize", lambda: {"x": 1}, out, cache, "", compute)
    assert first["cache"] == "miss"

    def cut_off(step, key, meta, dst):
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "partial.bin").write_bytes(b"half")
        raise FileNotFoundError("evicted mid-copy")

    monkeypatch.setattr(cache, "restore", cut_off)
    again = steps.cached_step("pretokenize", "pretokenize", lambda: {"x": 1}, out, cache, "", compute)
    assert again["cache"] == "miss"
    assert sorted(p.name for p in out.iterdir()) == ["fresh.txt"]


def test_a_bad_limit_in_the_cluster_config_fails_at_compile_time(tmp_path):
    """A bad UNITOKEN_CACHE_MAX_GIB in the cluster YAML's env is a ConfigError naming the fix."""
    import yaml

    from unitoken.config import ConfigError
    from unitoken.pipeline.cluster import load_cluster

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "cluster.yaml").read_text())
    f = tmp_path / "cluster.yaml"
    f.write_text(yaml.safe_dump(doc))
    assert load_cluster(f).env[MAX_GIB_ENV] == "600"  # the example sets one
    doc["cluster"]["env"][MAX_GIB_ENV] = "plenty"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=f"cluster.env.{MAX_GIB_ENV}='plenty'.*fix"):
        load_cluster(f)
