"""``unitoken data validate``: a great-expectations suite over a manifest, with quarantine.

Every input row ends in exactly one of ``clean.jsonl`` (verbatim) or ``rejected.jsonl``
(verbatim, with its reasons): clean + rejected == input, asserted before the files are put in
place. Row facts (schema, roles, placeholder and image counts, duplicates, per-image checks) are
computed into a table; the great-expectations suite judges that table, and each failed
expectation's unexpected rows get that expectation's reason.

Memory is bounded: the manifest is streamed in chunks of ``chunk_rows`` rows, each chunk's table
is judged by the same suite and the results are summed into one report. What outlives a chunk is
per *distinct* item, not per row: 16 bytes of sha256 per distinct row for duplicate detection
across chunks and per distinct image for its verdict (each image is checked once, the new ones of
a chunk on ``image_workers`` threads): ~100 MB per million of each, plus the first 200 rejected
rows for the HTML report. ``bench/validate_scale.py`` measures it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from unitoken.data.manifest import ROLES, TASKS, RawRow, read_rows, resolve_image
from unitoken.files import sha256_file, write_atomic
from unitoken.model.tokens import IMAGE_PLACEHOLDER

CHUNK_ROWS = 20_000  # rows per great-expectations batch: ~100 MB of row facts and results
REPORT_SAMPLE = 200  # rejected rows shown in report.html


@dataclass
class ValidationPolicy:
    min_turn_chars: int = 1
    max_turn_chars: int = 8192
    min_image_side: int = 16
    max_image_side: int = 8192
    max_image_pixels: int = 40_000_000  # decompression bombs are refused before decoding
    image_modes: tuple[str, ...] = ("RGB", "RGBA", "L", "LA", "P")


@dataclass
class ValidationResult:
    input_rows: int
    clean_rows: int
    rejected_rows: int
    reasons: dict[str, int]
    report_path: Path
    report_sha256: str
    expectations: list[dict] = field(default_factory=list)

    @property
    def reject_fraction(self) -> float:
        return self.rejected_rows / self.input_rows if self.input_rows else 0.0


# --------------------------------------------------------------------------- row facts


def _schema_error(rec: dict) -> str | None:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "schema:conversations"
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            return "schema:turn"
    images = rec.get("image", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return "schema:image"
    for key in ("task", "source", "split"):
        if key in rec and not isinstance(rec[key], str):
            return f"schema:{key}"
    return None


def _image_error(path: Path, policy: ValidationPolicy) -> str | None:
    if not path.is_file():
        return "image:missing"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > policy.max_image_pixels or max(w, h) > policy.max_image_side:
                return "image:too_large"
            if min(w, h) < policy.min_image_side:
                return "image:too_small"
            if im.mode not in policy.image_modes:
                return "image:bad_mode"
            im.load()  # full decode: truncated and corrupt files fail here
    except Image.DecompressionBombError:
        return "image:too_large"
    except Exception:  # noqa: BLE001 - any decoder failure is the same verdict: undecodable
        return "image:undecodable"
    return None


class ImageVerdicts:
    """The verdict of every distinct image, each checked once: keyed by 16 bytes of sha256 of its
    resolved path (~100 bytes per distinct image, whatever the path's length). ``check`` runs the
    new ones of a batch on a thread pool: PIL decodes without holding the GIL."""

    def __init__(self, policy: ValidationPolicy) -> None:
        self.policy = policy
        self._known: dict[bytes, str | None] = {}

    @staticmethod
    def _key(path: Path) -> bytes:
        return hashlib.sha256(os.fsencode(path)).digest()[:16]

    def check(self, paths: list[Path], pool=None) -> None:
        new: dict[bytes, Path] = {}
        for path in paths:
            key = self._key(path)
            if key not in self._known:
                new.setdefault(key, path)
        verdicts = (pool.map if pool and len(new) > 1 else map)(lambda p: _image_error(p, self.policy), new.values())
        self._known.update(zip(new, verdicts))

    def __getitem__(self, path: Path) -> str | None:
        key = self._key(path)
        if key not in self._known:
            self._known[key] = _image_error(path, self.policy)
        return self._known[key]


def _image_list(rec: dict) -> list:
    images = rec.get("image", [])
    return [images] if isinstance(images, str) else images


def _resolved_images(row: RawRow, base: Path, root: Path) -> list[Path]:
    """The resolved paths ``row_facts`` will look up for this row (none for a row it rejects first)."""
    if row.record is None or _schema_error(row.record):
        return []
    paths = []
    for rel in _image_list(row.record):
        try:
            paths.append(resolve_image(rel, base, root))
        except ValueError:
            break
    return paths


def row_facts(row: RawRow, base: Path, root: Path, policy: ValidationPolicy, verdicts: ImageVerdicts) -> dict:
    """The table row the expectation suite judges (one per input row)."""
    facts = {"parse_error": row.parse_error, "schema_error": None, "task": None, "roles_ok": True,
             "first_role_ok": True, "min_turn": 1, "max_turn": 1, "n_placeholders": 0, "n_images": 0,
             "image_error": None, "path_error": None, "dup_key": None}
    rec = row.record
    if rec is None:
        return facts
    facts["schema_error"] = _schema_error(rec)
    if facts["schema_error"]:
        return facts
    conv = rec["conversations"]
    images = _image_list(rec)
    lengths = [len(t["value"].strip()) for t in conv]
    facts.update(
        task=rec.get("task"),
        roles_ok=all(t["from"] in ROLES for t in conv),
        first_role_ok=conv[0]["from"] == "human",
        min_turn=min(lengths), max_turn=max(lengths),
        n_placeholders=sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv),
        n_images=len(images),
        # 16 bytes of sha256 per distinct row is what duplicate detection keeps across chunks
        dup_key=hashlib.sha256(json.dumps([conv, images], sort_keys=True).encode()).digest()[:16],
    )
    for rel in images:
        try:
            path = resolve_image(rel, base, root)
        except ValueError:
            facts["path_error"] = "image:escapes_root"
            break
        if verdicts[path]:
            facts["image_error"] = verdicts[path]
            break
    return facts


# --------------------------------------------------------------------------- the suite


def _suite(policy: ValidationPolicy):
    import great_expectations as gx

    E = gx.expectations
    checks = [
        (E.ExpectColumnValuesToBeNull(column="parse_error"), "parse"),
        (E.ExpectColumnValuesToBeNull(column="schema_error"), "schema"),
        (E.ExpectColumnValuesToNotBeNull(column="task"), "task:missing"),
        (E.ExpectColumnValuesToBeInSet(column="task", value_set=list(TASKS)), "task:unknown"),
        (E.ExpectColumnValuesToBeInSet(column="roles_ok", value_set=[True]), "role:unknown"),
        (E.ExpectColumnValuesToBeInSet(column="first_role_ok", value_set=[True]), "role:first_not_human"),
        (E.ExpectColumnValuesToBeBetween(column="min_turn", min_value=policy.min_turn_chars), "turn:empty"),
        (E.ExpectColumnValuesToBeBetween(column="max_turn", max_value=policy.max_turn_chars), "turn:too_long"),
        (E.ExpectColumnPairValuesToBeEqual(column_A="n_placeholders", column_B="n_images"), "placeholder_mismatch"),
        (E.ExpectColumnValuesToBeNull(column="path_error"), "image:escapes_root"),
        (E.ExpectColumnValuesToBeNull(column="image_error"), "image"),
        (E.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[False]), "duplicate"),
    ]
    suite = gx.ExpectationSuite(name="unitoken-manifest")
    for exp, reason in checks:
        exp.meta = {"reason": reason}
        suite.add_expectation(exp)
    return suite


_GX: dict = {}


def _run_suite(df, policy: ValidationPolicy):
    """Validate ``df`` with the suite; the ephemeral context is built once per process."""
    import logging

    import great_expectations as gx

    key = tuple(sorted(vars(policy).items()))
    if key not in _GX:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = {"globally": False}
        name = f"manifest{len(_GX)}"
        definition = ctx.data_sources.add_pandas(name).add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
        _GX[key] = (definition, _suite(policy))
    definition, suite = _GX[key]
    return definition.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format="COMPLETE")


# --------------------------------------------------------------------------- entry point


def _chunks(rows: Iterator[RawRow], size: int) -> Iterator[list[RawRow]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


class _Judged:
    """The suite's verdicts summed over chunks: per expectation (in suite order) success and
    unexpected count, and the reasons of each row of the current chunk."""

    DETAIL_COLUMN = {"parse": "parse_error", "schema": "schema_error", "image": "image_error"}

    def __init__(self) -> None:
        self.expectations: list[dict] = []

    def judge(self, df, policy: ValidationPolicy) -> list[list[str]]:
        reasons: list[list[str]] = [[] for _ in range(len(df))]
        result = _run_suite(df, policy)
        for i, r in enumerate(result.results):
            reason = r.expectation_config.meta["reason"]
            bad = r.result.get("unexpected_index_list") or []
            if i == len(self.expectations):
                self.expectations.append({"expectation": r.expectation_config.type, "reason": reason,
                                          "success": True, "unexpected_count": 0})
            total = self.expectations[i]
            total["success"] = total["success"] and bool(r.success)
            total["unexpected_count"] += len(bad)
            detail_column = self.DETAIL_COLUMN.get(reason)
            for idx in bad:
                label = reason if detail_column is None else str(df.at[idx, detail_column])
                reasons[int(idx)].append(f"parse:{label}" if reason == "parse" else label)
        for why in reasons:  # an unparseable row fails every other check too: report the cause only
            root_causes = [r for r in why if r.startswith(("parse:", "schema:"))]
            if root_causes:
                why[:] = root_causes
        return reasons


def validate_manifest(manifest: str | Path, out: str | Path, policy: ValidationPolicy | None = None,
                      data_root: str | Path | None = None, progress=None, recorded_root: str | None = None,
                      chunk_rows: int = CHUNK_ROWS, image_workers: int | None = None) -> ValidationResult:
    """Validate ``manifest`` into ``out``/{clean.jsonl, rejected.jsonl, report.json, report.html}.

    Args:
        data_root: images must stay under it (default: the manifest's directory).
        progress: ``progress(rows_done, None)`` after each chunk (the row count is not known ahead).
        recorded_root: the data root that ``dataset.json`` and the report record, when it is not
            the local ``data_root`` the images were checked in: a path relative to ``out`` (data
            carried inside a pipeline artifact) or the ``s3://`` prefix they were fetched from.
        chunk_rows: rows per great-expectations batch; the result does not depend on it.
        image_workers: threads that check a chunk's new images (default: the CPU count, at most
            8); the result does not depend on it.

    Raises:
        FileNotFoundError: no such manifest.
        ValueError: ``chunk_rows`` < 1.
    """
    import pandas as pd

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: must be >= 1")
    policy = policy or ValidationPolicy()
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest")
    base = manifest.resolve().parent
    root = Path(data_root).resolve() if data_root else base
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    workers = image_workers or min(8, os.cpu_count() or 1)
    verdicts = ImageVerdicts(policy)  # each distinct image is checked once
    seen: set[bytes] = set()  # 16-byte digests of the rows so far: duplicates across chunks
    judged = _Judged()
    counts: Counter = Counter()
    n_input = n_clean = n_rejected = 0
    sample: list = []       # the first rejected rows, for report.html
    clean_sha = hashlib.sha256()
    clean_tmp, rejected_tmp = out / "clean.jsonl.tmp", out / "rejected.jsonl.tmp"
    with (open(clean_tmp, "wb") as clean_fh, open(rejected_tmp, "wb") as rejected_fh,
          ThreadPoolExecutor(workers) as pool):
        for chunk in _chunks(read_rows(manifest), chunk_rows):
            verdicts.check([p for row in chunk for p in _resolved_images(row, base, root)],
                           pool if workers > 1 else None)
            facts = [row_facts(row, base, root, policy, verdicts) for row in chunk]
            df = pd.DataFrame(facts, columns=list(facts[0]))
            duplicate = []
            for key in df["dup_key"]:
                duplicate.append(key is not None and key in seen)
                if key is not None:
                    seen.add(key)
            df["is_duplicate"] = duplicate
            for row, why in zip(chunk, judged.judge(df, policy)):
                if why:
                    why = sorted(set(why))
                    counts.update(why)
                    n_rejected += 1
                    if len(sample) < REPORT_SAMPLE:
                        sample.append((row, why))
                    rejected_fh.write(_encode(json.dumps({"line": row.line, "reasons": why, "raw": row.raw},
                                                         ensure_ascii=False) + "\n"))
                else:
                    n_clean += 1
                    data = _encode(row.raw + "\n")
                    clean_sha.update(data)
                    clean_fh.write(data)
            n_input += len(chunk)
            if progress:
                progress(n_input, None)
    # The invariant, checked before the files are put in place: every row landed exactly once.
    assert n_clean + n_rejected == n_input, "validation lost or duplicated rows"
    clean_tmp.replace(out / "clean.jsonl")
    rejected_tmp.replace(out / "rejected.jsonl")

    manifest_sha = sha256_file(manifest)
    remote = bool(recorded_root and recorded_root.startswith("s3://"))  # name what was fetched, not the copy
    shown_root = recorded_root if remote else str(root)
    source = f"{recorded_root}/{manifest.name}" if remote else str(manifest.resolve())
    report = {
        "manifest": source, "manifest_sha256": manifest_sha, "data_root": shown_root,
        "input_rows": n_input, "clean_rows": n_clean, "rejected_rows": n_rejected,
        "reject_fraction": n_rejected / n_input if n_input else 0.0,
        "reasons": dict(sorted(counts.items())), "expectations": judged.expectations,
        "policy": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(policy).items()},
        "clean_sha256": clean_sha.hexdigest(),
    }
    body = json.dumps(report, indent=2, sort_keys=True) + "\n"
    write_atomic(out / "report.json", body)
    sha = hashlib.sha256(body.encode()).hexdigest()
    write_atomic(out / "report.json.sha256", f"{sha}  report.json\n")
    write_atomic(out / "report.html", _html(report, sample))
    write_atomic(out / "dataset.json", json.dumps({"data_root": recorded_root or str(root),
                                                    "source_manifest": source,
                                                    "manifest_sha256": manifest_sha, "report_sha256": sha}, indent=2))
    return ValidationResult(n_input, n_clean, n_rejected, dict(counts), out / "report.json", sha, judged.expectations)


def _encode(text: str) -> bytes:
    """Rows are written back byte for byte (undecodable bytes were read as surrogate escapes)."""
    return text.encode("utf-8", errors="surrogateescape")


def _html(report: dict, rejected: list) -> str:
    from unitoken.reports import render

    return render("validation.html.j2", report=report, rejected=rejected)
