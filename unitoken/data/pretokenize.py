"""``unitoken data pretokenize``: VQ codes and continuous-path pixels, sharded and resumable.

Layout of ``OUT``::

    plan.json                       what this run is (manifest digest, model digest, shard size);
                                    a resume with different inputs is refused
    shards/shard_00000/records.jsonl    the records, verbatim, in manifest order
    shards/shard_00000/images.safetensors      every distinct image of the shard once:
        codes         int32 [n_images, h, w]   VQ codes
        tiles         uint8 [n_tiles, s, s, 3] SigLIP input tiles (base + AnyRes), already resized
        tile_offsets  int64 [n_images + 1]
        grids         int64 [n_images, 2]      AnyRes (rows, cols); (0, 0) = base only
        sizes         int64 [n_images, 2]      original (width, height): AnyRes cuts its padding by it
        image_slots   int64 [n_record_images]  the stored image of each image a record shows
        image_offsets int64 [n_records + 1]    images of record i: image_slots[image_offsets[i]:image_offsets[i+1]]
    index.json                      shards, counts and sha256 of every file (written last)

A shard is built in a temporary directory and renamed into place, so a killed run leaves
either a whole shard or none; a restart skips finished shards. Output is deterministic:
the same inputs give byte-identical files.

Fan-out: ``pretokenize(..., worker=i, num_workers=n)`` builds the contiguous shard range ``i`` of
``n`` (``shard_ranges``) and no index; ``merge`` of the ``n`` outputs gives the same bytes as one
run over everything (the pipeline runs the workers in a ``dsl.ParallelFor``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from unitoken.config import config_hash
from unitoken.data.manifest import data_location, load_records, read_rows, resolve_image
from unitoken.data.remote import fetch_images
from unitoken.files import sha256_file, write_json
from unitoken.model.devices import pick_device
from unitoken.model.vision import preprocess_continuous, vq_pixels

FORMAT = "unitoken-shards"
# 2: AnyRes tiles are resized-and-padded (1 stretched them) and the image sizes are stored.
# 3: a shard stores each distinct image once (records of one scene share it: 10x less disk on the
# synthetic data, 3.6 GB written for 807 images at 7B shapes in 2) and records point at it.
FORMAT_VERSION = 3


def _tiles_uint8(tiles: torch.Tensor) -> torch.Tensor:
    """[n, 3, s, s] in [-1, 1] -> [n, s, s, 3] uint8 (exactly invertible for 8-bit images)."""
    return ((tiles + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _encode_as_decoded(vq, loaded: Iterator, batch_size: int, device: torch.device, keep: list) -> torch.Tensor:
    """VQ-encode images batch by batch as the decoding threads deliver them, so that decoding the
    next images overlaps encoding these (and only a batch of float pixels is held at a time).
    ``loaded`` yields ``load_image`` results in order; each is appended to ``keep`` without its
    pixels. Codes are computed in the model's encode_dtype, exactly as evaluation, chat and
    serving encode (``vq.encode``)."""
    out, pending = [], []

    def flush() -> None:
        batch = torch.stack(pending).to(device, non_blocking=True)
        out.append(vq.encode(batch).to(torch.int32).cpu())
        pending.clear()

    for pixels, *rest in loaded:
        pending.append(pixels)
        keep.append((None, *rest))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return torch.cat(out) if out else torch.zeros((0,), dtype=torch.int32)


class ImageError(ValueError):
    """An image of a record could not be read; pretokenize names the manifest line."""

    def __init__(self, rel: str, err: Exception) -> None:
        super().__init__(f"image {rel!r}: {type(err).__name__}: {err}")
        self.rel, self.err = rel, err


def load_image(path: Path, cfg) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The CPU side of one image: (VQ pixels [3, r, r], SigLIP tiles uint8 [n, s, s, 3], AnyRes grid,
    original (width, height)) for a model config ``cfg``."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        pixels = vq_pixels(im, cfg.vq.resolution)
        t, grid = preprocess_continuous(im, cfg.vision)
        return pixels, _tiles_uint8(t), grid, im.size


def _build_shard(records: list[dict], root: Path, model, batch_size: int, device: torch.device,
                 threads: int = 1) -> tuple[int, dict]:
    """(distinct images decoded and encoded, the shard's tensors)."""
    cfg = model.config
    # Records of one scene share its image (caption, questions, prompt, dialogue): each distinct
    # path is decoded, resized, VQ-encoded and stored once per shard; records point at it.
    distinct: dict[str, int] = {}
    for rec in records:
        paths = rec.get("image", [])
        for rel in [paths] if isinstance(paths, str) else paths:
            distinct.setdefault(rel, len(distinct))
    # Decoding and resizing is the CPU side of a worker (~13 ms an image at 512/384 px on one
    # core, slower than the GPU's encode): on ``threads`` threads (PIL and torch release the GIL),
    # in order, so the bytes do not depend on the thread count, and encoded batch by batch while
    # the threads decode the next images.
    def load(rel: str):
        try:
            return load_image(resolve_image(rel, root), cfg)
        except (OSError, ValueError) as err:  # missing, unreadable, escaping the data root
            raise ImageError(rel, err) from err

    loaded: list = []
    with ThreadPoolExecutor(threads) as pool:
        codes = _encode_as_decoded(model.vq, pool.map(load, distinct), batch_size, device, loaded)
    slots, image_offsets = [], [0]
    for rec in records:
        paths = rec.get("image", [])
        slots += [distinct[rel] for rel in ([paths] if isinstance(paths, str) else paths)]
        image_offsets.append(len(slots))
    tiles = [t for _, t, _, _ in loaded]
    tile_offsets = [0]
    for t in tiles:
        tile_offsets.append(tile_offsets[-1] + t.shape[0])
    s, side = cfg.vision.image_size, cfg.vq.codes_per_side
    return len(distinct), {
        "codes": codes.reshape(len(distinct), side, side),
        "tiles": torch.cat(tiles) if tiles else torch.zeros((0, s, s, 3), dtype=torch.uint8),
        "tile_offsets": torch.tensor(tile_offsets, dtype=torch.int64),
        "grids": torch.tensor([g for _, _, g, _ in loaded], dtype=torch.int64).reshape(-1, 2),
        "sizes": torch.tensor([z for _, _, _, z in loaded], dtype=torch.int64).reshape(-1, 2),
        "image_slots": torch.tensor(slots, dtype=torch.int64),
        "image_offsets": torch.tensor(image_offsets, dtype=torch.int64),
    }


def shard_ranges(num_shards: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous shard ranges ``[first, last)`` of ``num_workers`` workers, sizes differing by at
    most one (a worker beyond the shard count gets an empty range)."""
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: must be >= 1")
    base, extra = divmod(num_shards, num_workers)
    bounds = [0]
    for w in range(num_workers):
        bounds.append(bounds[-1] + base + (w < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def pretokenize(manifest: str | Path, model, out: str | Path, shard_size: int = 1024, batch_size: int = 64,
                device: str = "auto", progress=None, worker: int = 0, num_workers: int = 1,
                s3_client=None, threads: int | None = None) -> dict:
    """Pre-tokenise a validated manifest with ``model`` (a loaded ``UniToken``).

    With ``num_workers`` > 1 this builds only the shards of range ``worker`` (``shard_ranges``)
    into ``out`` (plan.json + those shards, no index.json): ``merge`` puts the workers' outputs
    together into what one worker writes. Images on S3 (a manifest validated from ``s3://``)
    are fetched shard by shard into a temporary directory: only the images of this worker's shards.
    Images are decoded and resized on ``threads`` threads (default: the CPU count, at most 16);
    the bytes do not depend on it.

    Returns:
        summary {"records", "images", "shards", "skipped_shards", "encoded_images", "distinct_images",
        "seconds", "compile_s", "images_per_s", "first_shard", "last_shard", "fetched_images"};
        "records"/"images" count this worker's shards, "encoded_images" the images records show
        (one per record that shows it), "distinct_images" those decoded, VQ-encoded and stored,
        which "images_per_s" is the rate of over "seconds" (the shard loop; "compile_s", the
        encoder's one-time compilation before it, is apart).

    Raises:
        ValueError: ``out`` holds a run with a different manifest, model or shard size.
    """
    import tempfile

    manifest, out = Path(manifest), Path(out)
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be >= 1")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker={worker}: must be in [0, num_workers={num_workers})")
    dev = torch.device(pick_device(device))
    threads = threads or min(16, os.cpu_count() or 1)
    model.vq.to(dev)
    compile_s = model.vq.warm_up(dev)  # a compiled encoder (cfg.vq.encode_compiled) compiles once, here
    n_records = count_records(manifest)
    n_shards = num_shards(n_records, shard_size)
    first, last = shard_ranges(n_shards, num_workers)[worker]
    records = _load_range(manifest, first * shard_size, last * shard_size)  # this worker's records only
    location = data_location(manifest)
    plan = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "manifest_sha256": sha256_file(manifest),
        "vq_sha256": _module_digest(model.vq), "vq_config": config_hash(model.config.vq),
        "vision_config": config_hash(model.config.vision), "shard_size": shard_size, "num_records": n_records,
        "codes_per_side": model.config.vq.codes_per_side, "tile_size": model.config.vision.image_size,
        "validation_report_sha256": _validation_report(manifest),
    }
    (out / "shards").mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(f"{out} holds a pre-tokenisation of different inputs (differs in {diff}); "
                             "use a new --out or delete it")
    else:
        write_json(plan_path, plan)
    for stale in (out / "shards").glob(".tmp-*"):  # left by a killed run: never a shard
        shutil.rmtree(stale)

    done_images, distinct, skipped, fetched, start = 0, 0, 0, 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unitoken-images-") as spool:
        for s in range(first, last):
            final = out / "shards" / f"shard_{s:05d}"
            if final.is_dir():
                skipped += 1
            else:
                chunk = records[(s - first) * shard_size : (s - first + 1) * shard_size]
                if location.startswith("s3://"):  # this shard's images only, then they go again
                    root = Path(spool) / f"{s:05d}"
                    fetched += fetch_images(location, _image_paths(chunk), root, client=s3_client)
                else:
                    root = Path(location)
                try:
                    decoded, tensors = _build_shard(chunk, root, model, batch_size, dev, threads)
                except ImageError as err:
                    at = next(j for j, r in enumerate(chunk) if err.rel in _image_paths([r]))
                    n = s * shard_size + at + 1  # the record's number; its line in a .jsonl manifest
                    where = f"{manifest}:{n}" if manifest.suffix != ".json" else f"{manifest} record {n}"
                    raise ValueError(f"{where}: {err}; nothing of shard {s} was written; fix: run "
                                     "`unitoken data validate` on the manifest first (it quarantines rows whose "
                                     "image is missing or unreadable) and pre-tokenise its clean.jsonl") from None
                distinct += decoded
                if root != Path(location):
                    shutil.rmtree(root, ignore_errors=True)
                tmp = out / "shards" / f".tmp-{s:05d}-{os.getpid()}"
                tmp.mkdir()
                (tmp / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in chunk))
                save_file(tensors, str(tmp / "images.safetensors"))
                tmp.rename(final)
                done_images += int(tensors["image_slots"].shape[0])
            if progress:
                progress(s - first + 1, last - first)
    seconds = time.perf_counter() - start
    counts = [_shard_counts(out / "shards" / f"shard_{s:05d}") for s in range(first, last)]
    if num_workers == 1:
        write_index(out)
    return {"records": sum(c[0] for c in counts), "images": sum(c[1] for c in counts), "shards": last - first,
            "skipped_shards": skipped, "encoded_images": done_images, "distinct_images": distinct,
            "seconds": round(seconds, 3), "compile_s": round(compile_s, 3),
            # the work done: each distinct image of a shard is decoded and encoded once
            "images_per_s": round(distinct / seconds, 1) if seconds > 0 and distinct else 0.0,
            "first_shard": first, "last_shard": last, "fetched_images": fetched}


def num_shards(num_records: int, shard_size: int) -> int:
    return max(1, -(-num_records // shard_size))


def count_records(manifest: Path) -> int:
    """Rows of a manifest, without keeping them (lines as ``read_rows`` splits them)."""
    if Path(manifest).suffix == ".json":
        return len(load_records(manifest))
    with open(manifest, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        return sum(1 for _ in fh)


def _load_range(manifest: Path, start: int, stop: int) -> list[dict]:
    """Records ``start:stop`` of a validated manifest; an unparseable row raises (``load_records``)."""
    out = []
    for i, row in enumerate(read_rows(manifest)):
        if i >= stop:
            break
        if i >= start:
            if row.record is None:
                raise ValueError(f"{manifest}:{row.line}: {row.parse_error}; run `unitoken data validate` first")
            out.append(row.record)
    return out


def _image_paths(records: list[dict]) -> list[str]:
    paths = []
    for rec in records:
        imgs = rec.get("image", [])
        paths += [imgs] if isinstance(imgs, str) else imgs
    return paths


def _shard_counts(shard: Path) -> tuple[int, int]:
    """(records, images) of a finished shard."""
    from safetensors import safe_open

    with open(shard / "records.jsonl") as fh:
        n_rec = sum(1 for _ in fh)
    with safe_open(str(shard / "images.safetensors"), "pt") as f:
        stored = "image_slots" if "image_slots" in f.keys() else "codes"  # format 2: one per record image
        return n_rec, f.get_slice(stored).get_shape()[0]


def write_index(out: Path) -> dict:
    """``out/index.json`` (plan + every shard's counts and file digests), written last: its
    presence means every shard of the plan is there.

    Raises:
        ValueError: a shard of the plan is missing.
    """
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    index = {**plan, "shards": []}
    for s in range(num_shards(plan["num_records"], plan["shard_size"])):
        shard = out / "shards" / f"shard_{s:05d}"
        if not shard.is_dir():
            raise ValueError(f"{out}: {shard.name} is missing; every shard of the plan must be built first")
        n_rec, n_img = _shard_counts(shard)
        index["shards"].append({"name": shard.name, "records": n_rec, "images": n_img,
                                "sha256": {p.name: sha256_file(p) for p in sorted(shard.iterdir())}})
    write_json(out / "index.json", index)
    return index


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where both sides share a file system (no second copy of TBs of shards; shards
    are never modified in place), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def merge(parts: list[Path], out: Path) -> dict:
    """Put the outputs of ``pretokenize`` workers together into ``out``: plan.json, every shard
    (hard-linked where possible) and index.json (every file re-hashed: what arrived is what is
    indexed), byte-identical to one worker's run over the whole manifest.

    Raises:
        ValueError: the parts were made from different inputs, or a shard is missing or made twice.
    """
    out = Path(out)
    plans = [json.loads((Path(p) / "plan.json").read_text()) for p in parts]
    if not plans:
        raise ValueError("merge: no worker outputs")
    for p, plan in zip(parts[1:], plans[1:]):
        if plan != plans[0]:
            diff = sorted(k for k in plan.keys() | plans[0].keys() if plan.get(k) != plans[0].get(k))
            raise ValueError(f"merge: {p} was made from other inputs than {parts[0]} (differs in {diff})")
    owner: dict[str, Path] = {}
    for p in parts:
        for shard in sorted((Path(p) / "shards").glob("shard_*")):
            if shard.name in owner:
                raise ValueError(f"merge: {shard.name} is in both {owner[shard.name]} and {p}")
            owner[shard.name] = Path(p)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", plans[0])
    for name, p in sorted(owner.items()):
        if not (out / "shards" / name).is_dir():
            shutil.copytree(p / "shards" / name, out / "shards" / name, copy_function=_link_or_copy)
    index = write_index(out)
    return {"records": sum(s["records"] for s in index["shards"]), "images": sum(s["images"] for s in index["shards"]),
            "shards": len(index["shards"]), "workers": len(parts)}


def _validation_report(manifest: Path) -> str | None:
    """sha256 of the validation report a ``clean.jsonl`` came from (lineage), if any."""
    sidecar = manifest.parent / "dataset.json"
    return json.loads(sidecar.read_text()).get("report_sha256") if sidecar.is_file() else None


def _module_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tiles_to_pixels(tiles: torch.Tensor) -> torch.Tensor:
    """Stored uint8 [n, s, s, 3] tiles -> float [n, 3, s, s] in [-1, 1] (the ViT input)."""
    return tiles.permute(0, 3, 1, 2).float() / 127.5 - 1.0
