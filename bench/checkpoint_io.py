"""Checkpoint save/load time for the 7B layer shape: how long training is blocked, and how long
until the checkpoint is on disk.

    python bench/checkpoint_io.py --layers 2 --dir /tmp/ckpt --out runs/bench/checkpoint_io.json  # one H200
    python bench/checkpoint_io.py --layers 1 --hidden 256 --vocab 1024 --dir /tmp/ckpt          # CPU smoke test

State: what mixed-precision training keeps per parameter (bf16 weight, fp32 master weight,
fp32 Adam moments: 14 bytes) for ``--layers`` decoder layers of hidden 4096 / MLP 11,008 plus
the 65,536-entry embedding and head, on the GPU. Variants, each written with fsync:

* ``torch.save``: one pickle-free tensor file straight from the GPU (blocking = total).
* ``dcp-async``: ``torch.distributed.checkpoint.async_save`` (training resumes after staging).
* ``staged-async``: copy into pinned host buffers allocated once (the only blocking part), then
  a background thread writes safetensors.
* ``handoff``: the hand-off format, fp32 weights in one ``model.safetensors``.

Load is timed back onto the GPU for each. Numbers are also scaled to the full 7B (7.01 B LLM +
head parameters) by parameter count: extrapolated, not measured, and labelled so.
Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

FULL_7B = 7.01e9


def make_state(layers: int, hidden: int, mlp: int, vocab: int, device) -> tuple[dict, int]:
    shapes = {"embed": (vocab, hidden), "head": (vocab, hidden)}
    for i in range(layers):
        for w in ("q", "k", "v", "o"):
            shapes[f"l{i}.{w}"] = (hidden, hidden)
        shapes[f"l{i}.gate"] = (mlp, hidden)
        shapes[f"l{i}.up"] = (mlp, hidden)
        shapes[f"l{i}.down"] = (hidden, mlp)
    state, n = {}, 0
    for name, shape in shapes.items():
        w = torch.randn(shape, device=device)
        state[f"{name}.weight"] = w.to(torch.bfloat16)
        state[f"{name}.master"] = w
        state[f"{name}.exp_avg"] = torch.randn(shape, device=device) * 1e-3
        state[f"{name}.exp_avg_sq"] = torch.rand(shape, device=device) * 1e-6
        n += w.numel()
    return state, n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fsync_dir(path: Path):
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def bench_torch_save(state, d: Path, device) -> dict:
    d.mkdir(parents=True)
    _sync(device)
    t0 = time.perf_counter()
    torch.save(state, d / "state.pt")
    _fsync_dir(d)
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = torch.load(d / "state.pt", map_location=device, weights_only=True)
    _sync(device)
    load = time.perf_counter() - t0
    del loaded
    return {"blocking_s": save, "total_s": save, "load_s": load}


def bench_dcp_async(state, d: Path, device) -> dict:
    import torch.distributed.checkpoint as dcp

    _sync(device)
    t0 = time.perf_counter()
    future = dcp.async_save(state, checkpoint_id=str(d))
    blocking = time.perf_counter() - t0
    future.result()
    total = time.perf_counter() - t0
    target = {k: torch.empty_like(v) for k, v in state.items()}
    t0 = time.perf_counter()
    dcp.load(target, checkpoint_id=str(d))
    _sync(device)
    load = time.perf_counter() - t0
    del target
    return {"blocking_s": blocking, "total_s": total, "load_s": load}


class StagedWriter:
    """Pinned host buffers allocated once; ``save`` copies into them (blocking) and a thread writes."""

    def __init__(self, state: dict):
        self.host = {k: torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=torch.cuda.is_available())
                     for k, v in state.items()}
        self.thread = None

    def save(self, state: dict, path: Path) -> None:
        if self.thread is not None:
            self.thread.join()  # the previous checkpoint must be on disk before its buffers are reused
        for k, v in state.items():
            self.host[k].copy_(v, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

        def write():
            save_file(self.host, str(path))
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())

        self.thread = threading.Thread(target=write)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


def bench_staged(state, d: Path, device) -> dict:
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    writer = StagedWriter(state)
    alloc = time.perf_counter() - t0
    _sync(device)
    t0 = time.perf_counter()
    writer.save(state, d / "state.safetensors")
    blocking = time.perf_counter() - t0
    writer.wait()
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_file(str(d / "state.safetensors"), device=str(device))
    _sync(device)
    load = time.perf_counter() - t0
    del loaded, writer
    return {"blocking_s": blocking, "total_s": total, "load_s": load, "pinned_alloc_once_s": alloc}


def bench_handoff(state, d: Path, device) -> dict:
    d.mkdir(parents=True)
    _sync(device)
    t0 = time.perf_counter()
    weights = {k.removesuffix(".master"): v.detach().float().cpu() for k, v in state.items() if k.endswith(".master")}
    save_file(weights, str(d / "model.safetensors"))
    _fsync_dir(d)
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = load_file(str(d / "model.safetensors"), device=str(device))
    _sync(device)
    load = time.perf_counter() - t0
    del loaded, weights
    return {"blocking_s": save, "total_s": save, "load_s": load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/unitoken-ckpt-bench"))
    ap.add_argument("--variants", default="torch.save,dcp-async,staged-async,handoff")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.distributed.is_initialized():  # DCP's async path wants a (here one-process) group
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    state, n_params = make_state(args.layers, args.hidden, args.mlp, args.vocab, device)
    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    scale = FULL_7B / n_params
    funcs = {"torch.save": bench_torch_save, "dcp-async": bench_dcp_async, "staged-async": bench_staged,
             "handoff": bench_handoff}
    rows = []
    for name in args.variants.split(","):
        d = args.dir / name
        shutil.rmtree(d, ignore_errors=True)
        try:
            r = funcs[name](state, d, device)
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            r = {"variant": name, "bytes": size, **{k: round(v, 3) for k, v in r.items()},
                 "write_gb_per_s": round(size / r["total_s"] / 1e9, 2),
                 "blocking_s_7b_extrapolated": round(r["blocking_s"] * scale, 1),
                 "total_s_7b_extrapolated": round(r["total_s"] * scale, 1),
                 "load_s_7b_extrapolated": round(r["load_s"] * scale, 1)}
        except Exception as err:
            r = {"variant": name, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        shutil.rmtree(d, ignore_errors=True)
        rows.append(r)
        print(json.dumps(r), flush=True)
        result = {"layers": args.layers, "hidden": args.hidden, "params": n_params, "state_bytes": state_bytes,
                  "scale_to_7b": round(scale, 2), "torch": torch.__version__, "variants": rows,
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        if args.out:  # after every variant: a slow disk must not cost the finished ones
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    table = Table(title=f"checkpoint I/O: {n_params / 1e9:.2f} B params ({state_bytes / 1e9:.1f} GB state), "
                        f"x{scale:.1f} to 7B")
    cols = ["variant", "bytes", "blocking_s", "total_s", "load_s", "write_gb_per_s", "blocking_s_7b_extrapolated",
            "total_s_7b_extrapolated", "load_s_7b_extrapolated", "error"]
    for c in cols:
        table.add_column(c.replace("_", " "))
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in cols])
    Console(width=220).print(table)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
