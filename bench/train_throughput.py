"""Stage-2 training throughput: the reference's batching vs ours, same samples, same process.

    python bench/train_throughput.py --shape 7b --layers 8 --out runs/bench/throughput_7b.json   # one H200
    python bench/train_throughput.py --shape tiny --steps 1 --warmup 0                          # CPU smoke test

The model is the real training path (``UniToken.hidden_states`` + ``UniToken.loss``) at a
recipe's LLM shape with ``--layers`` decoder layers; continuous (SigLIP) positions are
placeholder embeddings, so the vision tower is outside the numbers. One optimizer step
consumes the same list of samples in every variant (gradient accumulation over micro-batches):

* ``reference``: what the UniToken reference builds: samples padded to the longest in a
  micro-batch of ``--ref-batch`` samples (text-only samples first get +730 pad positions),
  stock SDPA with the padding mask, every layer checkpointed, logits of every position in fp32.
* ``ours``: samples packed into rows of ``--row-len`` tokens, variable-length attention (no
  padding, no attention across samples), chunked head + cross-entropy over supervised rows
  only, activation checkpointing on the first ``--ckpt`` layers.
* ``anchor-*``: the issue's measured anchor (dense text-only 2 x 4096, stock path) with and
  without checkpointing, and ours on the same dense batch.

MFU counts useful model FLOPs only: 6 * N_body per real token + 6 * N_head per supervised
token + 6 * L * d * sum(n_i^2) of causal attention within each sample (forward + backward),
over the step time, against 989 TFLOP/s (spec) and the matrix ceiling measured in the run.
``mfu_6n_all`` is the usual 6N convention (head on every token) for comparison. Both variants
use bf16 weights and fused AdamW. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from unitoken.model import attention as attention_mod
from unitoken.model.sequence import IGNORE
from unitoken.model.tokens import build_tokenizer
from unitoken.model.unitoken import UniToken
from unitoken.model.vision import num_continuous_features
from unitoken.recipes import get_recipe

H200_SPEC = 989e12
ANYRES_GRIDS = [(2, 2), (1, 2), (1, 3), (2, 1), (3, 1)]
REF_TEXT_PAD = 730  # the reference pads text-only samples to the multimodal length


@dataclasses.dataclass
class Sample:
    ids: torch.Tensor  # [n]
    labels: torch.Tensor  # [n], IGNORE where unsupervised
    task: str


# --------------------------------------------------------------------------- data


def unitoken_mix(model: UniToken, n: int, anyres: bool, seed: int = 0, text_share: float = 0.1) -> list[Sample]:
    """Stage-2 samples in the UniToken layout (understanding : generation = 1 : 1, some text).

    Understanding: [BOS] image (discrete block, SEP, continuous, EOI) question answer [EOS],
    only the answer supervised. Generation: [BOS] prompt image-block [EOS], the block supervised.
    """
    rng = random.Random(seed)
    tok = model.tokens
    cfg = model.config
    side = cfg.vq.resolution // 16
    vocab = tok.vocab_size

    def text(k):
        return [rng.randrange(16, vocab) for _ in range(k)]

    def discrete():
        rows = []
        for _ in range(side):
            rows += [rng.randrange(16, vocab) for _ in range(side)] + [tok.newline]
        units = tok.grid[min(cfg.vq.resolution // cfg.vq.grid_unit_px, len(tok.grid) - 1)]
        return [tok.boi, units, units] + rows

    n_text = round(n * text_share)
    tasks = ["text"] * n_text + ["understanding"] * ((n - n_text) // 2)
    tasks += ["generation"] * (n - len(tasks))
    rng.shuffle(tasks)
    out = []
    for task in tasks:
        if task == "text":
            prompt, answer = text(rng.randint(20, 200)), text(rng.randint(50, 1500))
            ids, sup = [tok.bos] + prompt + answer + [tok.eos], 1 + len(prompt)
        elif task == "understanding":
            grid = rng.choice(ANYRES_GRIDS) if anyres else (0, 0)
            px = cfg.vision.image_size  # an image of the grid's aspect ratio: nothing is cut as padding
            n_cont = num_continuous_features(grid, (grid[1] * px, grid[0] * px), cfg.vision)
            q, a = text(rng.randint(10, 60)), text(rng.randint(5, 300))
            ids = [tok.bos] + discrete() + [tok.sep] + [tok.continuous] * n_cont + [tok.eoi] + q + a + [tok.eos]
            sup = len(ids) - len(a) - 1
        else:
            prompt = text(rng.randint(8, 60))
            ids = [tok.bos] + prompt + discrete() + [tok.eoi, tok.eos]
            sup = 1 + len(prompt)
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[:sup] = IGNORE
        labels[ids == tok.continuous] = IGNORE
        out.append(Sample(ids, labels, task))
    return out


def dense_text(model: UniToken, rows: int, length: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [Sample(x, x.clone(), "dense") for x in torch.randint(16, model.tokens.vocab_size, (rows, length), generator=g)]


def reference_batches(samples: list[Sample], batch: int, pad: int) -> list[dict]:
    """Micro-batches as the reference builds them: +730 pads on text-only samples, then padded
    to the longest sample of the micro-batch (input_ids/labels/attention_mask [b, T])."""
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i:i + batch]
        lens = [len(s.ids) + (REF_TEXT_PAD if s.task == "text" else 0) for s in group]
        longest = max(lens)
        ids = torch.full((len(group), longest), pad)
        labels = torch.full((len(group), longest), IGNORE)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for r, s in enumerate(group):
            n = len(s.ids)
            ids[r, :n], labels[r, :n], mask[r, :n] = s.ids, s.labels, 1
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def packed_batches(samples: list[Sample], row_len: int, rows_per_batch: int, pad: int) -> list[dict]:
    """First-fit-decreasing packing into rows of ``row_len`` tokens, positions restarting per sample."""
    rows: list[list[Sample]] = []
    space: list[int] = []
    for s in sorted(samples, key=lambda s: -len(s.ids)):
        if len(s.ids) > row_len:
            raise ValueError(f"sample of {len(s.ids)} tokens > --row-len {row_len}")
        k = next((i for i, free in enumerate(space) if free >= len(s.ids)), None)
        if k is None:
            rows.append([])
            space.append(row_len)
            k = len(rows) - 1
        rows[k].append(s)
        space[k] -= len(s.ids)
    out = []
    for i in range(0, len(rows), rows_per_batch):
        group = rows[i:i + rows_per_batch]
        # one row per micro-batch needs no common width: varlen attention takes any length, so
        # the row ends with its last sample and nothing is padded
        width = sum(len(s.ids) for s in group[0]) if rows_per_batch == 1 else row_len
        ids = torch.full((len(group), width), pad)
        labels = torch.full((len(group), width), IGNORE)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        for r, row in enumerate(group):
            at = 0
            for s in row:
                n = len(s.ids)
                ids[r, at:at + n], labels[r, at:at + n], pos[r, at:at + n] = s.ids, s.labels, torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


# --------------------------------------------------------------------------- model and FLOPs


def build(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype) -> UniToken:
    recipe = get_recipe({"7b": "unitoken-7b-anyres", "small": "small", "tiny": "tiny"}[shape])
    cfg = recipe.model
    llm = dataclasses.replace(cfg.llm, num_layers=layers or cfg.llm.num_layers, attn_implementation="sdpa")
    cfg = dataclasses.replace(cfg, llm=llm, encoder_mode="discrete", vision=dataclasses.replace(cfg.vision, anyres=True))
    tok = build_tokenizer(cfg.llm.vocab_size, cfg.vq.num_codes, cfg.max_grid_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = UniToken(cfg, tok.get_vocab())
    return model.to(dtype)


def useful_flops(model: UniToken, samples: list[Sample]) -> dict[str, float]:
    llm = model.config.llm
    n_body = sum(p.numel() for name, p in model.llm.named_parameters() if not name.startswith("embed_tokens"))
    n_head = model.lm_head.weight.numel()
    tokens = sum(len(s.ids) for s in samples)
    supervised = sum(int((s.labels[1:] != IGNORE).sum()) for s in samples)
    attn = 6.0 * llm.num_layers * llm.hidden_size * sum(len(s.ids) ** 2 for s in samples)
    return {"tokens": tokens, "supervised": supervised,
            "flops": 6.0 * n_body * tokens + 6.0 * n_head * supervised + attn,
            "flops_6n_all": 6.0 * (n_body + n_head) * tokens + attn}


def reference_loss(model: UniToken, batch: dict) -> torch.Tensor:
    """Stock path: hidden states of every position -> fp32 logits [b, T, V] -> cross-entropy."""
    hidden = model.hidden_states(model.llm.embed_tokens(batch["input_ids"]), batch.get("attention_mask"))
    logits = model.lm_head(hidden[:, :-1]).float()
    lse = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    keep = batch["labels"][:, 1:] != IGNORE
    return ce + model.config.z_loss_weight * (lse[keep] ** 2).mean()


def our_loss(model: UniToken, batch: dict) -> torch.Tensor:
    hidden = model.hidden_states(model.llm.embed_tokens(batch["input_ids"]), None, batch["position_ids"])
    return model.loss(hidden, batch["labels"])["loss"]


def matmul_ceiling(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 20 / (start.elapsed_time(end) / 1e3)


# --------------------------------------------------------------------------- one variant


def run_variant(name, model, opt, batches, loss_fn, samples, steps, warmup, device, ceiling, backend="auto",
                compile_layers=False, **settings) -> dict:
    model.configure_training(**settings)
    attention_mod.BACKEND = backend
    if compile_layers:  # in place and irreversible: run this variant last
        for layer in model.llm.layers:
            layer.compile()
    cuda = device.type == "cuda"
    dev_batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for b in dev_batches:
            loss = loss_fn(model, b) / len(dev_batches)
            loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(total))
    f = useful_flops(model, samples)
    step_s = statistics.median(times)
    slots = sum(b["input_ids"].numel() for b in batches)
    row = {"variant": name, **settings, "backend": backend, "compiled": compile_layers, "micro_batches": len(batches),
           "tokens": f["tokens"], "token_slots": slots, "padding_share": round(1 - f["tokens"] / slots, 4),
           "step_s": round(step_s, 4), "step_s_spread": round(max(times) - min(times), 4),
           "tokens_per_s": round(f["tokens"] / step_s, 1), "tflops": round(f["flops"] / step_s / 1e12, 1),
           "mfu": round(f["flops"] / step_s / H200_SPEC, 4),
           "mfu_vs_measured": round(f["flops"] / step_s / ceiling, 4) if ceiling else None,
           "mfu_6n_all": round(f["flops_6n_all"] / step_s / H200_SPEC, 4),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "loss": round(statistics.mean(losses), 4)}
    model.configure_training()  # back to stock
    attention_mod.BACKEND = "auto"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=["7b", "small", "tiny"])
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0 = the recipe's)")
    ap.add_argument("--samples", type=int, default=24, help="samples per optimizer step")
    ap.add_argument("--row-len", type=int, default=16384, help="token budget of a packed row")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    ap.add_argument("--ref-batch", type=int, default=2, help="samples per padded micro-batch (reference)")
    ap.add_argument("--ckpt", type=int, default=0, help="layers checkpointed in 'ours'")
    ap.add_argument("--ce-chunk", type=int, default=4096)
    ap.add_argument("--variants", default="reference,ours,ours-sdpa,ours-ckpt-half,anchor-ckpt,anchor,anchor-ours")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-anyres", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, args.layers or None, device, dtype)
    model.train()
    model.freeze_except(("llm", "lm_head"))
    for layer in model.llm.layers:
        layer.self_attn.attention_dropout = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    ceiling = matmul_ceiling(device) if device.type == "cuda" else None
    pad = model.tokens.pad
    row_len = min(args.row_len, 1024) if args.shape == "tiny" else args.row_len

    mix = unitoken_mix(model, args.samples, anyres=not args.no_anyres and args.shape != "tiny")
    dense = dense_text(model, 2, 4096 if args.shape != "tiny" else 256)
    layers = len(model.llm.layers)
    plan = {
        "reference": (mix, reference_batches(mix, args.ref_batch, pad), reference_loss,
                      {"checkpoint_layers": -1}),
        "ours": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                 {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": args.ckpt}),
        "ours-sdpa": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                      {"attention": "sdpa", "ce_chunk": args.ce_chunk, "checkpoint_layers": args.ckpt}),
        "ours-loop": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                      {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": args.ckpt,
                       "backend": "loop"}),
        "ours-nochunk": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                         {"attention": "varlen", "ce_chunk": 0, "checkpoint_layers": args.ckpt}),
        "ours-compile": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                         {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": args.ckpt,
                          "compile_layers": True}),
        "ours-ckpt-half": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                           {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": layers // 2}),
        "ours-ckpt-all": (mix, packed_batches(mix, row_len, args.rows, pad), our_loss,
                          {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": -1}),
        "anchor-ckpt": (dense, reference_batches(dense, 2, pad), reference_loss, {"checkpoint_layers": -1}),
        "anchor": (dense, reference_batches(dense, 2, pad), reference_loss, {"checkpoint_layers": 0}),
        "anchor-ours": (dense, packed_batches(dense, dense[0].ids.numel(), 2, pad), our_loss,
                        {"attention": "varlen", "ce_chunk": args.ce_chunk, "checkpoint_layers": 0}),
    }
    rows = []
    for name in args.variants.split(","):
        samples, batches, loss_fn, settings = plan[name]
        try:
            rows.append(run_variant(name, model, opt, batches, loss_fn, samples, args.steps, args.warmup, device,
                                    ceiling, **settings))
        except torch.OutOfMemoryError as err:
            rows.append({"variant": name, **settings, "error": f"out of memory: {str(err)[:120]}"})
            opt.zero_grad(set_to_none=True)
        except Exception as err:  # one broken variant must not lose the others' numbers
            rows.append({"variant": name, **settings, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            opt.zero_grad(set_to_none=True)
            model.configure_training()
            attention_mod.BACKEND = "auto"
        print(json.dumps(rows[-1]), flush=True)

    by = {r["variant"]: r for r in rows}
    speedup = None
    if "tokens_per_s" in by.get("reference", {}) and "tokens_per_s" in by.get("ours", {}):
        speedup = round(by["ours"]["tokens_per_s"] / by["reference"]["tokens_per_s"], 3)
    counts = {t: sum(s.task == t for s in mix) for t in ("understanding", "generation", "text")}
    result = {"shape": args.shape, "layers": layers, "hidden": model.config.llm.hidden_size,
              "vocab": model.config.llm.vocab_size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "matmul_ceiling_tflops": round(ceiling / 1e12, 1) if ceiling else None,
              "samples": args.samples, "mix": counts, "anyres": not args.no_anyres,
              "sample_tokens_mean": round(statistics.mean(len(s.ids) for s in mix), 1),
              "row_len": row_len, "rows_per_micro_batch": args.rows, "ref_batch": args.ref_batch,
              "speedup_ours_vs_reference": speedup, "variants": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    cols = ["variant", "micro_batches", "padding_share", "step_s", "tokens_per_s", "tflops", "mfu",
            "mfu_vs_measured", "mfu_6n_all", "peak_gib", "loss"]
    table = Table(title=f"stage-2 training step, {args.shape} shape x {layers} layers, {result['device']} "
                        f"(ours/reference = {speedup}x)")
    for c in cols:
        table.add_column(c.replace("_", " "))
    for r in rows:
        table.add_row(*[r["error"][:60] if "error" in r and c == "micro_batches" else str(r.get(c, "")) for c in cols])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
