"""Training step time of a recipe: forward + backward + AdamW on a realistic UniToken batch.

    python bench/step_time.py                       # tiny on CPU (fp32, 2 threads)
    python bench/step_time.py --recipe small --device cuda --dtype bf16

Batch: half understanding samples (one dual image + question + answer), half generation
samples (prompt + supervised image block), as stage 2 mixes them. Prints a table last and
writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from unitoken.model.generation import prepare_images
from unitoken.model.io import init_model
from unitoken.model.sequence import SequenceBuilder, pad_batch
from unitoken.model.unitoken import ContinuousImages
from unitoken.recipes import get_recipe


def make_batch(model, builder, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    res = model.config.vq.resolution
    samples, conts = [], []
    for i in range(batch_size):
        img = Image.fromarray((torch.rand(res, res, 3, generator=g) * 255).byte().numpy())
        inputs, cont = prepare_images(model, [img])
        if i % 2 == 0:
            turns = [{"from": "human", "value": "<|image|>What shape is in the image and what colour is it?"},
                     {"from": "gpt", "value": "A red circle in the top left."}]
            samples.append(builder.conversation(turns, inputs))
            conts.append(cont)
        else:
            turns = [{"from": "human", "value": "Generate an image of a blue square"},
                     {"from": "gpt", "value": "<|image|>"}]
            samples.append(builder.conversation(turns, inputs))
    return pad_batch(samples, model.tokens.pad), ContinuousImages.concat(conts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's stage-2 batch size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)
    model, tok = init_model(recipe.model)
    builder = SequenceBuilder(model.tokens, tok, model.config)
    bs = args.batch_size or recipe.train.stage2.batch_size
    batch, cont = make_batch(model, builder, bs)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(args.device, dtype=dtype)
    model.freeze_except(recipe.train.stage2.trainable)
    model.train()
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if cont is not None:
        cont = ContinuousImages(cont.pixel_values.to(args.device), cont.grids, cont.sizes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    times = []
    for step in range(args.warmup + args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch, images=cont)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = int(batch["attention_mask"].sum())
    result = {
        "recipe": recipe.name, "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "batch_size": bs, "seq_len": batch["input_ids"].shape[1], "tokens_per_step": tokens,
        "step_s_median": statistics.median(times), "step_s_min": min(times),
        "tokens_per_s": tokens / statistics.median(times), "final_loss": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    table = Table(title=f"training step: {recipe.name} on {args.device} ({args.dtype})")
    for key in result:
        table.add_column(key.replace("_", " "))
    table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in result.values()])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
