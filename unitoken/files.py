"""Small file helpers shared by the data, training and pipeline code."""

from __future__ import annotations

import json
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
