"""Content-addressed step outputs: a re-run with unchanged inputs reuses a step's output (issue 9).

KFP's own caching cannot do this for us. Its key is the task's parameter *values* and its input
artifacts' *names/URIs*, not their contents: the same ``data_uri`` with new data behind it
would be a false hit, a new upstream artifact (every run writes new URIs) is always a miss,
and a hit leaves no record in MLflow. ``kfp.local`` (2.17.3) implements the same scheme
(``local.init(enable_caching=True)``, off by default) and trusts a cached file as long as it
exists. So KFP caching is switched off on every task, and the expensive steps (tokenizer
training, pre-tokenisation, each training stage, each evaluation) cache themselves here, the
same way under ``kfp.local`` and on a cluster (the cache lives on the checkpoint volume).

**Key.** sha256 of the step name, the code (every ``unitoken/**/*.py`` file and the package
version), the torch version and device type, and the step's inputs by *content*: the
validated data's digest (clean.jsonl plus every image it references), the resolved recipe
with its overrides, upstream hand-off/model digests, step parameters. Any change gives
another key, hence a recompute.

**Entry.** ``ROOT/<step>/<key>/output/`` (a copy of the step's output artifact) plus
``cache.json`` (the key, its inputs, the summary the step returned, the MLflow run that
computed it, and sha256 + size of every output file). An entry is built in a temporary
directory, ``cache.json`` is written last, and the directory is renamed into place: a killed
writer leaves only ``.tmp-*`` debris, never an entry. Before reuse every file is re-hashed;
a missing, extra or changed file, or an unreadable ``cache.json``, makes the entry *corrupt*:
it is moved aside and deleted, and the step recomputes.

**Eviction.** A reuse touches the entry's ``cache.json`` (its mtime is the entry's last use).
With a size limit (``UNITOKEN_CACHE_MAX_GIB``, e.g. in the cluster YAML's ``env``, or
``unitoken pipeline cache --prune-gib``) the least recently used entries are deleted after a
store until the rest fit; the entry just stored is always kept. An entry deleted while another
step copies it out fails that copy, and that step recomputes (``steps.cached_step``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from unitoken.files import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
ENTRY = "cache.json"
DIGEST_FILE = "data_digest.json"
MAX_GIB_ENV = "UNITOKEN_CACHE_MAX_GIB"
GIB = 2**30


class CacheCorrupt(ValueError):
    """A cache entry's files do not match its record (never reused)."""


def tree_files(root: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "size"}} of every file under ``root`` (symlinks refused)."""
    root = Path(root)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise CacheCorrupt(f"{p}: symbolic link in a step output")
        if p.is_file():
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the package's source files and version: any code change invalidates every entry."""
    from unitoken import __version__

    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"unitoken {__version__}\n".encode())
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(step: str, inputs: dict[str, Any]) -> str:
    import torch

    doc = {"format": FORMAT, "step": step, "code": code_digest(), "torch": torch.__version__, "inputs": inputs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def compute_dataset_digest(dataset: Path) -> str:
    """Identity of a validated Dataset: ``clean.jsonl`` and every image its rows reference."""
    from unitoken.data.manifest import data_root

    dataset = Path(dataset)
    manifest = dataset / "clean.jsonl"
    root = data_root(manifest)
    images: set[str] = set()
    for line in manifest.read_text().splitlines():
        if line.strip():
            imgs = json.loads(line).get("image") or []
            images.update([imgs] if isinstance(imgs, str) else imgs)
    h = hashlib.sha256(b"clean.jsonl\0" + sha256_file(manifest).encode())
    for rel in sorted(images):
        h.update(b"\n" + rel.encode() + b"\0" + sha256_file(root / rel).encode())
    return h.hexdigest()


def write_dataset_digest(dataset: Path) -> str:
    """Compute once (the validation step) and keep it in the Dataset artifact for later steps."""
    digest = compute_dataset_digest(dataset)
    (Path(dataset) / DIGEST_FILE).write_text(json.dumps({"data_sha256": digest}) + "\n")
    return digest


def dataset_digest(dataset: Path) -> str:
    f = Path(dataset) / DIGEST_FILE
    if f.is_file():
        return json.loads(f.read_text())["data_sha256"]
    return compute_dataset_digest(dataset)


def model_digest(model_dir: Path) -> str:
    """A hand-off's digest (its handoff.json lists every file's sha256), else every file's sha256."""
    from unitoken.train.checkpoint import HANDOFF, handoff_digest, verify_handoff

    if (Path(model_dir) / HANDOFF).is_file():
        verify_handoff(model_dir)  # the digest must stand for the files that are there
    return handoff_digest(Path(model_dir))


def max_bytes_from_env(env=None) -> int | None:
    """The size limit of ``UNITOKEN_CACHE_MAX_GIB`` in bytes (unset or empty: no limit)."""
    text = (os.environ if env is None else env).get(MAX_GIB_ENV, "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not gib > 0 or gib == float("inf"):
        raise ValueError(f"{MAX_GIB_ENV}={text!r}: expected a size in GiB above 0, e.g. 200; "
                         "fix: set a number, or unset it for no limit")
    return int(gib * GIB)


class StepCache:
    """The cache under ``root`` (empty: no cache). ``reuse=False`` (``--no-cache``): never reuse,
    but still store what is computed, so the next run with caching on can reuse it.
    ``max_bytes``: evict the least recently used entries after a store until the rest fit
    (default: ``UNITOKEN_CACHE_MAX_GIB``, unset: no limit)."""

    def __init__(self, root: str | Path | None, reuse: bool = True, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root else None
        self.reuse = reuse
        self.max_bytes = max_bytes if max_bytes is not None else max_bytes_from_env()

    @property
    def active(self) -> bool:
        return self.root is not None

    def _dir(self, step: str, key: str) -> Path:
        return self.root / step / key

    def lookup(self, step: str, key: str) -> dict | None:
        """The verified record of a complete entry, or None (no entry, reuse off, or corrupt)."""
        if not self.active or not self.reuse:
            return None
        entry = self._dir(step, key)
        if not entry.is_dir():
            return None
        try:
            meta = self.verify(entry, key)
        except CacheCorrupt as err:
            log.warning("cache entry %s is not reusable (%s); recomputing", entry, err)
            self._discard(entry)
            return None
        try:
            os.utime(entry / ENTRY)  # last use: eviction deletes the least recently used first
        except OSError:  # evicted by another step just now: its copy-out will fail and recompute
            pass
        return meta

    @staticmethod
    def verify(entry: Path, key: str) -> dict:
        try:
            meta = json.loads((entry / ENTRY).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CacheCorrupt(f"{ENTRY} unreadable ({type(err).__name__})") from None
        if meta.get("key") != key or meta.get("format") != FORMAT:
            raise CacheCorrupt(f"{ENTRY} is for another key or format")
        have = tree_files(entry / "output") if (entry / "output").is_dir() else {}
        want = meta.get("files", {})
        if set(have) != set(want):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise CacheCorrupt(f"files missing {missing[:3]} / unexpected {extra[:3]}")
        for name, rec in want.items():
            if have[name] != rec:
                raise CacheCorrupt(f"{name} changed (sha256 {have[name]['sha256'][:12]} != {rec['sha256'][:12]})")
        return meta

    def restore(self, step: str, key: str, meta: dict, out: Path) -> None:
        """Copy a verified entry into ``out`` and check the copy against the record."""
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(self._dir(step, key) / "output", out)
        copied = tree_files(out)
        if copied != meta["files"]:
            raise CacheCorrupt(f"copy of cache entry {step}/{key[:12]} into {out} differs from its record")

    def store(self, step: str, key: str, inputs: dict, out: Path, summary: dict, mlflow_run_id: str | None,
              pipeline_run_id: str | None) -> Path | None:
        """Add ``out`` as the entry for ``key`` (atomically; an existing entry is replaced)."""
        if not self.active:
            return None
        base = self.root / step
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(".tmp-*"):  # a writer killed earlier; never an entry
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = base / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(out, tmp / "output")
        meta = {"format": FORMAT, "key": key, "step": step, "inputs": inputs, "summary": summary,
                "mlflow_run_id": mlflow_run_id, "pipeline_run_id": pipeline_run_id,
                "created_unix": round(time.time(), 3), "files": tree_files(tmp / "output")}
        (tmp / ENTRY).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        final = self._dir(step, key)
        if final.exists():
            self._discard(final)
        try:
            tmp.rename(final)
        except OSError:  # another writer of the same key won the rename: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        if self.max_bytes is not None:
            self.prune(self.max_bytes, keep=final)
        return final

    def entries(self) -> list[dict]:
        """Every entry: {step, key, path, bytes, last_used, mlflow_run_id, complete}, the bytes as
        its record lists them (nothing is re-hashed). An entry whose ``cache.json`` cannot be
        read is incomplete by construction (the record is written before the rename)."""
        if not self.active or not self.root.is_dir():
            return []
        out = []
        for step_dir in sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for entry in sorted(e for e in step_dir.iterdir() if e.is_dir() and not e.name.startswith(".tmp-")):
                try:
                    meta = json.loads((entry / ENTRY).read_text())
                    row = {"bytes": sum(int(f["size"]) for f in meta.get("files", {}).values()),
                           "last_used": (entry / ENTRY).stat().st_mtime, "mlflow_run_id": meta.get("mlflow_run_id"),
                           "complete": True}
                except FileNotFoundError:
                    if not entry.exists():  # evicted or replaced while we listed it
                        continue
                    row = {"bytes": 0, "last_used": 0.0, "mlflow_run_id": None, "complete": False}
                except (OSError, ValueError, TypeError, KeyError, AttributeError):
                    row = {"bytes": 0, "last_used": 0.0, "mlflow_run_id": None, "complete": False}
                out.append({"step": step_dir.name, "key": entry.name, "path": entry, **row})
        return out

    def prune(self, max_bytes: int, keep: Path | None = None) -> list[dict]:
        """Delete entries, least recently used first, until the rest total at most ``max_bytes``;
        never ``keep`` (the entry just stored). Entries without a readable record go first.
        Returns the deleted entries."""
        rows = sorted(self.entries(), key=lambda e: (e["complete"], e["last_used"]))
        total = sum(e["bytes"] for e in rows)
        evicted = []
        for e in rows:
            if total <= max_bytes and e["complete"]:
                break
            if keep is not None and e["path"] == Path(keep):
                continue
            self._discard(e["path"])
            total -= e["bytes"]
            evicted.append(e)
            log.info("cache: evicted %s/%s (%.1f MiB, last used %s)", e["step"], e["key"][:12], e["bytes"] / 2**20,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["complete"] else "never")
        if total > max_bytes:
            log.warning("cache %s holds %.2f GiB after eviction, above its limit of %.2f GiB: the newest entry "
                        "alone is larger", self.root, total / GIB, max_bytes / GIB)
        return evicted

    @staticmethod
    def _discard(entry: Path) -> None:
        aside = entry.with_name(f".tmp-discard-{entry.name[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(aside)
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)
