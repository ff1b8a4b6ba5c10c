"""Pre-tokenisation speed: VQ-GAN encode images/s, one image at a time in fp32 (the reference)
vs batched bf16 (``unitoken data pretokenize`` on a GPU), in one run.

    python bench/vq_encode.py --recipe unitoken-7b --out runs/bench/vq_encode.json   # one H200
    python bench/vq_encode.py --recipe tiny --images 8 --batch 4                      # CPU smoke test

The encoder is the recipe's (random weights: speed does not depend on them). Variants:
``fp32-single`` (batch 1, fp32), ``bf16-autocast`` (eager bf16 autocast, batch ``--batch``),
``bf16-compiled`` (what the unitoken-7b recipes run in every command: ``vq.encode`` in bf16,
compiled on a GPU: ``vq.encode_compiled``), ``bf16-cl`` (bf16 weights + channels-last memory layout), ``bf16-cl-compile``
(the same through torch.compile). Codes of every variant are compared with fp32 (share of
equal codes: bf16 flips near-ties). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unitoken.model.vq import VQTokenizer
from unitoken.recipes import get_recipe


def timed(fn, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="unitoken-7b")
    ap.add_argument("--images", type=int, default=512, help="images per batched variant")
    ap.add_argument("--single-images", type=int, default=32, help="images for the one-at-a-time variant")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--variants", default="fp32-single,fp32-batched,bf16-autocast,bf16-compiled,bf16-cl,bf16-cl-compile")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its conv algorithms first")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    recipe_cfg = get_recipe(args.recipe).model.vq
    # the reference: fp32, eager (whatever the recipe encodes in)
    cfg = dataclasses.replace(recipe_cfg, encode_dtype="float32", encode_compiled=False)
    torch.manual_seed(0)
    vq = VQTokenizer(cfg).to(device)
    res = cfg.resolution
    pixels = torch.rand(args.images, 3, res, res, device=device) * 2 - 1
    reference = torch.cat([vq.encode(pixels[i:i + 1]) for i in range(min(args.batch, args.images))])

    # vq.encode runs in cfg.encode_dtype whatever the caller's autocast: the bf16 variants are copies
    # whose config says bfloat16 (what a recipe with model.vq.encode_dtype=bfloat16 runs).
    as_bf16 = dataclasses.replace(cfg, encode_dtype="bfloat16")
    auto = copy.deepcopy(vq)
    auto.cfg = as_bf16
    # what the unitoken-7b recipes run in every command: vq.encode, bf16, compiled (vq.encode_compiled)
    recipe_path = copy.deepcopy(vq)
    recipe_path.cfg = dataclasses.replace(cfg, encode_dtype="bfloat16", encode_compiled=True)
    bf16 = copy.deepcopy(vq).to(torch.bfloat16, memory_format=torch.channels_last)
    bf16.cfg = as_bf16

    def enc_autocast(x):
        return auto.encode(x)

    def enc_cl(x):
        return bf16.encode(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))

    compiled = None

    def enc_compiled(x):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(bf16.encoder)
        z = bf16.quant_conv(compiled(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)))
        _, _, idx = bf16.quantize(z)
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    variants = {"fp32-single": (vq.encode, 1), "fp32-batched": (vq.encode, args.batch), "bf16-autocast": (enc_autocast, args.batch),
                "bf16-compiled": (recipe_path.encode, args.batch),
                "bf16-cl": (enc_cl, args.batch), "bf16-cl-compile": (enc_compiled, args.batch)}
    rows = []
    for name in args.variants.split(","):
        fn, bs = variants[name]
        n = args.single_images if bs == 1 else args.images
        batches = [pixels[i:i + bs] for i in range(0, n, bs)]
        try:
            t_warm = timed(fn, batches[:2], device)  # includes compilation for the compiled variant
            seconds = timed(fn, batches, device)
            agree = float((fn(pixels[:len(reference)]) == reference).float().mean())
            rows.append({"variant": name, "batch": bs, "images": n, "seconds": round(seconds, 3),
                         "images_per_s": round(n / seconds, 1), "warmup_s": round(t_warm, 2),
                         "codes_equal_to_fp32": round(agree, 4)})
        except Exception as err:  # a variant that cannot run here (e.g. no compiler) is reported, not fatal
            rows.append({"variant": name, "batch": bs, "error": f"{type(err).__name__}: {str(err)[:160]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["images_per_s"] for r in rows if r["variant"] == "fp32-single" and "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["speedup_vs_fp32_single"] = round(r["images_per_s"] / base, 1)
    result = {"recipe": args.recipe, "resolution": res, "cudnn_benchmark": args.cudnn_benchmark, "num_codes": cfg.num_codes,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "variants": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"VQ encode, {args.recipe} ({res} px), {result['device']}")
    cols = ["variant", "batch", "images", "seconds", "images_per_s", "speedup_vs_fp32_single", "codes_equal_to_fp32",
            "warmup_s", "error"]
    for c in cols:
        table.add_column(c.replace("_", " "))
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
