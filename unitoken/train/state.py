"""What a stage resumes from: the loop's state (step, draws, sampler, RNGs, MLflow run) captured
and restored in one call each, and the periodic checkpoints that hold it (written, published,
pruned to ``train.keep_checkpoints``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from unitoken.train import checkpoint as ckpt
from unitoken.train import parallel

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a resume needs beside DeepSpeed's own state (weights, optimizer, schedule):
    saved into the checkpoint as DeepSpeed's client state and loaded back in one call each."""

    step: int = 0
    draws: int = 0  # samples drawn from the sampler by the steps done
    sampler: dict | None = None  # the sampler's state right after the last step's batch
    torch_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    mlflow_run_id: str | None = None

    def capture(self, device: torch.device) -> dict:
        """The state with the RNGs as they are now, as a checkpoint's client state."""
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if device.type == "cuda" else None
        return dataclasses.asdict(self)

    @classmethod
    def restore(cls, client: dict, device: torch.device) -> TrainState:
        """The state of a loaded checkpoint, with the RNGs set back to it."""
        state = cls(**{f.name: client.get(f.name) for f in dataclasses.fields(cls)})
        torch.set_rng_state(state.torch_rng)
        if device.type == "cuda" and state.cuda_rng is not None:
            torch.cuda.set_rng_state(state.cuda_rng)
        return state


class Checkpoints:
    """A stage's periodic checkpoints: written (or staged in host memory, then written by a
    thread), published once every rank has its part on disk, the newest ``keep`` kept."""

    def __init__(self, engine, root: Path, rank: int, staged: bool, keep: int, meta: dict, tracker) -> None:
        self.engine, self.root, self.rank, self.keep, self.meta, self.tracker = engine, root, rank, keep, meta, tracker
        self.writer = engine.checkpoint_engine if staged else None
        self.pending: dict = {}  # the checkpoint being written in the background: step, timings
        self.log_path = root.parent / "checkpoints.jsonl"

    def latest(self, load: bool = True) -> dict | None:
        """The client state of the newest complete checkpoint, loaded into the engine; None if none.

        Raises:
            ValueError: there is one and ``load`` is False (``--resume never``).
        """
        if self.rank == 0:
            ckpt.clean_debris(self.root)
        parallel.barrier()
        found = ckpt.complete_checkpoints(self.root)
        if not found:
            return None
        step, path = found[-1]
        if not load:
            raise ValueError(f"{self.root.parent} already holds checkpoints (up to step {step}); "
                             "use --resume auto or a new --out")
        log.warning("resuming from %s (step %d)", path, step)
        return parallel.load_checkpoint(self.engine, path)

    def save(self, client: dict, wait: bool = False) -> Path:
        """Write the checkpoint of ``client["step"]``; with the staged writer, training waits only
        for the copy to host memory and the checkpoint is published once written."""
        self.publish()  # the previous one first: one checkpoint in flight at a time
        step = client["step"]
        tmp = ckpt.prepare_tmp(self.root, step) if self.rank == 0 else ckpt.tmp_dir(self.root, step)
        parallel.barrier()
        t0 = time.perf_counter()
        parallel.save_checkpoint(self.engine, tmp, client)  # collective: every rank writes (or stages) its part
        self.pending.update(step=step, t0=t0, blocking_s=time.perf_counter() - t0)
        if self.writer is None or wait:
            self.publish()
        return ckpt.step_dir(self.root, step)

    def publish(self) -> None:
        """Make the pending checkpoint visible once every rank has it on disk; prune old ones."""
        if not self.pending:
            return
        if self.writer is not None:
            self.writer.wait()
        parallel.barrier()
        if self.rank == 0:
            step = self.pending["step"]
            ckpt.publish(self.root, step, {"step": step, **self.meta}, keep=self.keep)
            record = {"step": step, "blocking_s": round(self.pending["blocking_s"], 4),
                      "published_after_s": round(time.perf_counter() - self.pending["t0"], 4),
                      "staged": self.writer is not None}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tracker.log_metrics({"checkpoint_blocking_s": record["blocking_s"]}, step=step)
        parallel.barrier()
        self.pending.clear()

    def publish_if_written(self) -> None:
        """Publish the pending checkpoint if every rank has written it (a collective while one is pending)."""
        if self.writer is not None and self.pending and not parallel.any_rank(not self.writer.done()):
            self.publish()

    @contextmanager
    def draining(self) -> Iterator[None]:
        """No checkpoint write outlives the loop, whichever way it ends (a failed loop publishes nothing)."""
        try:
            yield
        finally:
            if self.writer is not None:
                self.writer.drain()
