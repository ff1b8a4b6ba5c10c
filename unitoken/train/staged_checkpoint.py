"""Periodic checkpoints that block training only while the state is copied to host memory.

DeepSpeed writes every file of a checkpoint through ``engine.checkpoint_engine.save(state_dict,
path)``. ``StagedCheckpointEngine`` takes the stock engine's place:
- ``save`` copies each tensor into a host buffer, pinned when it comes from the GPU. The buffers
  are allocated at the first save and reused. This copy is the only part training waits for.
  The file is then queued.
- One background thread writes the queued files with ``torch.save`` and fsyncs each one.

The files are in DeepSpeed's own format, so ``engine.load_checkpoint`` reads them unchanged. The
training loop makes a checkpoint visible (``checkpoint.publish``: meta.json, then one rename)
only after every rank's writer has finished it. A crash mid-write therefore leaves a
``.tmp-`` directory, which is debris, never a checkpoint.

DeepSpeed's own asynchronous engines were the first choice, and neither fits:
- ``DecoupledCheckpointEngine`` and ``FastCheckpointEngine`` write through DeepNVMe's ``async_io``
  op, which needs libaio and a compiled extension;
- the decoupled one hands the live tensors to a writer process and waits for it at the next
  ``step()``, so its snapshot is only consistent because training stalls there.

``torch.distributed.checkpoint.async_save`` stages the same way but writes its own layout, and
DeepSpeed's ZeRO loader cannot read that.

Host memory: one copy of what this rank saves. With ZeRO that is its partition of the fp32
master weights and the Adam moments (12 bytes per parameter / ranks), plus, on rank 0, the
module's weights.
"""

from __future__ import annotations

import copy
import os
import queue
import threading

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class StagedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save engine with the write moved to a background thread (see the module)."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "StagedCheckpointEngine"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    # -- DeepSpeed's interface
    def create(self, info) -> None:
        # a new checkpoint reuses the buffers: the previous one must be on disk first
        self.wait()
        super().create(info)

    def save(self, state_dict, path: str) -> None:
        self._raise()
        staged = self._stage(state_dict, (os.path.basename(path),))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies have landed before training goes on
        self._queue.put((staged, path))

    # -- the training loop's interface
    def done(self) -> bool:
        """Whether every queued file is written and fsynced (raises the writer's error, if any)."""
        self._raise()
        return self._queue.unfinished_tasks == 0

    def wait(self) -> None:
        """Block until every queued file is on disk; raise the writer's error, if any."""
        self._queue.join()
        self._raise()

    def drain(self) -> None:
        """Let the writer finish, ignoring its errors: the loop is failing anyway and nothing of it
        is published. No thread then writes into a directory the next run cleans up."""
        self._queue.join()

    # -- internals
    def _stage(self, obj, key: tuple):
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[key] = buf
            buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
            return buf
        if isinstance(obj, dict):
            staged = {k: self._stage(v, key + (k,)) for k, v in obj.items()}
            return staged if type(obj) is dict else type(obj)(staged)
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self._stage(v, key + (i,)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _write_loop(self) -> None:
        while True:
            staged, path = self._queue.get()
            try:
                if self._error is None:
                    torch.save(staged, path, _use_new_zipfile_serialization=self.zipfile_serialization)
                    with open(path, "rb+") as fh:
                        os.fsync(fh.fileno())
            except BaseException as err:  # handed to the training thread by the next done()/wait()
                self._error = err
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint writer failed: {err}") from err
