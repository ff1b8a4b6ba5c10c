"""A step's data: the rank's share of the global batch, cut into micro-batches, collated ahead.

Every rank advances the same sampler over the whole global batch and keeps every ``world``-th
sample (``draw_batch``). Its share is cut, in order, into micro-batches of at most
``micro_batch_tokens`` token slots (``split_micro_batches``); each is collated on the CPU by a
prefetch thread while the accelerator trains (``Prefetch``). The loss of every micro-batch is
its part of the global batch's loss (``as_part_of_global_batch``): divided by the supervised
tokens (or samples) of the whole step on all ranks, so that accumulating the micro-batches'
gradients gives the global batch's gradient whatever the cut.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from unitoken.data.dataset import (
    Sample,
    ShardDataset,
    check_fits,
    pack_samples,
    pad_samples,
    sample_loss_weights,
)
from unitoken.model.sequence import IGNORE, T2I_TEMPLATE
from unitoken.train import parallel


def _drop_prompt(dataset: ShardDataset, index: int) -> Sample:
    """The same generation sample with an empty prompt: the unconditional branch of CFG."""
    s, j, rec = dataset.records[index]
    turns = [dict(t, value=T2I_TEMPLATE.format(prompt="")) if t["from"] == "human" else t for t in rec["conversations"]]
    dataset.records[index] = (s, j, dict(rec, conversations=turns))
    try:
        return dataset[index]
    finally:
        dataset.records[index] = (s, j, rec)


def draw_batch(dataset, sampler, global_batch: int, rank: int, world: int, draws: int, seed: int,
               cfg_dropout: float) -> tuple[list[Sample], int]:
    """This rank's share of the next global batch (every rank advances the same sampler)."""
    samples = []
    for k in range(global_batch):
        idx = next(sampler)
        if k % world == rank:
            task = dataset.records[idx][2].get("task")
            drop = task == "generation" and random.Random(f"{seed}-cfg-{draws + k}").random() < cfg_dropout
            samples.append(_drop_prompt(dataset, idx) if drop else dataset[idx])
    return samples, draws + global_batch


# --------------------------------------------------------------------------- micro-batches


def slots(samples: list[Sample], packing: bool, attention: str, max_seq_len: int) -> int:
    """Token slots ``samples`` take once collated: their tokens (varlen: one unpadded row), whole
    rows of ``max_seq_len`` (packed for stock attention, filled in order), or the longest sample
    times their count (padding)."""
    if not samples:
        return 0
    if packing and attention == "varlen":
        return sum(len(s) for s in samples)
    if packing:
        rows, used = 1, 0
        for s in samples:
            if used + len(s) > max_seq_len:
                rows, used = rows + 1, 0
            used += len(s)
        return rows * max_seq_len
    return len(samples) * max(len(s) for s in samples)


def split_micro_batches(samples: list[Sample], budget: int, packing: bool, attention: str,
                        max_seq_len: int) -> list[list[Sample]]:
    """Cut a rank's share, in order, into micro-batches of at most ``budget`` token slots.

    Raises:
        ValueError: a sample longer than ``max_seq_len`` (``check_fits``), or a budget that cannot
            hold one sample of ``max_seq_len``.
    """
    check_fits(samples, max_seq_len)
    if budget < max_seq_len:
        raise ValueError(f"micro-batch budget {budget} < max_seq_len {max_seq_len}: a sample may not fit; "
                         "fix: set train.micro_batch_tokens >= the stage's max_seq_len (or auto)")
    groups: list[list[Sample]] = [[]]
    for s in samples:
        if groups[-1] and slots(groups[-1] + [s], packing, attention, max_seq_len) > budget:
            groups.append([])
        groups[-1].append(s)
    return groups if groups[0] else []


def collate(samples: list[Sample], stage, packing: bool, pad_id: int, device,
            loss_reduction: str = "token", attention: str = "sdpa") -> dict:
    check_fits(samples, stage.max_seq_len)
    if packing and attention == "varlen":
        # varlen attention needs no common row width: one row holding every sample, nothing padded
        batch = pack_samples(samples, sum(len(s) for s in samples), pad_id)
    elif packing:
        batch = pack_samples(samples, stage.max_seq_len, pad_id)
    else:
        batch = pad_samples(samples, pad_id)
    seq_lens = batch.pop("seq_lens", None) or [[len(s)] for s in samples]  # padding: one sample per row
    if loss_reduction == "sample":
        batch["loss_weights"] = sample_loss_weights(batch["labels"], seq_lens)
    return to_device(batch, device)


class BatchCounts(NamedTuple):
    """What a batch's loss is normalised by, and its size."""
    supervised: int  # tokens with a target, as the loss shifts labels
    samples: int  # samples with at least one supervised token
    tokens: int  # real tokens (no padding)


def count_batch(samples: list[Sample], batch: dict) -> BatchCounts:
    """This rank's counts; ``batch`` is ``samples`` collated (on any device)."""
    supervised = int((batch["labels"][:, 1:] != IGNORE).sum())
    with_targets = sum(1 for s in samples if any(x != IGNORE for x in s.encoded.labels))
    return BatchCounts(supervised, with_targets, sum(len(s) for s in samples))


def add_counts(counts: list[BatchCounts]) -> BatchCounts:
    return BatchCounts(*(sum(c) for c in zip(*counts))) if counts else BatchCounts(0, 0, 0)


def global_batch_counts(local: BatchCounts) -> BatchCounts:
    """The counts summed over all ranks (one all-reduce)."""
    return BatchCounts(*(int(x) for x in parallel.sum_over_ranks(list(local))))


def as_part_of_global_batch(batch: dict, local: BatchCounts, total: BatchCounts, loss_reduction: str) -> dict:
    """Model inputs whose loss is this micro-batch's part of the global batch's loss, so that the
    parts of all micro-batches and ranks sum to what one pass over the whole batch gives: the
    token mean and the z-loss divide by the supervised tokens of the whole step on all ranks, and
    each sample weighs 1 / (samples of the whole step). Normalising by each rank's own counts made
    the loss depend on the world size, by each micro-batch's on the cut. With one
    micro-batch in one process nothing changes (the factors are exactly 1)."""
    batch = dict(batch, num_global_tokens=total.supervised)
    if loss_reduction == "sample":  # sample_loss_weights sums to 1 over this micro-batch's samples
        batch["loss_weights"] = batch["loss_weights"] * (local.samples / total.samples)
    return batch


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
           for k, v in batch.items()}
    if out.get("images") is not None:
        out["images"].pixel_values = out["images"].pixel_values.to(device, non_blocking=non_blocking)
    return out


def pin(batch: dict) -> dict:
    """Page-locked copies, so that the copy to the GPU runs asynchronously (``non_blocking``)."""
    out = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if out.get("images") is not None:
        out["images"].pixel_values = out["images"].pixel_values.pin_memory()
    return out


# --------------------------------------------------------------------------- prefetch


@dataclass
class MicroBatch:
    samples: list[Sample]
    batch: dict  # collated, on the CPU (pinned for a GPU)
    counts: BatchCounts  # this micro-batch's, on this rank


@dataclass
class Drawn:
    """One step's micro-batches and the data stream's position right after them."""
    micro: list[MicroBatch]
    draws: int
    sampler_state: dict
    flops: float = 0.0  # useful model FLOPs of this rank's share (forward + backward)

    @property
    def samples(self) -> list[Sample]:
        return [s for m in self.micro for s in m.samples]

    @property
    def counts(self) -> BatchCounts:
        return add_counts([m.counts for m in self.micro])


class Prefetch:
    """Draws and collates the next steps on a thread while the accelerator runs the current one
    (in run 4 of the small study the CPU side took ~0.25 s of a 0.76 s step). Only this thread
    touches the sampler, in the same order as drawing inline would, so the batches are identical;
    each carries the sampler state right after it, which is what a checkpoint after it records."""

    def __init__(self, make: Callable[[], Drawn], count: int, depth: int = 2) -> None:
        self.make = make if depth == 0 else None  # depth 0: draw inline, in get(); no thread
        self.stopping = threading.Event()
        self.thread = None
        if depth:
            self.items: queue.Queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, args=(make, count), name="unitoken-prefetch",
                                           daemon=True)
            self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Drawn], count: int) -> None:
        try:
            for _ in range(count):
                if not self._put(make()):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
            self._put(err)

    def get(self) -> Drawn:
        if self.make:
            return self.make()
        item = self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=10)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
