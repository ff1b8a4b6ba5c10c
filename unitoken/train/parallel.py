"""The ONLY module that imports deepspeed: config builder, engine wrapping, checkpoints.

One process on a CPU (gloo), or many under ``deepspeed``/``torchrun`` (NCCL), through the same
entry point. The DeepSpeed JSON is built from ``TrainConfig``/``StageConfig``, never edited by
hand, and logged as an artifact.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import torch

from unitoken.config import StageConfig, TrainConfig

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    # what DeepSpeed would detect anyway, said up front: its detection warns on every CPU run
    os.environ["DS_ACCELERATOR"] = "cpu"


def ds_config(train: TrainConfig, stage: StageConfig, world_size: int = 1) -> dict:
    """DeepSpeed configuration for one stage (batch sizes are per optimizer step)."""
    micro = max(1, stage.batch_size // world_size)
    cfg = {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": stage.optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The optimizer is ours (AdamW with a separate ViT learning rate), not DeepSpeed's.
        "zero_allow_untested_optimizer": True,
    }
    if train.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True,
                                         "overlap_comm": True, "contiguous_gradients": True})
    elif train.zero_stage in (1, 2):
        cfg["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
    return cfg


def validate_ds_config(cfg: dict) -> None:
    """Let DeepSpeed itself parse the config (no process group needed)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(dict(cfg), mpu=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Start (or join) the process group: returns (rank, world_size, device).

    A plain single process gets the environment a launcher would set (else DeepSpeed looks
    for mpi4py or asserts on LOCAL_RANK).
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # Micro-batches of varying length fragment the caching allocator's fixed-size segments (the
    # small study's stage 2 ran out of memory on 80 GB without this); read at the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if os.environ.get("WORLD_SIZE") == "1":
            # DeepSpeed JIT-compiles its shared-memory all-reduce for every CPU process group
            # (85 s of a fresh clone's `make demo` on 2 cores); one process reduces with no one.
            # Gloo does the rest, as it does wherever that op is unavailable. (By module name:
            # the attribute deepspeed.comm.torch is torch itself, shadowed by deepspeed.comm's imports.)
            import importlib

            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def wrap(model: torch.nn.Module, optimizer, scheduler, config: dict, staged_checkpoints: bool = False):
    """deepspeed.initialize with our optimizer and schedule -> engine. ``staged_checkpoints``:
    periodic checkpoints are copied to host memory and written in the background
    (``unitoken.train.staged_checkpoint``)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if staged_checkpoints:
        from unitoken.train.staged_checkpoint import StagedCheckpointEngine

        engine.checkpoint_engine = StagedCheckpointEngine(engine._config)
    return engine


def save_checkpoint(engine, directory: Path, client_state: dict) -> None:
    """Model, optimizer and schedule state, plus ``client_state``, into ``directory``/ckpt."""
    engine.save_checkpoint(str(directory), tag="ckpt", client_state=client_state, save_latest=False)


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed puts into its checkpoints (loss scalers, ZeRO metadata),
    allowed for ``torch.load(weights_only=True)``; anything else in a checkpoint is refused."""
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [loss_scaler.LossScaler, loss_scaler.DynamicLossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # older layouts: nothing to allow
        pass
    return allowed


def _load_without_pickle(path: str, map_location=None):
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{path}: refusing to unpickle a checkpoint with code objects in it; "
                                     f"only tensors and DeepSpeed's known state are allowed ({err})") from None


def load_checkpoint(engine, directory: Path) -> dict:
    """Resume state from ``directory``/ckpt; DeepSpeed's files are read with
    ``torch.load(weights_only=True)`` (its own engine would unpickle arbitrary objects)."""
    engine.checkpoint_engine.load = _load_without_pickle
    path, client_state = engine.load_checkpoint(str(directory), tag="ckpt", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
    return client_state


def full_state_dict(engine, trainable: set[str], frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights to hand off, on CPU, in fp32 where training happened in bf16.

    Trainable parameters come from the optimizer's fp32 master copy (gathered across ZeRO
    partitions; collective, so every rank calls this). Frozen ones are ``frozen``, the exact
    values the stage started from: bf16 training casts the module, and handing off that cast
    would silently round the frozen LLM.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    params = dict(module.named_parameters())
    state = {}
    for name in module.state_dict().keys():
        if name in trainable:
            full = safe_get_full_fp32_param(params[name])
            state[name] = (full if full is not None else params[name]).detach().float().cpu().clone()
        elif name in frozen:
            state[name] = frozen[name]
        else:  # a buffer
            state[name] = module.state_dict()[name].detach().cpu().clone()
    return state


def check_frozen(engine, frozen: dict[str, torch.Tensor]) -> list[str]:
    """Names of frozen parameters whose module value is not the start value (at the module's dtype)."""
    if engine.zero_optimization_stage() == 3:
        return []  # partitioned; frozen params are outside the optimizer and receive no update
    params = dict(engine.module.named_parameters())
    return [n for n, v in frozen.items() if n in params
            and not torch.equal(params[n].detach().cpu(), v.to(params[n].dtype))]


def _collective_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces only CUDA tensors


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (one all-reduce when distributed)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, the same on every rank (one all-reduce of
    a small float64 tensor: counts stay exact, and one process gets its values back unchanged)."""
    if not torch.distributed.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


def gradient_average_divisor(engine) -> int:
    """What DeepSpeed divides the summed gradients of the ranks by: the data-parallel world size
    (every ZeRO stage averages over ranks). A loss that is each rank's part of the global batch's
    loss is multiplied by this before backward, so the averaged gradient is the global batch's.
    Gradient accumulation, which would divide by its steps too, is off (``ds_config``)."""
    return engine.dp_world_size


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
