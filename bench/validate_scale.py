"""Validation at scale: rows/s and peak memory of ``unitoken data validate`` on a big manifest.

    python bench/validate_scale.py --rows 1000000 --dir /tmp/vscale --out runs/bench/validate_scale.json
    python bench/validate_scale.py --rows 3000 --images 50                      # smoke test

The manifest is made from a synthetic shapes data set (``unitoken data synth``): ``--images``
scenes give that many distinct PNG files (64 px) and their rows; the manifest repeats those rows
until it has ``--rows``, each made distinct by a row number appended to its last turn, so every
image is referenced by many rows (the validator checks each distinct image once: this measures
the row path, not image decoding). One row in 1,000 is an exact copy of a row 10,000 lines
earlier (found as a duplicate across chunks) and one in 10,000 references a missing image.

``--photo-rows N`` adds the other extreme: N rows, each with an image path of its own (hard links
of one real photograph, scikit-learn's 640x427 ``china.jpg``), so every row costs a full JPEG
decode, as a corpus of distinct images (the paper's captions and instructions) does.
``--distinct-rows N`` is the same with a 64 px PNG: the memory of N distinct images, quickly.
``--image-workers`` sets the validator's image threads (default: its own).

Each size runs in a fresh process that reports its own peak RSS (``ru_maxrss``), so the numbers
are the validator's, not this script's. The bound is the issue's: 2 GiB at 1,000,000 rows.
Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BOUND_MIB = 2048


def make_manifest(directory: Path, rows: int, images: int) -> Path:
    """``directory/manifest-<rows>.jsonl`` over ``images`` synthetic scenes (made once)."""
    from unitoken.data.synth import synthesize

    if not (directory / "manifest.jsonl").is_file():
        synthesize(directory, images, size=64, seed=0)
    out = directory / f"manifest-{rows}.jsonl"
    if out.is_file():
        return out
    base = [json.loads(line) for line in (directory / "manifest.jsonl").read_text().splitlines()]
    lines: list[str] = []
    with open(out.with_suffix(".tmp"), "w") as fh:
        for i in range(rows):
            if i % 1000 == 999 and i >= 10_000:
                line = lines[i - 10_000]                      # a duplicate, far from its original
            elif i % 10_000 == 5_000:
                rec = dict(base[i % len(base)], image=["images/missing.png"])
                rec["conversations"] = [{"from": "human", "value": "<|image|>\nWhat?"}, {"from": "gpt", "value": f"{i}"}]
                line = json.dumps(rec)
            else:
                rec = dict(base[i % len(base)])
                conv = [dict(t) for t in rec["conversations"]]
                conv[-1]["value"] += f" [{i}]"
                rec["conversations"] = conv
                line = json.dumps(rec)
            lines.append(line)
            if len(lines) > 10_000:
                lines[i - 10_000] = ""  # only the window the duplicates copy from stays in memory
            fh.write(line + "\n")
    out.with_suffix(".tmp").rename(out)
    return out


def make_distinct_manifest(directory: Path, rows: int, kind: str) -> Path:
    """``directory/<kind>-<rows>.jsonl``: one row per image path of its own, every path a hard
    link of one file: ``photos`` a real 640x427 JPEG, ``small`` a 64 px PNG of the synthetic set."""
    from PIL import Image

    out = directory / f"{kind}-{rows}.jsonl"
    if out.is_file():
        return out
    (directory / kind).mkdir(parents=True, exist_ok=True)
    if kind == "photos":
        from sklearn.datasets import load_sample_image

        original = directory / kind / "china.jpg"
        Image.fromarray(load_sample_image("china.jpg")).save(original, quality=90)
    else:
        original = directory / kind / "small.png"
        Image.open(next((directory / "images").rglob("*.png"))).save(original)
    with open(out.with_suffix(".tmp"), "w") as fh:
        for i in range(rows):
            link = directory / kind / f"{i:07d}{original.suffix}"
            target = original.with_name(f"{original.stem}-{i // 60_000}{original.suffix}")  # ext4: 65,000 links a file
            if not target.exists():
                shutil.copyfile(original, target)
            if not link.exists():
                os.link(target, link)
            fh.write(json.dumps({"id": f"p{i}", "image": [f"{kind}/{link.name}"], "task": "understanding",
                                 "source": kind, "split": "train", "conversations": [
                                     {"from": "human", "value": "<|image|>\nDescribe the picture."},
                                     {"from": "gpt", "value": f"A picture ({i})."}]}) + "\n")
    out.with_suffix(".tmp").rename(out)
    return out


def _child(manifest: str, out: str, chunk_rows: int, image_workers: int) -> None:
    """Validate in this process; print seconds, counts and this process's peak RSS as JSON."""
    import resource

    from unitoken.data import validate

    kwargs = ({"chunk_rows": chunk_rows} if chunk_rows else {}) | ({"image_workers": image_workers} if image_workers
                                                                    else {})
    start = time.perf_counter()
    res = validate.validate_manifest(manifest, out, **kwargs)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "input_rows": res.input_rows, "clean_rows": res.clean_rows,
                      "rejected_rows": res.rejected_rows, "reasons": res.reasons, "peak_rss_mib": peak_mib}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000000", help="comma list of manifest sizes")
    ap.add_argument("--images", type=int, default=500, help="synthetic scenes = distinct image files")
    ap.add_argument("--photo-rows", type=int, default=0, help="also: this many rows, each with its own JPEG path")
    ap.add_argument("--distinct-rows", type=int, default=0, help="also: this many rows, each its own 64 px PNG path")
    ap.add_argument("--chunk-rows", type=int, default=0, help="rows per chunk (0: the validator's default)")
    ap.add_argument("--image-workers", type=int, default=0, help="image threads (0: the validator's default)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/unitoken-validate-scale"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
    from rich.console import Console
    from rich.table import Table

    a.dir.mkdir(parents=True, exist_ok=True)
    results = []
    threads = a.image_workers or min(8, os.cpu_count() or 1)
    runs = [(int(r), make_manifest(a.dir, int(r), a.images), "synthetic") for r in a.rows.split(",") if int(r)]
    for kind, rows in (("photos", a.photo_rows), ("small", a.distinct_rows)):
        if rows:
            runs.append((rows, make_distinct_manifest(a.dir, rows, kind), kind))
    for rows, manifest, kind in runs:
        env = dict(os.environ, GX_ANALYTICS_ENABLED="false")
        done = subprocess.run([sys.executable, __file__, "--child", str(manifest), str(a.dir / f"v-{kind}-{rows}"),
                               str(a.chunk_rows), str(a.image_workers)], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        distinct = rows if kind != "synthetic" else sum(1 for _ in (a.dir / "images").rglob("*.png"))
        images = {"photos": f"{distinct:,} paths, one 640x427 JPEG", "small": f"{distinct:,} paths, one 64 px PNG",
                  "synthetic": f"{distinct:,} synthetic 64 px PNGs, repeated"}[kind]
        results.append({"rows": rows, "images": images, "distinct_images": distinct,
                        "chunk_rows": a.chunk_rows or "default", "image_threads": threads, **r, "rows_per_s": rows / r["seconds"],
                        "bound_mib": BOUND_MIB, "bound_met": r["peak_rss_mib"] <= BOUND_MIB})
    table = Table(title=f"unitoken data validate: {os.cpu_count()} CPU cores, one process, {threads} image threads")
    for col in ("rows", "images", "clean", "rejected", "seconds", "rows/s", "peak RSS MiB", f"<= {BOUND_MIB} MiB"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['rows']:,}", r["images"], f"{r['clean_rows']:,}", f"{r['rejected_rows']:,}",
                      f"{r['seconds']:.1f}", f"{r['rows_per_s']:,.0f}", f"{r['peak_rss_mib']:,.0f}",
                      "yes" if r["bound_met"] else "NO")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
