"""Small file helpers shared by the data, training and pipeline code."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old file
    or the whole new one, never a half-written one (a killed writer leaves only ``*.tmp``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    tmp.replace(path)


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as indented, key-sorted JSON, written atomically (see ``write_atomic``)."""
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def scoped_env(name: str, value: str | None) -> Iterator[None]:
    """Set environment variable ``name`` to ``value`` (None or "": leave it) for the block, then
    restore what was there before (or remove it)."""
    saved = os.environ.get(name)
    if value:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def unitoken_home() -> Path:
    """Where local state lives (the default MLflow store, the local pipeline's root, caches):
    ``UNITOKEN_HOME`` (a relative value resolves against the working directory), else the
    ``.unitoken/`` of the unitoken checkout the working directory is in, else ``~/.unitoken``.
    One store per checkout or user, wherever a command is run from (before: ``./.unitoken`` of the
    working directory, so a command run from /tmp wrote a second, empty store there)."""
    if os.environ.get("UNITOKEN_HOME"):
        return Path(os.environ["UNITOKEN_HOME"]).expanduser().resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "unitoken" / "__init__.py").is_file():
            return d / ".unitoken"
    return Path.home() / ".unitoken"
