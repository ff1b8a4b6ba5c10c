"""``train.profile_step``: one step under torch.profiler, written as a table people can read.

``OUT/profile_step<N>.txt`` lists the operators by their own accelerator time (CPU time on a
CPU) and says how much of the step's wall time the accelerator was busy: the first question of
any "why is the loop slower than the benchmark".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def profiled(path: Path, active: bool) -> Iterator[None]:
    """Profile the block into ``path`` when ``active`` (the block ends with the device synchronised)."""
    if not active:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    path.write_text(summary(prof.key_averages(), wall, cuda))


def summary(events, wall: float, cuda: bool, rows: int = 45) -> str:
    """The busy share and the operator table of ``prof.key_averages()``."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # the device's own events (kernels, copies): an operator's device time is its kernels' again
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6 if cuda else None
    head = [f"wall {wall:.3f} s (the profiler slows the step)"]
    if busy is not None:
        head.append(f"accelerator busy {busy:.3f} s ({busy / wall:.1%} of the wall time; kernels on "
                    "several streams can add up to more than 100 %)")
    return "\n".join(head) + "\n\n" + events.table(sort_by=key, row_limit=rows, max_name_column_width=70) + "\n"
