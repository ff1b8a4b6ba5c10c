"""``unitoken data pretokenize``: VQ codes and continuous-path pixels, sharded and resumable.

Layout of ``OUT``::

    plan.json                       what this run is (manifest digest, model digest, shard size);
                                    a resume with different inputs is refused
    shards/shard_00000/records.jsonl    the records, verbatim, in manifest order
    shards/shard_00000/images.safetensors
        codes         int32 [n_images, h, w]   VQ codes
        tiles         uint8 [n_tiles, s, s, 3] SigLIP input tiles (base + AnyRes), already resized
        tile_offsets  int64 [n_images + 1]
        grids         int64 [n_images, 2]      AnyRes (rows, cols); (0, 0) = base only
        sizes         int64 [n_images, 2]      original (width, height): AnyRes cuts its padding by it
        image_offsets int64 [n_records + 1]    images of record i: image_offsets[i]:image_offsets[i+1]
    index.json                      shards, counts and sha256 of every file (written last)

A shard is built in a temporary directory and renamed into place, so a killed run leaves
either a whole shard or none; a restart skips finished shards. Output is deterministic:
the same inputs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from unitoken.config import config_hash
from unitoken.data.manifest import data_root, load_records, resolve_image
from unitoken.files import sha256_file, write_json
from unitoken.model.vision import preprocess_continuous, vq_pixels

FORMAT = "unitoken-shards"
# 2: AnyRes tiles are resized-and-padded (1 stretched them) and the image sizes are stored
FORMAT_VERSION = 2


def _tiles_uint8(tiles: torch.Tensor) -> torch.Tensor:
    """[n, 3, s, s] in [-1, 1] -> [n, s, s, 3] uint8 (exactly invertible for 8-bit images)."""
    return ((tiles + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _encode(vq, pixels: list[torch.Tensor], batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch_size):
        batch = torch.stack(pixels[i : i + batch_size]).to(device)
        # in the model's encode_dtype, exactly as evaluation, chat and serving encode (vq.encode)
        out.append(vq.encode(batch).to(torch.int32).cpu())
    return torch.cat(out) if out else torch.zeros((0,), dtype=torch.int32)


def _build_shard(records: list[dict], root: Path, model, batch_size: int, device: torch.device) -> dict:
    cfg = model.config
    # Records of one scene share its image (caption, questions, prompt, dialogue): each distinct
    # path is decoded, resized and VQ-encoded once per shard, then stored for every record.
    pixels, slot_of, slots, tiles, grids, sizes, image_offsets, tile_offsets = [], {}, [], [], [], [], [0], [0]
    for rec in records:
        paths = rec.get("image", [])
        for rel in [paths] if isinstance(paths, str) else paths:
            if rel not in slot_of:
                with Image.open(resolve_image(rel, root)) as im:
                    im = im.convert("RGB")
                    pixels.append(vq_pixels(im, cfg.vq.resolution))
                    t, grid = preprocess_continuous(im, cfg.vision)
                slot_of[rel] = (len(pixels) - 1, _tiles_uint8(t), grid, im.size)
            slot, t, grid, size = slot_of[rel]
            slots.append(slot)
            tiles.append(t)
            grids.append(grid)
            sizes.append(size)
            tile_offsets.append(tile_offsets[-1] + t.shape[0])
        image_offsets.append(len(slots))
    s = cfg.vision.image_size
    codes = _encode(model.vq, pixels, batch_size, device)
    return {
        "codes": codes[torch.tensor(slots, dtype=torch.long)].reshape(len(slots), cfg.vq.codes_per_side,
                                                                      cfg.vq.codes_per_side)
        if slots else codes.reshape(0, cfg.vq.codes_per_side, cfg.vq.codes_per_side),
        "tiles": torch.cat(tiles) if tiles else torch.zeros((0, s, s, 3), dtype=torch.uint8),
        "tile_offsets": torch.tensor(tile_offsets, dtype=torch.int64),
        "grids": torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
        "sizes": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        "image_offsets": torch.tensor(image_offsets, dtype=torch.int64),
    }


def pretokenize(manifest: str | Path, model, out: str | Path, shard_size: int = 1024, batch_size: int = 64,
                device: str = "auto", progress=None) -> dict:
    """Pre-tokenise a validated manifest with ``model`` (a loaded ``UniToken``).

    Returns:
        summary {"records", "images", "shards", "skipped_shards", "images_per_s", "seconds"}.

    Raises:
        ValueError: ``out`` holds a run with a different manifest, model or shard size.
    """
    manifest, out = Path(manifest), Path(out)
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be >= 1")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.vq.to(dev)
    records = load_records(manifest)
    root = data_root(manifest)
    plan = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "manifest_sha256": sha256_file(manifest),
        "vq_sha256": _module_digest(model.vq), "vq_config": config_hash(model.config.vq),
        "vision_config": config_hash(model.config.vision), "shard_size": shard_size, "num_records": len(records),
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

    n_shards = max(1, -(-len(records) // shard_size))
    done_images, skipped, start = 0, 0, time.perf_counter()
    for s in range(n_shards):
        final = out / "shards" / f"shard_{s:05d}"
        if final.is_dir():
            skipped += 1
        else:
            chunk = records[s * shard_size : (s + 1) * shard_size]
            tensors = _build_shard(chunk, root, model, batch_size, dev)
            tmp = out / "shards" / f".tmp-{s:05d}-{os.getpid()}"
            tmp.mkdir()
            (tmp / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in chunk))
            save_file(tensors, str(tmp / "images.safetensors"))
            tmp.rename(final)
            done_images += int(tensors["codes"].shape[0])
        if progress:
            progress(s + 1, n_shards)
    seconds = time.perf_counter() - start
    index = {**plan, "shards": []}
    total_images = 0
    for s in range(n_shards):
        shard = out / "shards" / f"shard_{s:05d}"
        with open(shard / "records.jsonl") as fh:
            n_rec = sum(1 for _ in fh)
        from safetensors import safe_open

        with safe_open(str(shard / "images.safetensors"), "pt") as f:
            n_img = f.get_slice("codes").get_shape()[0]
        total_images += n_img
        index["shards"].append({"name": shard.name, "records": n_rec, "images": n_img,
                                "sha256": {p.name: sha256_file(p) for p in sorted(shard.iterdir())}})
    write_json(out / "index.json", index)
    return {"records": len(records), "images": total_images, "shards": n_shards, "skipped_shards": skipped,
            "encoded_images": done_images, "seconds": round(seconds, 3),
            "images_per_s": round(done_images / seconds, 1) if seconds > 0 and done_images else 0.0}


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
