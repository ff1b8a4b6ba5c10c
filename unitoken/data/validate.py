"""``unitoken data validate``: a great-expectations suite over a manifest, with quarantine.

Every input row ends in exactly one of ``clean.jsonl`` (verbatim) or ``rejected.jsonl``
(verbatim, with its reasons): clean + rejected == input, asserted before anything is written.
Row facts (schema, roles, placeholder and image counts, duplicates, per-image checks) are
computed into a table; the great-expectations suite judges that table, and each failed
expectation's unexpected rows get that expectation's reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from unitoken.data.manifest import ROLES, TASKS, RawRow, read_rows, resolve_image
from unitoken.files import write_atomic
from unitoken.model.tokens import IMAGE_PLACEHOLDER


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


def row_facts(row: RawRow, base: Path, root: Path, policy: ValidationPolicy, cache: dict) -> dict:
    """The table row the expectation suite judges (one per input row)."""
    facts = {"parse_error": row.parse_error, "schema_error": None, "task": None, "roles_ok": True,
             "first_role_ok": True, "min_turn": 1, "max_turn": 1, "n_placeholders": 0, "n_images": 0,
             "image_error": None, "path_error": None, "dup_key": f"row-{row.line}"}
    rec = row.record
    if rec is None:
        return facts
    facts["schema_error"] = _schema_error(rec)
    if facts["schema_error"]:
        return facts
    conv = rec["conversations"]
    images = rec.get("image", [])
    images = [images] if isinstance(images, str) else images
    lengths = [len(t["value"].strip()) for t in conv]
    facts.update(
        task=rec.get("task"),
        roles_ok=all(t["from"] in ROLES for t in conv),
        first_role_ok=conv[0]["from"] == "human",
        min_turn=min(lengths), max_turn=max(lengths),
        n_placeholders=sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv),
        n_images=len(images),
        dup_key=hashlib.sha256(json.dumps([conv, images], sort_keys=True).encode()).hexdigest(),
    )
    for rel in images:
        try:
            path = resolve_image(rel, base, root)
        except ValueError:
            facts["path_error"] = "image:escapes_root"
            break
        if path not in cache:
            cache[path] = _image_error(path, policy)
        if cache[path]:
            facts["image_error"] = cache[path]
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


def validate_manifest(manifest: str | Path, out: str | Path, policy: ValidationPolicy | None = None,
                      data_root: str | Path | None = None, progress=None,
                      relative_root: bool = False) -> ValidationResult:
    """Validate ``manifest`` into ``out``/{clean.jsonl, rejected.jsonl, report.json, report.html}.

    ``relative_root``: record the data root in ``dataset.json`` relative to ``out`` (data that
    lives inside the output directory, e.g. a pipeline artifact that moves between pods)."""
    import pandas as pd

    policy = policy or ValidationPolicy()
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest")
    base = manifest.resolve().parent
    root = Path(data_root).resolve() if data_root else base
    rows = list(read_rows(manifest))
    cache: dict = {}
    facts = []
    for i, row in enumerate(rows):
        facts.append(row_facts(row, base, root, policy, cache))
        if progress:
            progress(i + 1, len(rows))
    df = pd.DataFrame(facts, columns=list(facts[0]) if facts else ["dup_key"])
    df["is_duplicate"] = df["dup_key"].duplicated(keep="first") if len(df) else []

    reasons: list[list[str]] = [[] for _ in rows]
    expectations = []
    if rows:
        result = _run_suite(df, policy)
        for r in result.results:
            reason = r.expectation_config.meta["reason"]
            bad = r.result.get("unexpected_index_list") or []
            expectations.append({"expectation": r.expectation_config.type, "reason": reason,
                                 "success": bool(r.success), "unexpected_count": len(bad)})
            detail_column = {"parse": "parse_error", "schema": "schema_error", "image": "image_error"}.get(reason)
            for idx in bad:
                label = reason if detail_column is None else str(df.at[idx, detail_column])
                reasons[int(idx)].append(f"parse:{label}" if reason == "parse" else label)
    for why in reasons:  # an unparseable row fails every other check too: report the cause only
        root_causes = [r for r in why if r.startswith(("parse:", "schema:"))]
        if root_causes:
            why[:] = root_causes
    clean = [row for row, why in zip(rows, reasons) if not why]
    rejected = [(row, sorted(set(why))) for row, why in zip(rows, reasons) if why]
    # The invariant, checked before anything is written: every row lands exactly once.
    assert len(clean) + len(rejected) == len(rows), "validation lost or duplicated rows"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "clean.jsonl", "".join(r.raw + "\n" for r in clean))
    write_atomic(out / "rejected.jsonl", "".join(
        json.dumps({"line": r.line, "reasons": why, "raw": r.raw}, ensure_ascii=False) + "\n" for r, why in rejected))
    counts = Counter(reason for _, why in rejected for reason in why)
    manifest_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    report = {
        "manifest": str(manifest.resolve()), "manifest_sha256": manifest_sha, "data_root": str(root),
        "input_rows": len(rows), "clean_rows": len(clean), "rejected_rows": len(rejected),
        "reject_fraction": len(rejected) / len(rows) if rows else 0.0,
        "reasons": dict(sorted(counts.items())), "expectations": expectations,
        "policy": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(policy).items()},
        "clean_sha256": hashlib.sha256((out / "clean.jsonl").read_bytes()).hexdigest(),
    }
    body = json.dumps(report, indent=2, sort_keys=True) + "\n"
    write_atomic(out / "report.json", body)
    sha = hashlib.sha256(body.encode()).hexdigest()
    write_atomic(out / "report.json.sha256", f"{sha}  report.json\n")
    write_atomic(out / "report.html", _html(report, rejected[:200]))
    recorded_root = os.path.relpath(root, out.resolve()) if relative_root else str(root)
    write_atomic(out / "dataset.json", json.dumps({"data_root": recorded_root, "source_manifest": str(manifest.resolve()),
                                                    "manifest_sha256": manifest_sha, "report_sha256": sha}, indent=2))
    return ValidationResult(len(rows), len(clean), len(rejected), dict(counts), out / "report.json", sha, expectations)


def _html(report: dict, rejected: list) -> str:
    from unitoken.reports import render

    return render("validation.html.j2", report=report, rejected=rejected)
