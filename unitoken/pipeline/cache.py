"""Content-addressed step outputs: a re-run with unchanged inputs reuses a step's output.

KFP's own caching cannot do this for us. Its key is the task's parameter *values* and its input
artifacts' *names/URIs*, not their contents: the same ``data_uri`` with new data behind it
would be a false hit, a new upstream artifact (every run writes new URIs) is always a miss,
and a hit leaves no record in MLflow. ``kfp.local`` (2.17.3) implements the same scheme
(``local.init(enable_caching=True)``, off by default) and trusts a cached file as long as it
exists. So KFP caching is switched off on every task, and the expensive steps (tokenizer
training, pre-tokenisation, each training stage, each evaluation) cache themselves here, the
same way under ``kfp.local`` and on a cluster (the cache lives on the checkpoint volume).

**Key.** sha256 of the step name, the code (the package version and the source of every
``unitoken`` module the step's code imports, directly or not: ``code_closure``; a change to a
``--help`` text keeps every entry, a change to model or training code misses), the torch version and device type, and the step's inputs by *content*: the
validated data's digest (clean.jsonl plus every image it references), the resolved recipe
with its overrides, upstream hand-off/model digests, step parameters. Any change gives
another key, hence a recompute.

**Entry.** ``ROOT/<step>/<key>/output/`` (a copy of the step's output artifact) plus
``cache.json`` (the key, its inputs, the summary the step returned, the MLflow run that
computed it, and sha256 + size of every output file). An entry is built in a temporary
directory, ``cache.json`` is written last, and the directory is renamed into place: a killed
writer leaves only ``.tmp-*`` debris, never an entry. Before reuse every file is re-hashed;
a missing, extra or changed file, a stray file beside ``output/``, or a ``cache.json`` that is
not JSON makes the entry *corrupt*: it is moved aside and deleted, and the step recomputes. An
entry whose ``cache.json`` is missing or unreadable right now is a plain miss (it may be being
evicted or replaced): the step recomputes and its store replaces the entry.

**Eviction.** A reuse touches the entry's ``cache.json`` before re-hashing it (its mtime is the
entry's last use). With a size limit (``UNITOKEN_CACHE_MAX_GIB``, e.g. in the cluster YAML's
``env``, or ``unitoken pipeline cache --prune-gib``) the least recently used entries are
deleted after a store until the rest fit: the entry just stored, and any entry used since the
listing, stay. Only entry-shaped directories count (``<step>/<key>/`` holding ``output/`` and at
most ``cache.json``); one without its record is broken and goes once untouched for an hour.
An entry deleted while another step verifies or copies it is a miss there, and that step
recomputes (``steps.cached_step``). Eviction trouble is logged, never a failed step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
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
MIB, GIB = 2**20, 2**30
KEY_RE = re.compile(r"[0-9a-f]{64}")  # an entry's directory name: its key (cache_key)
STALE_S = 3600.0  # debris (.tmp-*, an entry without its record) older than this is deleted
FROM_ENV = object()  # StepCache(max_bytes=...) default: UNITOKEN_CACHE_MAX_GIB
_UNTOUCHABLE: set[Path] = set()  # caches whose entries' use could not be recorded (warned once)


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


def code_closure(module: str, root: Path | None = None) -> list[Path]:
    """The source files of ``module`` and of every ``unitoken`` module it imports, directly or
    through others, at the top or inside functions: the code that can change what a step
    computes. ``root`` is the directory holding the ``unitoken`` package (default: this one's)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(root, name)
        if name in seen or path is None:
            continue
        seen[name] = path
        todo += [m for m in _imported(path, name) if m.split(".")[0] == "unitoken" and m not in seen]
    return sorted(seen.values())


def _module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imported(path: Path, name: str) -> set[str]:
    """Modules ``path`` (module ``name``) imports; ``from P import x`` counts as P and as P.x (x
    may be a module)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


@functools.lru_cache(maxsize=None)
def code_digest(module: str = "unitoken.pipeline.steps", root: Path | None = None) -> str:
    """sha256 of the package version and the source of ``module``'s import closure
    (``code_closure``): a change to code a step runs invalidates its entries; a change elsewhere
    (a ``--help`` text, the rehearsal) does not."""
    from unitoken import __version__

    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    h = hashlib.sha256(f"unitoken {__version__}\n".encode())
    for p in code_closure(module, base):
        h.update(p.relative_to(base).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(step: str, inputs: dict[str, Any], module: str = "unitoken.pipeline.steps") -> str:
    """The key of ``step``'s output for ``inputs``, computed by code in ``module`` (its import
    closure is part of the key: ``code_digest``)."""
    import torch

    doc = {"format": FORMAT, "step": step, "code": code_digest(module), "torch": torch.__version__, "inputs": inputs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def compute_dataset_digest(dataset: Path, root: Path | None = None) -> str:
    """Identity of a validated Dataset: ``clean.jsonl`` and every image its rows reference, read
    under ``root`` (default: the recorded data root; data on S3 is digested where validation
    fetched it, so pass that directory)."""
    from unitoken.data.manifest import data_root

    dataset = Path(dataset)
    manifest = dataset / "clean.jsonl"
    root = Path(root) if root else data_root(manifest)
    images: set[str] = set()
    with open(manifest, encoding="utf-8") as fh:  # streamed: a manifest of millions of rows
        for line in fh:
            if line.strip():
                imgs = json.loads(line).get("image") or []
                images.update([imgs] if isinstance(imgs, str) else imgs)
    h = hashlib.sha256(b"clean.jsonl\0" + sha256_file(manifest).encode())
    for rel in sorted(images):
        h.update(b"\n" + rel.encode() + b"\0" + sha256_file(root / rel).encode())
    return h.hexdigest()


def write_dataset_digest(dataset: Path, root: Path | None = None) -> str:
    """Compute once (the validation step) and keep it in the Dataset artifact for later steps."""
    digest = compute_dataset_digest(dataset, root)
    (Path(dataset) / DIGEST_FILE).write_text(json.dumps({"data_sha256": digest}) + "\n")
    return digest


def dataset_digest(dataset: Path) -> str:
    f = Path(dataset) / DIGEST_FILE
    if f.is_file():
        return json.loads(f.read_text())["data_sha256"]
    return compute_dataset_digest(dataset)


def model_digest(model_dir: Path) -> str:
    """A hand-off's digest (its handoff.json lists every file's sha256), else every file's sha256."""
    from unitoken.model.handoff import HANDOFF, handoff_digest, verify_handoff

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
    (default: ``UNITOKEN_CACHE_MAX_GIB`` when there is a root; None: no limit)."""

    def __init__(self, root: str | Path | None, reuse: bool = True, max_bytes: int | None | object = FROM_ENV) -> None:
        self.root = Path(root) if root else None
        self.reuse = reuse
        if max_bytes is FROM_ENV:
            max_bytes = max_bytes_from_env() if self.root is not None else None
        self.max_bytes = max_bytes

    @property
    def active(self) -> bool:
        return self.root is not None

    def _dir(self, step: str, key: str) -> Path:
        return self.root / step / key

    def lookup(self, step: str, key: str) -> dict | None:
        """The verified record of a complete entry, or None (no entry, reuse off, corrupt, or
        evicted while it was read)."""
        if not self.active or not self.reuse:
            return None
        entry = self._dir(step, key)
        if not entry.is_dir():
            return None
        # a use, recorded before the re-hash (as long as the copy-out): not the first to evict meanwhile
        self._touch(entry)
        try:
            meta = self.verify(entry, key)
        except CacheCorrupt as err:
            log.warning("cache entry %s is not reusable (%s); recomputing", entry, err)
            self._discard(entry)
            return None
        except OSError as err:  # evicted by another step while we read it, or its record is gone
            log.warning("cache entry %s is not readable as a whole (%s); recomputing", entry, err)
            return None
        return meta

    @staticmethod
    def _touch(entry: Path) -> None:
        try:
            os.utime(entry / ENTRY)
        except FileNotFoundError:  # evicted just now: the verification says so
            pass
        except OSError as err:  # read-only or another owner's files: eviction goes by the time of storing
            if entry.parent.parent not in _UNTOUCHABLE:
                _UNTOUCHABLE.add(entry.parent.parent)
                log.warning("cannot record the use of cache entries under %s (%s): eviction will delete the "
                            "oldest stored first", entry.parent.parent, err)

    @staticmethod
    def verify(entry: Path, key: str) -> dict:
        """The entry's record if every file matches it. CacheCorrupt: the entry is wrong; OSError
        (a record or file missing or unreadable now): gone or going, not judged here."""
        text = (entry / ENTRY).read_text()
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            raise CacheCorrupt(f"{ENTRY} unreadable (not JSON)") from None
        stray = sorted(set(os.listdir(entry)) - {"output", ENTRY})
        if stray:
            raise CacheCorrupt(f"unexpected {stray[:3]} beside output/")
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
        """Add ``out`` as the entry for ``key`` (atomically; an existing entry is replaced), then
        evict down to ``max_bytes``."""
        if not self.active:
            return None
        base = self.root / step
        base.mkdir(parents=True, exist_ok=True)
        for stale in list(base.glob(".tmp-*")):  # a writer killed earlier; never an entry
            if self._age(stale) > STALE_S:
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
            try:
                self.prune(self.max_bytes, keep=final)
            except OSError as err:  # housekeeping: the output is computed and stored, the step goes on
                log.warning("cache %s: eviction failed (%s); it may stay above its limit", self.root, err)
        return final

    def entries(self) -> list[dict]:
        """Every entry (``ROOT/<step>/<64 hex digits>/``): {step, key, path, bytes, last_used,
        mlflow_run_id, complete, stale}, the bytes as its record lists them (nothing is
        re-hashed). An entry without a readable ``cache.json`` is incomplete (the record is
        written before the rename, so it is broken); ``stale`` when untouched for an hour.
        Nothing else counts: a directory named by a key holding ``output/`` and at most
        ``cache.json``, two levels under the root. A root one level too high finds none."""
        if not self.active or not self.root.is_dir():
            return []
        out = []
        for step_dir in sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            try:
                keys = sorted(e for e in step_dir.iterdir() if KEY_RE.fullmatch(e.name) and e.is_dir())
            except OSError:
                continue
            for entry in keys:
                try:
                    if not {"output"} <= set(os.listdir(entry)) <= {"output", ENTRY}:
                        continue  # not the shape of an entry: not the cache's to count or delete
                except OSError:  # gone, or unreadable now
                    continue
                row = {"step": step_dir.name, "key": entry.name, "path": entry}
                try:
                    meta = json.loads((entry / ENTRY).read_text())
                    row |= {"bytes": sum(int(f["size"]) for f in meta["files"].values()),
                            "last_used": (entry / ENTRY).stat().st_mtime,
                            "mlflow_run_id": meta.get("mlflow_run_id"), "complete": True, "stale": False}
                except (FileNotFoundError, ValueError, TypeError, KeyError, AttributeError):
                    age = self._age(entry)
                    if age < 0:  # gone: evicted or replaced while we listed it
                        continue
                    row |= {"bytes": 0, "last_used": 0.0, "mlflow_run_id": None, "complete": False,
                            "stale": age > STALE_S}
                except OSError:  # unreadable now (a transient error): neither counted nor deleted
                    continue
                out.append(row)
        return out

    def prune(self, max_bytes: int, keep: Path | None = None) -> list[dict]:
        """Delete entries, least recently used first, until the rest total at most ``max_bytes``;
        never ``keep`` (the entry just stored), nor one used since the listing. Incomplete
        entries untouched for an hour go whatever the total. Returns the deleted entries."""
        rows = self.entries()
        victims = [e for e in rows if not e["complete"] and e["stale"]]
        total = sum(e["bytes"] for e in rows if e["complete"])
        for e in sorted((e for e in rows if e["complete"]), key=lambda e: e["last_used"]):
            if total <= max_bytes:
                break
            if keep is None or e["path"] != Path(keep):
                victims.append(e)
                total -= e["bytes"]
        evicted, aside = [], []
        for e in victims:
            if e["complete"] and self._last_use(e["path"]) != e["last_used"]:
                continue  # used (or replaced) since the listing
            if not e["complete"] and (self._last_use(e["path"]) is not None or self._age(e["path"]) <= STALE_S):
                continue  # stored again since the listing
            moved = self._set_aside(e["path"])
            if moved is None:
                continue
            aside.append(moved)
            evicted.append(e)
            log.info("cache: evicted %s/%s (%.1f MiB, last used %s)", e["step"], e["key"][:12], e["bytes"] / MIB,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["complete"] else "never")
        for d in aside:
            self._delete(d)
        if victims or total > max_bytes:
            left = sum(e["bytes"] for e in self.entries() if e["complete"])
            if left > max_bytes:
                log.warning("cache %s holds %.1f MiB after eviction, above its limit of %.1f MiB (kept: the entry "
                            "just stored and entries in use)", self.root, left / MIB, max_bytes / MIB)
        return evicted

    @staticmethod
    def _age(path: Path) -> float:
        """Seconds since ``path`` last changed; -1 when it is gone or cannot be read (never deleted)."""
        try:
            return time.time() - path.stat().st_mtime
        except OSError:
            return -1.0

    @staticmethod
    def _last_use(entry: Path) -> float | None:
        try:
            return (entry / ENTRY).stat().st_mtime
        except OSError:
            return None

    @staticmethod
    def _set_aside(entry: Path) -> Path | None:
        """Rename ``entry`` out of the lookup path (atomic); None if it is gone or cannot move."""
        aside = entry.with_name(f".tmp-discard-{entry.name[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            entry.rename(aside)
        except FileNotFoundError:
            return None
        except OSError as err:
            log.warning("cache entry %s could not be set aside for deletion (%s)", entry, err)
            return None
        return aside

    @staticmethod
    def _delete(aside: Path) -> None:
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            log.warning("cache: %s could not be deleted completely; remove it by hand", aside)

    @classmethod
    def _discard(cls, entry: Path) -> bool:
        aside = cls._set_aside(entry)
        if aside is not None:
            cls._delete(aside)
        return aside is not None
