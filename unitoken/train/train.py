"""The three UniToken training stages on DeepSpeed.

    unitoken train --stage 1 --recipe tiny --data p --out runs/stage1 --init m
    unitoken train --stage 2 --recipe tiny --data p --out runs/stage2 --init runs/stage1/handoff
    deepspeed --num_gpus 8 --module unitoken.cli train --stage 2 --recipe unitoken-7b ...   # same entry point

Stages differ only through recipe data: ``trainable`` prefixes (stage 1: vision + adapter, LLM
frozen), learning rates (stage 1: 1e-3 with the ViT at 1e-5, because 5e-4 collapsed SigLIP in
the tech report §4), the task ratio and the manifest sources. ``main`` builds, ``fit`` loops,
the end of a stage writes the hand-off checkpoint that the next stage verifies and loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from unitoken.config import Recipe, StageConfig, config_hash, to_dict
from unitoken.data.dataset import (
    MixtureSampler,
    Sample,
    ShardDataset,
    check_fits,
    pack_samples,
    pad_samples,
    sample_loss_weights,
)
from unitoken.files import sha256_file
from unitoken.model.io import is_handoff_dir, load_model, save_model
from unitoken.model.sequence import IGNORE, T2I_TEMPLATE, SequenceBuilder
from unitoken.train import checkpoint as ckpt
from unitoken.train import parallel
from unitoken.train.tracking import MLflowTracker, NullTracker

log = logging.getLogger(__name__)
H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s, spec sheet


class Stopped(Exception):
    """SIGTERM arrived (a preempted node, a suspended TrainJob, a deadline): the loop finished its
    step, saved a checkpoint there and stopped; ``--resume auto`` goes on from it."""

    def __init__(self, stage_n: int, step: int, checkpoint: Path) -> None:
        super().__init__(f"stage {stage_n} stopped by SIGTERM after step {step}; checkpoint {checkpoint}; "
                         "run the same command with --resume auto to go on")
        self.step, self.checkpoint = step, checkpoint


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


@dataclass
class StageResult:
    stage: int
    steps: int
    handoff: Path
    losses: list[float]
    mlflow_run_id: str | None
    seconds: float


# --------------------------------------------------------------------------- building blocks


def build_optimizer(model: torch.nn.Module, stage: StageConfig):
    """AdamW with the ViT in its own group (its own LR), no decay on biases/norms; warmup + cosine."""
    groups = {"vision": ([], []), "rest": ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "vision" if name.startswith("vision.") else "rest"
        groups[key][0 if p.ndim >= 2 and "embed" not in name else 1].append(p)
    o = stage.optim
    params = []
    for key, (decay, no_decay) in groups.items():
        lr = o.vision_lr if key == "vision" else o.lr
        for ps, wd in ((decay, o.weight_decay), (no_decay, 0.0)):
            if ps:
                params.append({"params": ps, "lr": lr, "weight_decay": wd, "name": f"{key}{'' if wd else '_no_decay'}"})
    # fused: one kernel for the whole update on a GPU instead of a loop over tensors
    fused = all(p.is_cuda for g in params for p in g["params"])
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused or None)
    warmup = max(1, round(o.warmup_fraction * stage.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, stage.max_steps - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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


def collate(samples: list[Sample], stage: StageConfig, packing: bool, pad_id: int, device,
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


def global_batch_counts(local: BatchCounts) -> BatchCounts:
    """The counts summed over all ranks (one all-reduce)."""
    return BatchCounts(*(int(x) for x in parallel.sum_over_ranks(list(local))))


def as_part_of_global_batch(batch: dict, local: BatchCounts, total: BatchCounts, loss_reduction: str) -> dict:
    """Model inputs whose loss is this rank's part of the global batch's loss, so that the ranks'
    losses sum to what one process gets for the whole batch: the token mean and the z-loss divide
    by the supervised tokens of all ranks, and each sample weighs 1 / (samples of all ranks).
    Normalising by each rank's own counts made the loss depend on the world size (issue 19).
    In one process nothing changes (the factors are exactly 1)."""
    batch = dict(batch, num_global_tokens=total.supervised)
    if loss_reduction == "sample":  # sample_loss_weights sums to 1 over this rank's samples
        batch["loss_weights"] = batch["loss_weights"] * (local.samples / total.samples)
    return batch


def to_device(batch: dict, device) -> dict:
    out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if out.get("images") is not None:
        out["images"].pixel_values = out["images"].pixel_values.to(device)
    return out


@dataclass
class Drawn:
    """One collated batch (on the CPU) and the data stream's position right after it."""
    samples: list[Sample]
    batch: dict
    draws: int
    sampler_state: dict


class Prefetch:
    """Draws and collates the next batches on a thread while the accelerator runs the current one
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


# Activation bytes one decoder layer keeps per token and hidden unit in bf16 without
# checkpointing: 'ours' minus 'ours-ckpt-half' (4 of 8 layers) = 12.7 GiB for a 16,248-token
# micro-batch at hidden 4096 / MLP 11,008 (docs/performance.md). A checkpointed layer keeps only
# its input (2 bytes).
ACT_BYTES_PER_TOKEN_HIDDEN = 53


def checkpoint_layers_for_budget(num_layers: int, hidden: int, tokens: int, budget_bytes: float) -> int:
    """Fewest decoder layers to checkpoint so that one micro-batch's activations fit the budget
    (each checkpointed layer costs a recomputed forward pass: ~1/3 of its step time)."""
    full, kept = ACT_BYTES_PER_TOKEN_HIDDEN * hidden * tokens, 2 * hidden * tokens
    for n in range(num_layers + 1):
        if (num_layers - n) * full + n * kept <= budget_bytes:
            return n
    return num_layers


def model_flops_per_token(model, trainable_only: bool = False) -> float:
    """6N per trained token (forward + backward), N = parameters that see the token."""
    n = sum(p.numel() for name, p in model.named_parameters()
            if not name.startswith("vq.") and (p.requires_grad or not trainable_only))
    return 6.0 * n


# --------------------------------------------------------------------------- main


def main(stage_n: int, recipe: Recipe, data: Path, out: Path, init: str | Path, resume: str = "auto",
         max_steps: int | None = None, track: bool = True, show_progress: bool = True) -> StageResult:
    """Run one stage end to end and write ``out/handoff``."""
    stage = recipe.train.stage(stage_n)
    if max_steps is not None:
        stage = dataclasses.replace(stage, max_steps=max_steps)
    rank, world, device = parallel.init_distributed()
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        # The loop's CPU work is small per-sample tensor ops. With every core as an OpenMP thread,
        # two torch processes on one host (ranks, an evaluation beside training) spin against
        # each other: a batch's tile conversion went from 10 ms to 1.6 s, and GPU steps 2-10x slower.
        torch.set_num_threads(min(4, torch.get_num_threads()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if str(init).startswith("models:/"):  # a registered model: fetched and verified first
        from unitoken.registry import load_uri

        init = load_uri(str(init))
    init = Path(init)

    # --- the starting point: verify before loading
    if stage_n > 1 and recipe.model.encoder_mode == "discrete" and not (init / ckpt.HANDOFF).is_file() \
            and is_handoff_dir(init):
        # Stage 1 trains only the continuous path (vision + adapter), which a discrete-only model
        # lacks: its stage 2 starts from the initialisation (the Table 5 ablation).
        parent = {"stage": 0, "files": {}}
    elif stage_n > 1:
        # Stage N starts from stage N-1; re-running stage N on new data from a stage-N model (e.g. a
        # registered champion, stage-scoped retraining) is allowed too.
        parent = ckpt.verify_handoff(init, expect_stage=(stage_n - 1, stage_n),
                                     expect_config_hash=config_hash(recipe.model))
    elif (init / ckpt.HANDOFF).is_file():
        parent = ckpt.verify_handoff(init, expect_config_hash=config_hash(recipe.model))
    elif is_handoff_dir(init):
        parent = {"stage": 0, "files": {}}
    else:
        raise FileNotFoundError(f"--init {init}: not a model directory; create one with `unitoken model init`")
    parent_digest = ckpt.handoff_digest(init)
    model, tokenizer = load_model(init)
    if config_hash(model.config) != config_hash(recipe.model):
        raise ValueError(f"--init {init} was built with a different model config than recipe {recipe.name!r}; "
                         "use the recipe it was created with (or --set the same overrides)")
    torch.manual_seed(recipe.train.seed + stage_n)
    counts = model.freeze_except(stage.trainable, recipe.train.freeze_vision_embeddings)
    train_cfg = recipe.train
    ckpt_layers = train_cfg.checkpoint_layers if train_cfg.activation_checkpointing else 0
    if train_cfg.activation_checkpointing and train_cfg.activation_budget_gib > 0:
        # upper bound of one micro-batch: every sample of this rank's share fills a row
        tokens = max(1, stage.batch_size // world) * stage.max_seq_len
        ckpt_layers = checkpoint_layers_for_budget(recipe.model.llm.num_layers, recipe.model.llm.hidden_size, tokens,
                                                   train_cfg.activation_budget_gib * 2**30)
        log.warning("activation checkpointing on %d of %d layers (budget %.1f GiB, <= %d tokens per micro-batch)",
                    ckpt_layers, recipe.model.llm.num_layers, train_cfg.activation_budget_gib, tokens)
    # residual dropout 0.05 (tech report scripts): a training-time setting, not part of the weights
    model.configure_training(train_cfg.attention, train_cfg.ce_chunk, ckpt_layers,
                             compile_layers=train_cfg.compile and device.type == "cuda", dropout=train_cfg.dropout)
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_names = [n for n, p in model.named_parameters() if not p.requires_grad]
    model.to(device)
    model.vq.float()
    builder = SequenceBuilder(model.tokens, tokenizer, model.config)

    dataset = ShardDataset(data, builder, sources=list(stage.sources) or None, splits=["train"])
    if len(dataset) == 0:
        raise ValueError(f"{data}: no training records for stage {stage_n} (sources {list(stage.sources) or 'all'})")
    ratios = {"understanding": stage.understanding_ratio, "generation": stage.generation_ratio,
              "text": stage.text_ratio}
    sampler = MixtureSampler(dataset.tasks(), ratios, seed=recipe.train.seed + 1000 * stage_n)
    data_digest = sha256_file(Path(data) / "index.json")
    index_doc = json.loads((Path(data) / "index.json").read_text())

    opt, sched = build_optimizer(model, stage)
    ds_cfg = parallel.ds_config(recipe.train, stage, world)
    engine = parallel.wrap(model, opt, sched, ds_cfg, staged_checkpoints=recipe.train.async_checkpoint)

    # --- resume
    ckpt_root = out / "checkpoints"
    start_step, draws, run_id = 0, 0, None
    if rank == 0:
        ckpt.clean_debris(ckpt_root)
    parallel.barrier()
    found = ckpt.complete_checkpoints(ckpt_root)
    if resume == "auto" and found:
        step_done, path = found[-1]
        state = parallel.load_checkpoint(engine, path)
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_step, draws, run_id = state["step"], state["draws"], state.get("mlflow_run_id")
        log.warning("resuming stage %d from %s (step %d)", stage_n, path, start_step)
    elif resume == "never" and found:
        raise ValueError(f"{out} already holds checkpoints (up to step {found[-1][0]}); use --resume auto or a new --out")

    tracker = NullTracker()
    if rank == 0 and track:
        tracker = MLflowTracker(f"stage{stage_n}", out, run_id=run_id,
                                tags={"unitoken.stage": str(stage_n), "unitoken.recipe": recipe.name})
        if run_id is None:
            _log_stage_start(tracker, recipe, stage_n, stage, ds_cfg, out, init, parent_digest, data, data_digest,
                             dataset, counts, world, device)
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_step)

    # --- fit
    flops_per_token = model_flops_per_token(model)
    start_time = time.perf_counter()
    try:
        losses = fit(engine, model, dataset, sampler, stage, recipe, stage_n, start_step, draws, rank, world, device,
                     tracker, metrics_path, ckpt_root, flops_per_token, run_getter=lambda: tracker.run_id,
                     show_progress=show_progress and rank == 0)
    except Stopped as stop:
        tracker.set_tags({"unitoken.stopped_at_step": str(stop.step)})
        tracker.close("KILLED")  # reopened by the resumed run
        raise
    seconds = time.perf_counter() - start_time

    # --- hand-off: frozen weights are re-read from the file the stage started from (exact fp32
    # values, no copy held in memory during training)
    frozen_start = _read_tensors(init / "model.safetensors", frozen_names)
    changed = parallel.check_frozen(engine, frozen_start)
    if changed:  # e.g. stage 1 must leave the LLM bit-identical
        raise RuntimeError(f"stage {stage_n}: frozen weights changed during training ({changed[:3]}); hand-off refused")
    state = parallel.full_state_dict(engine, trainable_names, frozen_start)
    handoff = out / "handoff"
    if rank == 0:
        save_model(model, tokenizer, handoff, state=state, recipe=recipe.name)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        doc = ckpt.write_handoff(handoff, {
            "stage": stage_n, "step": stage.max_steps, "recipe": recipe.name,
            "model_config_hash": config_hash(recipe.model), "recipe_hash": config_hash(recipe),
            "data_dir": str(Path(data).resolve()), "data_digest": data_digest,
            "parent": str(init.resolve()), "parent_stage": parent.get("stage", 0), "parent_digest": parent_digest,
            "mlflow_run_id": tracker.run_id, "trainable": list(stage.trainable),
            "manifest_sha256": index_doc.get("manifest_sha256"),
            "validation_report_sha256": index_doc.get("validation_report_sha256"),
            "ancestors": ckpt.ancestry(init),
        }, state, trainable)
        curve = plot_losses(metrics_path, out / "loss.png", f"stage {stage_n} ({recipe.name})")
        digest = ckpt.handoff_digest(handoff)
        hours = seconds * world / 3600
        tracker.log_metrics({f"{device.type}_hours": hours, "final_loss": losses[-1] if losses else float("nan")},
                            step=stage.max_steps)
        tracker.set_tags({"unitoken.handoff_uri": handoff.resolve().as_uri(), "unitoken.handoff_sha256": digest,
                          "unitoken.trainable_digest": doc["trainable_digest"],
                          "unitoken.frozen_digest": doc["frozen_digest"]})
        tracker.log_artifact(handoff / ckpt.HANDOFF, "handoff")
        tracker.log_artifact(curve)
        tracker.log_artifact(metrics_path)
        tracker.close("FINISHED")
    parallel.barrier()
    return StageResult(stage_n, stage.max_steps, handoff, losses, tracker.run_id, seconds)


def fit(engine, model, dataset, sampler, stage, recipe, stage_n, start_step, draws, rank, world, device, tracker,
        metrics_path: Path, ckpt_root: Path, flops_per_token: float, run_getter, show_progress: bool) -> list[float]:
    """The loop: draw -> pack -> forward/backward/step -> log -> periodic checkpoint."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    train = recipe.train
    pad = model.tokens.pad
    losses = _read_losses(metrics_path)
    bar = Progress(TextColumn("stage {task.fields[stage]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeRemainingColumn(), disable=not show_progress, transient=False)

    # the data stream's position after the last batch trained on (the prefetcher is ahead of it)
    consumed = {"draws": draws, "sampler": sampler.state_dict()}

    cursor = {"draws": draws}  # the prefetch thread's position

    def make() -> Drawn:
        samples, cursor["draws"] = draw_batch(dataset, sampler, stage.batch_size, rank, world, cursor["draws"],
                                              train.seed, train.cfg_dropout)
        batch = collate(samples, stage, train.packing, pad, "cpu", train.loss_reduction, train.attention)
        return Drawn(samples, batch, cursor["draws"], sampler.state_dict())

    writer = engine.checkpoint_engine if train.async_checkpoint else None
    pending: dict = {}  # the periodic checkpoint being written in the background: step, timings
    saves_path = metrics_path.parent / "checkpoints.jsonl"

    def save(step_done: int, wait: bool = False) -> Path:
        """Write the checkpoint of ``step_done``; with the staged writer, training waits only for
        the copy to host memory and the checkpoint is published once written (``publish``)."""
        publish()  # the previous one first: one checkpoint in flight at a time
        client = {"step": step_done, "draws": consumed["draws"], "sampler": consumed["sampler"],
                  "torch_rng": torch.get_rng_state(),
                  "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                  "mlflow_run_id": run_getter()}
        tmp = ckpt.prepare_tmp(ckpt_root, step_done) if rank == 0 else ckpt.tmp_dir(ckpt_root, step_done)
        parallel.barrier()
        t0 = time.perf_counter()
        parallel.save_checkpoint(engine, tmp, client)  # collective: every rank writes (or stages) its part
        pending.update(step=step_done, t0=t0, blocking_s=time.perf_counter() - t0)
        if writer is None or wait:
            publish()
        return ckpt.step_dir(ckpt_root, step_done)

    def publish() -> None:
        """Make the pending checkpoint visible once every rank has it on disk."""
        if not pending:
            return
        if writer is not None:
            writer.wait()
        parallel.barrier()
        if rank == 0:
            ckpt.publish(ckpt_root, pending["step"], {"step": pending["step"], "stage": stage_n, "recipe": recipe.name})
            record = {"step": pending["step"], "blocking_s": round(pending["blocking_s"], 4),
                      "published_after_s": round(time.perf_counter() - pending["t0"], 4), "staged": writer is not None}
            with open(saves_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tracker.log_metrics({"checkpoint_blocking_s": record["blocking_s"]}, step=pending["step"])
        parallel.barrier()
        pending.clear()

    def written() -> bool:
        """Whether the pending checkpoint is on disk on every rank (a collective while one is pending)."""
        return bool(pending) and not parallel.any_rank(not writer.done())

    engine.train()
    grad_divisor = parallel.gradient_average_divisor(engine)
    engine_norms = False  # whether the engine reports the gradient norm (learnt at the first step)
    prefetch = Prefetch(make, stage.max_steps - start_step, depth=train.prefetch)
    with bar, open(metrics_path, "a") as metrics_file, _sigterm_flag() as sigterm, _closing(prefetch), \
            _draining(writer):
        task = bar.add_task("train", total=stage.max_steps, completed=start_step, stage=stage_n, loss=float("nan"), tps=0)
        for step in range(start_step, stage.max_steps):
            t0 = time.perf_counter()
            drawn = prefetch.get()
            samples, batch = drawn.samples, to_device(drawn.batch, device)
            consumed = {"draws": drawn.draws, "sampler": drawn.sampler_state}
            local = count_batch(samples, drawn.batch)
            total = global_batch_counts(local)
            out = engine(**as_part_of_global_batch(batch, local, total, train.loss_reduction))
            loss = out["loss"]  # this rank's part of the global batch's loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"stage {stage_n}: non-finite loss ({loss.item()}) at step {step + 1}")
            # DeepSpeed averages the ranks' gradients; the global batch's is their sum
            engine.backward(loss * grad_divisor)
            # ZeRO computes the global norm inside step() (clipping): read before it, it is the
            # previous step's (every GPU run before this fix logged 0.0 at step 1 and after each
            # resume). Without ZeRO the engine reports none: the norm of the local grads, pre-step.
            own_norm = _grad_norm(model) if not engine_norms else None
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
            engine.step()
            reported = engine.get_global_grad_norm()
            engine_norms = reported is not None
            grad_norm = reported if engine_norms else own_norm if own_norm is not None else _grad_norm(model)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tokens = total.tokens
            # the global batch's values, the same on every rank
            loss_sum, ce_sum, z_sum = parallel.sum_over_ranks([loss.item(), out["ce"].item(), out["z_loss"].item()])
            row = {"step": step + 1, "loss": round(loss_sum, 6), "ce": round(ce_sum, 6),
                   "z_loss": round(z_sum, 4), "lr": lrs.get("rest", next(iter(lrs.values()))),
                   "grad_norm": round(float(grad_norm), 6), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
                   "step_s": round(dt, 4)}
            if "vision" in lrs:
                row["vision_lr"] = lrs["vision"]
            if device.type == "cuda":
                row["mfu"] = round(flops_per_token * tokens / dt / (H200_PEAK_BF16 * world), 4)
            losses.append(row["loss"])
            if rank == 0:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                if (step + 1) % train.log_every == 0 or step + 1 == stage.max_steps:
                    mix = {f"data_drawn_{k}": v for k, v in drawn.sampler_state["drawn"].items()}
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"} | mix, step=step + 1)
            bar.update(task, completed=step + 1, loss=row["loss"], tps=row["tokens_per_s"])
            last = step + 1 == stage.max_steps
            stop = parallel.any_rank(sigterm["set"]) and not last  # the last step writes the hand-off anyway
            if stop:
                raise Stopped(stage_n, step + 1, save(step + 1, wait=True))
            if (step + 1) % train.save_every == 0 and not last:
                save(step + 1)
            elif writer is not None and pending and written():
                publish()
        publish()
    return losses


# --------------------------------------------------------------------------- helpers


@contextmanager
def _draining(writer) -> Iterator[None]:
    """No checkpoint write outlives the loop, whichever way it ends (a failed loop publishes nothing)."""
    try:
        yield
    finally:
        if writer is not None:
            writer.drain()


@contextmanager
def _closing(prefetch: Prefetch) -> Iterator[Prefetch]:
    try:
        yield prefetch
    finally:
        prefetch.close()


def _grad_norm(model: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {n: f.get_tensor(n) for n in names}


def _read_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    return [json.loads(x)["loss"] for x in path.read_text().splitlines() if x.strip()]


def _truncate_metrics(path: Path, keep_steps: int) -> None:
    """Drop metric rows past the checkpoint we resume from (they are recomputed identically)."""
    if not path.is_file():
        return
    rows = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= keep_steps]
    path.write_text("".join(r + "\n" for r in rows))


def _log_stage_start(tracker, recipe, stage_n, stage, ds_cfg, out, init, parent_digest, data, data_digest, dataset,
                     counts, world, device) -> None:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    walk("", {"model": to_dict(recipe.model), "train": to_dict(recipe.train)})
    flat.update({"stage": stage_n, "recipe": recipe.name, "init": str(init), "init_digest": parent_digest,
                 "data": str(data), "world_size": world, "device": device.type,
                 "trainable_parameters": counts["trainable"], "frozen_parameters": counts["frozen"],
                 **{f"stage.{k}": v for k, v in flat.items() if k.startswith(f"train.stage{stage_n}.")}})
    tracker.log_params(flat)
    (out / "deepspeed.json").write_text(json.dumps(ds_cfg, indent=2))
    (out / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
    tracker.log_artifact(out / "deepspeed.json")
    tracker.log_artifact(out / "recipe.json")
    index = json.loads((Path(data) / "index.json").read_text())
    rows = [{"shard": s["name"], "records": s["records"], "images": s["images"]} for s in index["shards"]]
    tracker.log_dataset(f"pretokenized:{Path(data).name}", data_digest[:16], str(Path(data).resolve()), rows)
    tracker.set_tags({"unitoken.data_digest": data_digest, "unitoken.manifest_sha256": index["manifest_sha256"],
                      "unitoken.train_records": str(len(dataset))})


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
