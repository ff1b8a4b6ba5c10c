"""Train/serve skew check on a trained model: are the VQ codes training saw (the pre-tokenised
shards) the codes inference computes for the same images, and does batched decoding answer
what one-at-a-time decoding answers?

    python -m studies.small_study.skew_check --model W/s3/handoff --data W/d --tokens W/p --out OUT/skew.json

(W: the study's work dir, runs/small_study_work by default.)

Prints a table and writes JSON: the share of identical codes over the test split's images, and
over ``--items`` shapes-VQA items the share of identical answers and the accuracy both ways.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the synthetic data dir (images, manifest)")
    ap.add_argument("--tokens", type=Path, required=True, help="its pre-tokenised shards")
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from unitoken.data.dataset import ShardDataset
    from unitoken.eval import understanding as und
    from unitoken.model.generation import prepare_images
    from unitoken.model.io import load_model
    from unitoken.model.sequence import SequenceBuilder

    model, tok = load_model(args.model, device=args.device)
    builder = SequenceBuilder(model.tokens, tok, model.config)
    ds = ShardDataset(args.tokens, builder, splits=["test"])
    stored, paths = [], []
    for s, j, rec in ds.records:
        rel = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
        if rel in paths or len(paths) >= args.images:
            continue
        shard = ds._shard(s)
        stored.append(shard["codes"][int(shard["image_offsets"][j])].long())
        paths.append(rel)
    images = []
    for rel in paths:
        with Image.open(args.data / rel) as im:
            images.append(im.convert("RGB"))
    inputs, _ = prepare_images(model, images)
    same = torch.stack([(a.codes == b).float().mean() for a, b in zip(inputs, stored)])
    codes = {"images": len(paths), "codes_equal": round(float(same.mean()), 6),
             "images_all_equal": int((same == 1).sum()), "encode_dtype": model.config.vq.encode_dtype}

    items = und.shapes_vqa_items(args.data, limit=args.items)
    t = time.time()
    batched = und.run_understanding(model, builder, items, batch_size=64)
    t_batched = time.time() - t
    t = time.time()
    single = und.run_understanding(model, builder, items, batch_size=1)
    t_single = time.time() - t
    agree = sum(a["prediction"] == b["prediction"] for a, b in zip(batched, single)) / max(1, len(items))
    decoding = {"items": len(items), "answers_equal": round(agree, 4),
                "accuracy_batched": round(sum(r["score"] for r in batched) / max(1, len(items)), 4),
                "accuracy_single": round(sum(r["score"] for r in single) / max(1, len(items)), 4),
                "seconds_batched": round(t_batched, 1), "seconds_single": round(t_single, 1),
                "differences": [{"id": a["id"], "answer": a["answer"], "batched": a["prediction"],
                                 "single": b["prediction"]} for a, b in zip(batched, single)
                                if a["prediction"] != b["prediction"]][:20]}
    result = {"model": str(args.model), "device": args.device, "codes": codes, "decoding": decoding}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    table = Table(title="train/serve skew")
    table.add_column("check")
    table.add_column("result")
    table.add_row("VQ codes stored == computed at inference", f"{codes['codes_equal']:.4%} over {len(paths)} images "
                  f"({codes['encode_dtype']})")
    table.add_row("answers batched == one at a time", f"{agree:.2%} over {len(items)} items")
    table.add_row("accuracy batched / single", f"{decoding['accuracy_batched']:.3f} / {decoding['accuracy_single']:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
