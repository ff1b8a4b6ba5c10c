"""Pre-tokenisation fan-out on the CPU: what one worker's CPU side costs per image, what the merge
costs per byte, and that N workers + merge give one worker's bytes.

    python bench/pretokenize_fanout.py --out runs/bench/pretokenize_fanout.json

Three measurements, each printed in a table (and written as JSON):

* **CPU side of a worker, per image**, at the ``unitoken-7b`` recipe's sizes: decode a real
  photograph (scikit-learn's 640x427 ``china.jpg``), the VQ input (512 px centre square) and the
  SigLIP tile (384 px): ``load_image``, on 1 and ``--threads`` threads as ``_build_shard`` runs it.
  The VQ-GAN encode itself is the GPU's (docs/performance.md); a shard is decoded, then encoded,
  so a worker's rate is about 1 / (1 / CPU side + 1 / GPU).
* **A fan-out with the tiny recipe**: one worker over everything vs ``--workers`` workers one
  after the other + ``merge``: the bytes must be equal.
* **The merge's rate** in MB/s of shards (copy + sha256 of every file, this machine's disk), on
  ``--merge-shards`` shards shaped like ``unitoken-7b``'s (``--merge-shard-images`` images each:
  int32 32x32 codes + one 384 px uint8 tile per image, random bytes) split over 2 workers.
* **Shard bytes per image** for ``unitoken-7b`` (computed from the recipe: int32 codes + one
  uint8 SigLIP tile, AnyRes off), which the merge moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path


def cpu_side(n: int, threads: int, directory: Path) -> dict:
    """Images/s of ``load_image`` (decode + VQ pixels + SigLIP tile at the unitoken-7b sizes) on
    ``threads`` threads, as ``_build_shard`` runs it."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from unitoken.data.pretokenize import load_image
    from unitoken.recipes import get_recipe

    torch.set_num_threads(1)
    cfg = get_recipe("unitoken-7b").model
    photo = directory / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=90)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: load_image(p, cfg), [photo] * n))
    seconds = time.perf_counter() - start
    per_image = 4 * cfg.vq.codes_per_side ** 2 + 3 * cfg.vision.image_size ** 2
    return {"images": n, "threads": threads, "seconds": seconds, "images_per_s": n / seconds,
            "vq_resolution": cfg.vq.resolution, "tile_size": cfg.vision.image_size, "anyres": cfg.vision.anyres,
            "shard_bytes_per_image_7b": per_image}


def fanout(scenes: int, workers: int, shard_size: int, directory: Path) -> dict:
    """One worker vs ``workers`` workers + merge on the tiny recipe: equal bytes, merge MB/s."""
    import torch

    from unitoken.data.pretokenize import merge, pretokenize
    from unitoken.data.synth import synthesize
    from unitoken.data.validate import validate_manifest
    from unitoken.model.io import init_model
    from unitoken.recipes import get_recipe

    torch.set_num_threads(2)
    synthesize(directory / "data", scenes, seed=1)
    validate_manifest(directory / "data" / "manifest.jsonl", directory / "v")
    model, _ = init_model(get_recipe("tiny").model, seed=0)
    manifest = directory / "v" / "clean.jsonl"
    one = pretokenize(manifest, model, directory / "single", shard_size=shard_size)
    parts = []
    for w in range(workers):
        pretokenize(manifest, model, directory / f"w{w}", shard_size=shard_size, worker=w, num_workers=workers)
        parts.append(directory / f"w{w}")
    merged = merge(parts, directory / "merged")

    def digests(root: Path) -> dict:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    return {"records": one["records"], "images": one["images"], "shards": merged["shards"], "workers": workers,
            "single_worker_images_per_s": one["images_per_s"],
            "identical": digests(directory / "single") == digests(directory / "merged")}


def merge_rate(shards: int, images: int, directory: Path) -> dict:
    """MB/s of ``merge`` over 7b-shaped shards (random tiles), split over two worker outputs."""
    import torch
    from safetensors.torch import save_file

    from unitoken.data.pretokenize import FORMAT, FORMAT_VERSION, merge
    from unitoken.files import write_json

    plan = {"format": FORMAT, "format_version": FORMAT_VERSION, "shard_size": images, "num_records": shards * images,
            "manifest_sha256": "bench", "codes_per_side": 32, "tile_size": 384}
    parts = [directory / "w0", directory / "w1"]
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        part = parts[s * 2 // shards]
        shard = part / "shards" / f"shard_{s:05d}"
        shard.mkdir(parents=True)
        write_json(part / "plan.json", plan)
        (shard / "records.jsonl").write_text("".join(json.dumps({"id": f"{s}-{i}"}) + "\n" for i in range(images)))
        save_file({"codes": torch.zeros((images, 32, 32), dtype=torch.int32),
                   "tiles": torch.randint(0, 256, (images, 384, 384, 3), dtype=torch.uint8, generator=g),
                   "image_slots": torch.arange(images, dtype=torch.int64),
                   "image_offsets": torch.arange(images + 1, dtype=torch.int64)}, str(shard / "images.safetensors"))
    nbytes = sum(p.stat().st_size for part in parts for p in part.rglob("*") if p.is_file())
    start = time.perf_counter()
    merge(parts, directory / "merged")
    seconds = time.perf_counter() - start
    return {"shards": shards, "images_per_shard": images, "bytes": nbytes, "seconds": seconds,
            "mb_per_s": nbytes / seconds / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="photographs through the CPU side")
    ap.add_argument("--threads", type=int, default=2, help="also measure the CPU side on this many threads")
    ap.add_argument("--scenes", type=int, default=200, help="synthetic scenes for the fan-out")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--merge-shards", type=int, default=8)
    ap.add_argument("--merge-shard-images", type=int, default=128, help="~57 MB per shard")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        cpu = [cpu_side(a.images, t, Path(tmp)) for t in sorted({1, a.threads})]
    with tempfile.TemporaryDirectory() as tmp:
        fan = fanout(a.scenes, a.workers, a.shard_size, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        rate = merge_rate(a.merge_shards, a.merge_shard_images, Path(tmp))
    console = Console(width=140)
    t = Table(title="worker CPU side at unitoken-7b sizes (decode + 512 px VQ input + 384 px tile; the VQ "
                    "encode is the GPU's)")
    for col in ("images", "threads", "seconds", "images/s", "shard bytes per image (7b)"):
        t.add_column(col, justify="right")
    for c in cpu:
        t.add_row(str(c["images"]), str(c["threads"]), f"{c['seconds']:.1f}", f"{c['images_per_s']:.0f}",
                  f"{c['shard_bytes_per_image_7b']:,}")
    console.print(t)
    t = Table(title=f"fan-out, tiny recipe on the CPU: 1 worker vs {fan['workers']} workers + merge")
    for col in ("records", "shards", "1-worker images/s (tiny VQ, CPU)", "bytes equal"):
        t.add_column(col, justify="right")
    t.add_row(str(fan["records"]), str(fan["shards"]), f"{fan['single_worker_images_per_s']:.0f}",
              "yes" if fan["identical"] else "NO")
    console.print(t)
    t = Table(title="merge of 7b-shaped shards (2 workers' outputs; copy + sha256, this disk)")
    for col in ("shards", "images/shard", "MB", "seconds", "MB/s"):
        t.add_column(col, justify="right")
    t.add_row(str(rate["shards"]), str(rate["images_per_shard"]), f"{rate['bytes'] / 1e6:.0f}",
              f"{rate['seconds']:.1f}", f"{rate['mb_per_s']:.0f}")
    console.print(t)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"cpu_side": cpu, "fanout": fan, "merge": rate}, indent=2) + "\n")


if __name__ == "__main__":
    main()
