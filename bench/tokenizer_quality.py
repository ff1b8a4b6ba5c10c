"""VQ tokenizer quality on the synthetic shapes: does the detector still see the objects?

    python bench/tokenizer_quality.py --recipes tiny,small --scenes 2000 --steps 3000 --out runs/bench/vq.json

For each recipe: synthesise scenes at the recipe's VQ resolution, train the recipe's VQ-GAN,
reconstruct the test split and report PSNR, codebook usage and the share of annotated objects
the shapes detector recognises (target >= 95 %). Prints a table last; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unitoken.data.synth import synthesize
from unitoken.data.tokenizer_train import train_tokenizer
from unitoken.recipes import get_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="tiny")
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--keep", type=Path, help="keep the trained tokenizers under this directory")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for name in args.recipes.split(","):
        cfg = get_recipe(name).model.vq
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            synthesize(data, args.scenes, size=cfg.resolution, seed=0)
            out = (args.keep / name) if args.keep else Path(tmp) / "vq"
            report = train_tokenizer(data, out, cfg, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     device=args.device)
        rows.append({"recipe": name, "resolution": cfg.resolution, "codes": cfg.num_codes,
                     **{k: report[k] for k in ("device", "steps", "train_seconds", "psnr_db", "codebook_usage",
                                               "objects_recognised", "objects_total", "recognition_rate")}})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    table = Table(title="VQ tokenizer quality on synthetic shapes (test split)")
    for key in rows[0]:
        table.add_column(key.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
