"""A stage's data mixture by source: what a stage draws from each source, and the reference's
data configs read as such a mixture.

A mixture is ``{source: weight}`` (``train.stageN.source_weights``): the sampler draws each sample's
source in proportion to the weights, then the next record of that source (reshuffled per epoch of
that source). ``effective_mixture`` says what that means for one stage's run: per source its
records, its share of the draws, the samples it gives and how many epochs of its records that is.

The UniToken reference describes each stage's data as a YAML list of files with a ``ratio``::

    META:
      - path: '/data/records_pdfa_3m/record.json'
        ratio: 0.333      # a third of this file's records per epoch
      - path: '/data/records_llava16_1.5m/record.json'
        ratio: 1.0

where ``ratio`` is the share of the file's records used per epoch (below 1 subsamples, above 1
repeats). ``read_reference_config`` reads one; ``reference_weights`` turns it into a mixture with
the same meaning: weight = ratio x records, so each file contributes ratio x its records per
epoch of the whole mixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml


class MixtureError(ValueError):
    """A data config or mixture that cannot be used; the message names the entry and the fix."""


@dataclass(frozen=True)
class SourceShare:
    """One source of a stage's effective mixture."""

    source: str
    records: int
    weight: float
    share: float  # of the stage's draws
    samples: int  # drawn over the stage's steps (expected)
    epochs: float  # of this source's records

    def as_row(self) -> dict:
        return {"source": self.source, "records": self.records, "weight": self.weight, "share": round(self.share, 4),
                "samples": self.samples, "epochs": round(self.epochs, 3)}


def effective_mixture(pools: list[str], weights: dict[str, float], draws: int) -> list[SourceShare]:
    """Per pool (source) named in ``weights``: records in ``pools`` (one pool name per record),
    the share of ``draws`` samples it gets and the epochs of its records that makes."""
    total = sum(w for w in weights.values() if w > 0)
    counts: dict[str, int] = {}
    for p in pools:
        counts[p] = counts.get(p, 0) + 1
    out = []
    for name in sorted(weights):
        w = weights[name]
        share = w / total if w > 0 else 0.0
        samples = round(share * draws)
        n = counts.get(name, 0)
        out.append(SourceShare(name, n, w, share, samples, samples / n if n else 0.0))
    return out


@dataclass(frozen=True)
class ReferenceEntry:
    """One ``META`` entry of a reference data config."""

    index: int  # 1-based, as a person counts the entries
    path: Path
    ratio: float

    def name(self) -> str:
        return f"META entry {self.index} ({self.path})"


def read_reference_config(config: str | Path, base: Path | None = None) -> list[ReferenceEntry]:
    """The ``META`` entries of a reference data config; relative paths are read against the config's
    directory (or ``base``).

    Raises:
        MixtureError: not YAML, no ``META`` list, an entry that is not a mapping, an unknown key, a
            missing ``path``, a ratio that is not a number >= 0, a file that does not exist.
    """
    config = Path(config)
    try:
        doc = yaml.safe_load(config.read_text())
    except yaml.YAMLError as err:
        raise MixtureError(f"{config}: not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("META"), list) or not doc["META"]:
        raise MixtureError(f"{config}: expected a top-level META list of {{path, ratio}} entries "
                           "(the reference's unitoken/configs/data/*.yaml)")
    unknown_top = sorted(set(doc) - {"META"})
    if unknown_top:
        raise MixtureError(f"{config}: unknown top-level key {unknown_top[0]!r}; only META is read")
    base = Path(base) if base is not None else config.parent
    entries = []
    for i, item in enumerate(doc["META"], start=1):
        where = f"{config}: META entry {i}"
        if not isinstance(item, dict):
            raise MixtureError(f"{where}: expected a mapping with path and ratio, got {type(item).__name__}")
        unknown = sorted(set(item) - {"path", "ratio"})
        if unknown:
            raise MixtureError(f"{where}: unknown key {unknown[0]!r}; an entry has path and ratio")
        if not item.get("path"):
            raise MixtureError(f"{where}: no path")
        ratio = item.get("ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
            raise MixtureError(f"{where} ({item['path']}): ratio {ratio!r} must be a number >= 0 "
                               "(the share of the file's records per epoch: 0.5 halves, 2 repeats)")
        path = Path(item["path"]) if Path(item["path"]).is_absolute() else base / item["path"]
        if not path.is_file():
            raise MixtureError(f"{where}: {path} does not exist; point path at a local manifest "
                               "(.jsonl, or the reference's record .json)")
        entries.append(ReferenceEntry(i, path, float(ratio)))
    return entries


def manifest_sources(path: Path) -> dict[str, int]:
    """{source: records} of a manifest (.jsonl rows or a .json list); a row without ``source`` counts
    under the file's stem."""
    path = Path(path)
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        rows = rows if isinstance(rows, list) else []
    else:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out: dict[str, int] = {}
    for r in rows:
        src = (r.get("source") if isinstance(r, dict) else None) or path.stem
        out[src] = out.get(src, 0) + 1
    return out


def reference_weights(entries: list[ReferenceEntry]) -> dict[str, float]:
    """A mixture with the reference's meaning: each source's weight is ratio x its records.

    Raises:
        MixtureError: an entry's file has no records, or two entries name the same source.
    """
    weights: dict[str, float] = {}
    owner: dict[str, ReferenceEntry] = {}
    for e in entries:
        counts = manifest_sources(e.path)
        if not counts:
            raise MixtureError(f"{e.name()}: no records")
        for src, n in counts.items():
            if src in owner:
                raise MixtureError(f"{e.name()}: source {src!r} is also in {owner[src].name()}; "
                                   "one source per file")
            owner[src] = e
            weights[src] = e.ratio * n
    return weights
