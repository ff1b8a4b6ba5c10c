"""The three UniToken training stages on DeepSpeed, as one trainer object.

    unitoken train --stage 1 --recipe tiny --data p --out runs/stage1 --init m
    unitoken train --stage 2 --recipe tiny --data p --out runs/stage2 --init runs/stage1/handoff
    torchrun --nproc_per_node 8 -m unitoken.cli train --stage 2 --recipe unitoken-7b-fast ...   # same entry point

Stages differ only through recipe data: ``trainable`` prefixes (stage 1: vision + adapter, LLM
frozen), learning rates (stage 1: 1e-3 with the ViT at 1e-5, because 5e-4 collapsed SigLIP in
the tech report §4), the task ratio and the manifest sources.

``Trainer`` has torchtitan's shape: the constructor builds model, data, optimizer and engine
from the recipe and plans memory on the card it runs on (``unitoken.train.memory``); ``train()``
runs the steps and writes the hand-off checkpoint that the next stage verifies and loads. A step
is the recipe's global batch, cut into micro-batches whose gradients accumulate
(``unitoken.train.batching``). What a resume needs beside DeepSpeed's state is one ``TrainState``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from unitoken.config import Recipe, config_hash, to_dict
from unitoken.data.dataset import MixtureSampler, ShardDataset
from unitoken.data.mixture import effective_mixture
from unitoken.files import sha256_file
from unitoken.model import handoff as handoff_fmt
from unitoken.model.io import load_model, save_model
from unitoken.model.sequence import SequenceBuilder
from unitoken.tracking import MLflowTracker, NullTracker
from unitoken.train import parallel
from unitoken.train.batching import (
    Drawn,
    MicroBatch,
    Prefetch,
    as_part_of_global_batch,
    collate,
    count_batch,
    draw_batch,
    global_batch_counts,
    pin,
    split_micro_batches,
    to_device,
)
from unitoken.train.flops import H100_H200_PEAK_BF16, FlopCounter
from unitoken.train.memory import (
    GIB,
    ActivationModel,
    MemoryPlan,
    activation_budget,
    measure_free_bytes,
    plan_memory,
)
from unitoken.train.profiling import profiled
from unitoken.train.start import build_optimizer, starting_point
from unitoken.train.state import Checkpoints, TrainState

log = logging.getLogger(__name__)


class Stopped(Exception):
    """SIGTERM arrived (a preempted node, a suspended TrainJob, a deadline): the loop finished its
    step, saved a checkpoint there and stopped; ``--resume auto`` goes on from it."""

    def __init__(self, stage_n: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stage {stage_n} stopped by SIGTERM after step {step}; checkpoint {checkpoint}; "
                         "run the same command with --resume auto to go on")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class StageResult:
    stage: int
    steps: int
    handoff: Path
    losses: list[float]
    mlflow_run_id: str | None
    seconds: float


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One stage: ``Trainer(stage_n, recipe, data, out, init).train()``."""

    def __init__(self, stage_n: int, recipe: Recipe, data: Path, out: Path, init: str | Path, resume: str = "auto",
                 max_steps: int | None = None, track: bool = True, show_progress: bool = True,
                 parent_run_id: str | None = None) -> None:
        self.stage_n, self.recipe, self.cfg = stage_n, recipe, recipe.train
        self.stage = recipe.train.stage(stage_n)
        if max_steps is not None:
            self.stage = dataclasses.replace(self.stage, max_steps=max_steps)
        self.data, self.out = Path(data), Path(out)
        self.show_progress = show_progress
        self.rank, self.world, self.device = parallel.init_distributed()
        if self.device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
            # The loop's CPU work is small per-sample tensor ops. With every core as an OpenMP thread,
            # two torch processes on one host (ranks, an evaluation beside training) spin against
            # each other: a batch's tile conversion went from 10 ms to 1.6 s, and GPU steps 2-10x slower.
            torch.set_num_threads(min(4, torch.get_num_threads()))
        self.out.mkdir(parents=True, exist_ok=True)
        self.init, self.parent = starting_point(stage_n, recipe, init)
        self.parent_digest = handoff_fmt.handoff_digest(self.init)
        self._build_model()
        self._build_data()
        opt, sched = build_optimizer(self.model, self.stage)
        self.ds_config = parallel.ds_config(self.cfg, self.stage, self.world)
        self.engine = parallel.wrap(self.model, opt, sched, self.ds_config, staged_checkpoints=self.cfg.async_checkpoint)
        self.grad_divisor = parallel.gradient_average_divisor(self.engine)
        # after the engine: the plan measures what the model, optimizer and ZeRO state left free
        self.plan = self._plan_memory()
        self.model.set_checkpoint_layers(self.plan.checkpoint_layers)
        self.state = TrainState()
        self.tracker = NullTracker()
        self.checkpoints = Checkpoints(self.engine, self.out / "checkpoints", self.rank, self.cfg.async_checkpoint,
                                       self.cfg.keep_checkpoints, {"stage": stage_n, "recipe": recipe.name}, self.tracker)
        client = self.checkpoints.latest(load=resume == "auto")
        if client is not None:
            self.state = TrainState.restore(client, self.device)
            self.sampler.load_state_dict(self.state.sampler)
        self._start_tracking(track, parent_run_id)

    # ----------------------------------------------------------------------- construction

    def _build_model(self) -> None:
        recipe = self.recipe
        self.model, self.tokenizer = load_model(self.init)
        if config_hash(self.model.config) != config_hash(recipe.model):
            raise ValueError(f"--init {self.init} was built with a different model config than recipe "
                             f"{recipe.name!r}; use the recipe it was created with (or --set the same overrides)")
        torch.manual_seed(self.cfg.seed + self.stage_n)
        self.param_counts = self.model.freeze_except(self.stage.trainable, self.cfg.freeze_vision_embeddings)
        # residual dropout 0.05 (tech report scripts): a training-time setting, not part of the weights;
        # which layers recompute their activations follows the memory plan, made once the engine is built
        self.model.configure_training(self.cfg.attention, self.cfg.ce_chunk, 0,
                                      compile_layers=self.cfg.compile and self.device.type == "cuda",
                                      dropout=self.cfg.dropout)
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.frozen_names = [n for n, p in self.model.named_parameters() if not p.requires_grad]
        self.model.to(self.device)
        self.model.vq.float()
        self.flops = FlopCounter.for_model(self.model)

    def _build_data(self) -> None:
        builder = SequenceBuilder(self.model.tokens, self.tokenizer, self.model.config)
        stage = self.stage
        weighted = [k for k, w in stage.source_weights.items() if w > 0]
        sources = weighted or list(stage.sources) or None
        self.dataset = ShardDataset(self.data, builder, sources=sources, splits=["train"])
        if len(self.dataset) == 0:
            raise ValueError(f"{self.data}: no training records for stage {self.stage_n} "
                             f"(sources {sources or 'all'})")
        seed = self.cfg.seed + 1000 * self.stage_n
        if weighted:  # the mixture by source
            pools, weights, kind = self.dataset.record_sources(), dict(stage.source_weights), "sources"
        else:  # by task ratio over the stage's sources
            pools, kind = self.dataset.tasks(), "tasks"
            weights = {"understanding": stage.understanding_ratio, "generation": stage.generation_ratio,
                       "text": stage.text_ratio}
        self.sampler = MixtureSampler(pools, weights, seed=seed, kind=kind)
        self.mixture_kind = kind
        self.mixture = effective_mixture(pools, {k: w for k, w in weights.items() if w > 0},
                                         stage.batch_size * stage.max_steps)
        if self.rank == 0:
            (self.out / "mixture.json").write_text(json.dumps({"by": kind, "sources": [m.as_row() for m in self.mixture]},
                                                              indent=1) + "\n")
            log.warning("stage %d mixture by %s: %s", self.stage_n, kind[:-1], "; ".join(
                f"{m.source} {m.share:.1%} ({m.records} records, ~{m.samples} samples, {m.epochs:.2f} epochs)"
                for m in self.mixture))
        self.data_digest = sha256_file(self.data / "index.json")
        self.index_doc = json.loads((self.data / "index.json").read_text())

    def _plan_memory(self) -> MemoryPlan:
        """Micro-batch tokens and checkpointed layers (``unitoken.train.memory``), logged."""
        cfg, stage, layers = self.cfg, self.stage, self.recipe.model.llm.num_layers
        share = math.ceil(stage.batch_size / self.world) * stage.max_seq_len  # every sample fills a row
        tokens = None if cfg.micro_batch_tokens == "auto" else int(cfg.micro_batch_tokens)
        if not cfg.activation_checkpointing:
            pinned = 0
        elif cfg.checkpoint_layers == "auto":
            pinned = None  # the plan chooses (every layer where no plan is made)
        else:
            pinned = layers if cfg.checkpoint_layers == -1 else min(int(cfg.checkpoint_layers), layers)
        budget, free, source = self._activation_budget()
        act = ActivationModel.for_stage(self.recipe, stage)
        if budget is None or (tokens is not None and pinned is not None):
            tokens, n = tokens or share, layers if pinned is None else pinned
            plan = MemoryPlan(tokens, n, source, None if budget is None else round(budget / GIB, 2),
                              round(act.bytes(tokens, n) / GIB, 2), None if free is None else round(free / GIB, 2))
        else:
            varlen = cfg.packing and cfg.attention == "varlen"
            plan = plan_memory(act, budget, max_tokens=tokens or share, min_tokens=tokens or stage.max_seq_len,
                               granularity=64 if varlen or not cfg.packing else stage.max_seq_len,
                               allow_checkpointing=cfg.activation_checkpointing, layers=pinned,
                               source=source, free_bytes=free)
        if self.rank == 0:
            log.warning("stage %d memory plan: %s", self.stage_n, plan.describe(layers))
            (self.out / "memory_plan.json").write_text(json.dumps(dataclasses.asdict(plan), indent=1) + "\n")
        return plan

    def _activation_budget(self) -> tuple[float | None, float | None, str]:
        """(bytes for activations, free bytes measured, source); (None, None, "fixed") on a CPU."""
        if self.cfg.activation_budget_gib > 0:
            return self.cfg.activation_budget_gib * GIB, None, "configured"
        if self.device.type != "cuda":
            return None, None, "fixed"
        free, total = measure_free_bytes(self.device)
        # gradients are placed during the first backward: bf16, plus their accumulation partition
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in self.model.parameters() if p.requires_grad)
        grads = trainable * 4 / (self.world if self.cfg.zero_stage >= 2 else 1)
        return activation_budget(free, total, grads), free, "measured"

    def _start_tracking(self, track: bool, parent_run_id: str | None) -> None:
        if self.rank != 0 or not track:
            return
        if importlib.util.find_spec("mlflow") is None:  # `pip install .` without the [pipeline] extra
            log.warning("stage %d is not tracked: MLflow is not installed (pip install 'unitoken[pipeline]', "
                        "or pass --no-track to say so)", self.stage_n)
            return
        self.tracker = MLflowTracker(f"stage{self.stage_n}", self.out, run_id=self.state.mlflow_run_id,
                                     parent_run_id=parent_run_id,
                                     tags={"unitoken.stage": str(self.stage_n), "unitoken.recipe": self.recipe.name})
        self.checkpoints.tracker = self.tracker
        if self.state.mlflow_run_id is None:  # a resumed run has its params already
            _log_stage_start(self)

    # ----------------------------------------------------------------------- the loop

    def train(self) -> StageResult:
        """Run the remaining steps, then write ``out/handoff``."""
        metrics_path = self.out / "metrics.jsonl"
        _truncate_metrics(metrics_path, self.state.step)
        start = time.perf_counter()
        try:
            losses = self._loop(metrics_path)
        except Stopped as stop:
            self.tracker.set_tags({"unitoken.stopped_at_step": str(stop.step)})
            self.tracker.close("KILLED")  # reopened by the resumed run
            raise
        seconds = time.perf_counter() - start
        handoff = self._hand_off(metrics_path, losses, seconds)
        return StageResult(self.stage_n, self.stage.max_steps, handoff, losses, self.tracker.run_id, seconds)

    def _loop(self, metrics_path: Path) -> list[float]:
        """draw -> cut into micro-batches -> forward/backward each -> step -> log -> checkpoint."""
        losses = read_losses(metrics_path)
        self._cursor = self.state.draws  # the prefetch thread's position in the data stream
        self.engine.train()
        self._engine_norms = False  # whether the engine reports the gradient norm (learnt at the first step)
        remaining = self.stage.max_steps - self.state.step
        with _progress(self.show_progress and self.rank == 0) as bar, open(metrics_path, "a") as metrics_file, \
                _sigterm_flag() as sigterm, Prefetch(self._draw, remaining, depth=self.cfg.prefetch) as prefetch, \
                self.checkpoints.draining():
            task = bar.add_task("train", total=self.stage.max_steps, completed=self.state.step, stage=self.stage_n,
                                loss=float("nan"), tps=0)
            for step in range(self.state.step + 1, self.stage.max_steps + 1):
                t0 = time.perf_counter()
                drawn = prefetch.get()
                with profiled(self.out / f"profile_step{step}.txt", step == self.cfg.profile_step and self.rank == 0):
                    row = self.train_step(drawn, step, t0)
                self.state.step, self.state.draws, self.state.sampler = step, drawn.draws, drawn.sampler_state
                losses.append(row["loss"])
                self._record(row, drawn, metrics_file)
                bar.update(task, completed=step, loss=row["loss"], tps=row["tokens_per_s"])
                last = step == self.stage.max_steps
                if parallel.any_rank(sigterm["set"]) and not last:  # the last step writes the hand-off anyway
                    raise Stopped(self.stage_n, step, self.checkpoints.save(self._client_state(), wait=True))
                if step % self.cfg.save_every == 0 and not last:
                    self.checkpoints.save(self._client_state())
                else:
                    self.checkpoints.publish_if_written()
            self.checkpoints.publish()
        return losses

    def _client_state(self) -> dict:
        self.state.mlflow_run_id = self.tracker.run_id
        return self.state.capture(self.device)

    def _draw(self) -> Drawn:
        """The next step's micro-batches, collated on the CPU (runs on the prefetch thread)."""
        cfg, stage = self.cfg, self.stage
        samples, self._cursor = draw_batch(self.dataset, self.sampler, stage.batch_size, self.rank, self.world,
                                           self._cursor, cfg.seed, cfg.cfg_dropout)
        micro = []
        for group in split_micro_batches(samples, self.plan.micro_batch_tokens, cfg.packing, cfg.attention,
                                         stage.max_seq_len):
            batch = collate(group, stage, cfg.packing, self.model.tokens.pad, "cpu", cfg.loss_reduction, cfg.attention)
            counts = count_batch(group, batch)
            micro.append(MicroBatch(group, pin(batch) if self.device.type == "cuda" else batch, counts))
        return Drawn(micro, self._cursor, self.sampler.state_dict(), self.flops.of(samples))

    def train_step(self, drawn: Drawn, step: int, t0: float) -> dict:
        """One optimizer step over the micro-batches of ``drawn``; the step's metrics row.

        Each micro-batch's loss is its part of the global batch's (normalised by the whole step's
        counts on all ranks); DeepSpeed accumulates their gradients and steps once at the end.
        The only host syncs are one all-reduce of the counts and one of the step's values.

        Raises:
            FloatingPointError: the loss is not finite (before the weights change).
        """
        total = global_batch_counts(drawn.counts)
        parts = []
        last = len(drawn.micro) - 1
        for i, mb in enumerate(drawn.micro):
            self.engine.set_gradient_accumulation_boundary(i == last)
            batch = to_device(mb.batch, self.device, non_blocking=True)
            out = self.engine(**as_part_of_global_batch(batch, mb.counts, total, self.cfg.loss_reduction))
            # DeepSpeed averages the ranks' gradients; the global batch's is their sum
            self.engine.backward(out["loss"] * self.grad_divisor)
            parts.append(torch.stack([out[k].detach().float() for k in ("loss", "ce", "z_loss")]))
        values = torch.stack(parts).sum(0).tolist() + [drawn.flops]
        loss, ce, z, flops = parallel.sum_over_ranks(values)  # the global batch's, the same on every rank
        if not math.isfinite(loss):
            raise FloatingPointError(f"stage {self.stage_n}: non-finite loss ({loss}) at step {step}")
        grad_norm, lrs = self._optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": round(loss, 6), "ce": round(ce, 6), "z_loss": round(z, 4),
               "lr": lrs.get("rest", next(iter(lrs.values()))), "grad_norm": round(float(grad_norm), 6),
               "tokens": total.tokens, "tokens_per_s": round(total.tokens / dt, 1), "step_s": round(dt, 4),
               "micro_batches": len(drawn.micro), "drawn": dict(drawn.sampler_state["drawn"])}
        if "vision" in lrs:
            row["vision_lr"] = lrs["vision"]
        if self.device.type == "cuda":
            row["mfu"] = round(flops / dt / (H100_H200_PEAK_BF16 * self.world), 4)
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
        return row

    def _optimizer_step(self) -> tuple[float, dict[str, float]]:
        """engine.step(); (the step's gradient norm, the learning rates it used)."""
        # ZeRO computes the global norm inside step() (clipping): read before it, it is the
        # previous step's (every GPU run before this fix logged 0.0 at step 1 and after each
        # resume). Without ZeRO the engine reports none: the norm of the local grads, pre-step.
        own_norm = _grad_norm(self.model) if not self._engine_norms else None
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.engine.optimizer.param_groups)}
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        self._engine_norms = reported is not None
        norm = reported if self._engine_norms else own_norm if own_norm is not None else _grad_norm(self.model)
        return float(norm), lrs

    def _record(self, row: dict, drawn: Drawn, metrics_file) -> None:
        if self.rank != 0:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if row["step"] % self.cfg.log_every == 0 or row["step"] == self.stage.max_steps:
            mix = {f"data_drawn_{k}": v for k, v in drawn.sampler_state["drawn"].items()}
            self.tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "drawn")} | mix, step=row["step"])

    # ----------------------------------------------------------------------- the hand-off

    def _hand_off(self, metrics_path: Path, losses: list[float], seconds: float) -> Path:
        """Write ``out/handoff`` (rank 0) from the full fp32 weights; frozen weights are re-read
        from the file the stage started from (exact values, no copy held during training)."""
        frozen_start = _read_tensors(self.init / "model.safetensors", self.frozen_names)
        changed = parallel.check_frozen(self.engine, frozen_start)
        if changed:  # e.g. stage 1 must leave the LLM bit-identical
            raise RuntimeError(f"stage {self.stage_n}: frozen weights changed during training ({changed[:3]}); "
                               "hand-off refused")
        state = parallel.full_state_dict(self.engine, self.trainable_names, frozen_start)
        handoff = self.out / "handoff"
        if self.rank == 0:
            save_model(self.model, self.tokenizer, handoff, state=state, recipe=self.recipe.name)
            doc = handoff_fmt.write_handoff(handoff, self._handoff_info(), state,
                                     [n for n, p in self.model.named_parameters() if p.requires_grad])
            curve = plot_losses(metrics_path, self.out / "loss.png", f"stage {self.stage_n} ({self.recipe.name})")
            t = self.tracker
            t.log_metrics({f"{self.device.type}_hours": seconds * self.world / 3600,
                           "final_loss": losses[-1] if losses else float("nan")}, step=self.stage.max_steps)
            t.set_tags({"unitoken.handoff_uri": handoff.resolve().as_uri(),
                        "unitoken.handoff_sha256": handoff_fmt.handoff_digest(handoff),
                        "unitoken.trainable_digest": doc["trainable_digest"], "unitoken.frozen_digest": doc["frozen_digest"]})
            t.log_artifact(handoff / handoff_fmt.HANDOFF, "handoff")
            t.log_artifact(curve)
            t.log_artifact(metrics_path)
            t.close("FINISHED")
        parallel.barrier()
        return handoff

    def _handoff_info(self) -> dict:
        recipe = self.recipe
        return {"stage": self.stage_n, "step": self.stage.max_steps, "recipe": recipe.name,
                "model_config_hash": config_hash(recipe.model), "recipe_hash": config_hash(recipe),
                "data_dir": str(self.data.resolve()), "data_digest": self.data_digest,
                "parent": str(self.init.resolve()), "parent_stage": self.parent.get("stage", 0),
                "parent_digest": self.parent_digest, "mlflow_run_id": self.tracker.run_id,
                "trainable": list(self.stage.trainable), "manifest_sha256": self.index_doc.get("manifest_sha256"),
                "validation_report_sha256": self.index_doc.get("validation_report_sha256"),
                "mixture": [m.as_row() for m in self.mixture], "ancestors": handoff_fmt.ancestry(self.init)}


def main(stage_n: int, recipe: Recipe, data: Path, out: Path, init: str | Path, resume: str = "auto",
         max_steps: int | None = None, track: bool = True, show_progress: bool = True,
         parent_run_id: str | None = None) -> StageResult:
    """Run one stage end to end and write ``out/handoff``."""
    return Trainer(stage_n, recipe, data, out, init, resume, max_steps, track, show_progress, parent_run_id).train()


# --------------------------------------------------------------------------- helpers


@contextmanager
def _sigterm_flag() -> Iterator[dict]:
    """{"set": bool}, True once SIGTERM arrived (the default handler would lose the steps since
    the last periodic checkpoint). Outside the main thread nothing is installed."""
    flag = {"set": False}

    def handler(signum, frame) -> None:
        flag["set"] = True
        log.warning("SIGTERM: stopping after this step with a checkpoint")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress(show: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("stage {task.fields[stage]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                    TimeRemainingColumn(), disable=not show, transient=False)


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {n: f.get_tensor(n) for n in names}


def read_losses(path: Path) -> list[float]:
    """The per-step losses of a stage's ``metrics.jsonl`` (empty if there is none)."""
    if not path.is_file():
        return []
    return [json.loads(x)["loss"] for x in path.read_text().splitlines() if x.strip()]


def _truncate_metrics(path: Path, keep_steps: int) -> None:
    """Drop metric rows past the checkpoint we resume from (they are recomputed identically)."""
    if not path.is_file():
        return
    rows = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= keep_steps]
    path.write_text("".join(r + "\n" for r in rows))


def _log_stage_start(trainer: Trainer) -> None:
    """Params (the resolved recipe flattened, the memory plan), the configs and the data set."""
    t, recipe, stage_n, out = trainer.tracker, trainer.recipe, trainer.stage_n, trainer.out
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    walk("", {"model": to_dict(recipe.model), "train": to_dict(recipe.train)})
    flat.update({"stage": stage_n, "recipe": recipe.name, "init": str(trainer.init), "init_digest": trainer.parent_digest,
                 "data": str(trainer.data), "world_size": trainer.world, "device": trainer.device.type,
                 "trainable_parameters": trainer.param_counts["trainable"],
                 "frozen_parameters": trainer.param_counts["frozen"],
                 **{f"stage.{k}": v for k, v in flat.items() if k.startswith(f"train.stage{stage_n}.")},
                 **trainer.plan.as_params(),
                 **{f"mixture.{m.source}.{k}": v for m in trainer.mixture
                    for k, v in m.as_row().items() if k != "source"}})
    t.log_params(flat)
    (out / "deepspeed.json").write_text(json.dumps(trainer.ds_config, indent=2))
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
    t.log_artifact(out / "deepspeed.json")
    t.log_artifact(out / "recipe.json")
    index = trainer.index_doc
    # the mixture first: the run page names the first input and counts the rest ("+3")
    mixture = "mixture " + ", ".join(f"{m.source} {m.share:.0%}" for m in trainer.mixture)
    mix_digest = hashlib.sha256(json.dumps([m.as_row() for m in trainer.mixture]).encode()).hexdigest()[:16]
    t.log_dataset(mixture[:480], mix_digest, str(trainer.data.resolve()), [m.as_row() for m in trainer.mixture])
    rows = [{"shard": s["name"], "records": s["records"], "images": s["images"]} for s in index["shards"]]
    t.log_dataset(f"pretokenized:{trainer.data.name}", trainer.data_digest[:16], str(trainer.data.resolve()), rows)
    for m in trainer.mixture:  # and each source as an input of its own
        digest = hashlib.sha256(f"{trainer.data_digest}:{m.source}:{m.weight}".encode()).hexdigest()[:16]
        t.log_dataset(f"{trainer.mixture_kind[:-1]}:{m.source}", digest, str(trainer.data.resolve()), [m.as_row()])
    t.set_tags({"unitoken.data_digest": trainer.data_digest, "unitoken.manifest_sha256": index["manifest_sha256"],
                "unitoken.train_records": str(len(trainer.dataset))})


def plot_losses(metrics_path: Path, png: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
