"""Manifests: JSONL records in the reference's conversation format (or its JSON-list files).

A record::

    {"id": "...", "image": ["images/a.png"], "task": "understanding" | "generation" | "text",
     "conversations": [{"from": "human", "value": "<|image|>\\nWhat is this?"},
                       {"from": "gpt", "value": "A red circle."}],
     "source": "...", "split": "train" | "val" | "test", "meta": {...}}

Image paths resolve relative to the manifest's directory; one that leaves the data root
(``..``, absolute paths elsewhere, symlinks out) is an error, never followed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASKS = ("understanding", "generation", "text")
ROLES = ("human", "gpt")


@dataclass
class RawRow:
    """One input row exactly as read: ``raw`` is kept verbatim for the quarantine file."""

    line: int  # 1-based line (JSONL) or element index + 1 (JSON list)
    raw: str
    record: dict | None  # None when the row is not a JSON object
    parse_error: str | None = None


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Every row of a manifest, parseable or not (JSONL, or a JSON list of records)."""
    path = Path(path)
    if path.suffix == ".json":  # the reference's JSON-list files; everything else is JSONL
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: looks like a JSON list but does not parse ({err})") from None
        for i, item in enumerate(items, start=1):
            raw = json.dumps(item, ensure_ascii=False)
            yield RawRow(i, raw, item if isinstance(item, dict) else None,
                         None if isinstance(item, dict) else "not_an_object")
        return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        for i, line in enumerate(fh, start=1):
            raw = line.rstrip("\r\n")
            if not raw.strip():
                yield RawRow(i, raw, None, "empty_line")
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeEncodeError, RecursionError):
                yield RawRow(i, raw, None, "invalid_json")
                continue
            yield RawRow(i, raw, rec if isinstance(rec, dict) else None, None if isinstance(rec, dict) else "not_an_object")


def data_location(manifest: str | Path) -> str:
    """Where a manifest's relative image paths start from: a local directory, or the ``s3://``
    prefix the images stay on (a validated ``clean.jsonl`` of S3 data: readers fetch what they
    need, ``unitoken.data.remote.fetch_images``).

    A validated ``clean.jsonl`` sits beside ``dataset.json``, which records the original data
    root (rows are copied verbatim, so their paths still point there): absolute, relative to the
    sidecar (data carried inside a pipeline artifact), or an ``s3://`` prefix; any other
    manifest's root is its own directory.
    """
    manifest = Path(manifest)
    sidecar = manifest.parent / "dataset.json"
    if sidecar.is_file():
        recorded = json.loads(sidecar.read_text())["data_root"]
        if recorded.startswith("s3://"):
            return recorded
        return str((sidecar.parent.resolve() / recorded).resolve())
    return str(manifest.resolve().parent)


def data_root(manifest: str | Path) -> Path:
    """The local directory a manifest's relative image paths start from (``data_location``).

    Raises:
        ValueError: the images are on S3; fetch them first (``unitoken.data.remote``).
    """
    location = data_location(manifest)
    if location.startswith("s3://"):
        raise ValueError(f"{manifest}: its images are on {location}; fetch them first "
                         "(unitoken.data.remote.fetch_images or materialise)")
    return Path(location)


def resolve_image(rel: str, base: Path, root: Path | None = None) -> Path:
    """Absolute path of image ``rel`` (relative to ``base``).

    Raises:
        ValueError: the path escapes the data root ``root`` (default: ``base``).
    """
    base = Path(base).resolve()
    root = Path(root).resolve() if root else base
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"image path {rel!r} is not a non-empty string")
    path = (base / rel).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"image path {rel!r} escapes the data root {root}")
    return path


def load_records(path: str | Path) -> list[dict]:
    """Records of a *validated* manifest (``clean.jsonl``); any unparseable row raises."""
    out = []
    for row in read_rows(path):
        if row.record is None:
            raise ValueError(f"{path}:{row.line}: {row.parse_error}; run `unitoken data validate` first")
        out.append(row.record)
    return out
