"""The staged checkpoint writer: training may change its tensors right after ``save`` returns."""

import threading

import pytest
import torch

from unitoken.train.staged_checkpoint import StagedCheckpointEngine


def test_saved_file_holds_the_state_at_save_time_and_buffers_are_reused(tmp_path):
    engine = StagedCheckpointEngine()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {"module": {"w": w}, "optimizer": [{"exp_avg": w * 2}], "step": 7, "names": ("w",)}
    engine.save(state, str(tmp_path / "a.pt"))
    w.add_(100)  # the next optimizer step, before the file is written
    engine.wait()
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(back["module"]["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert torch.equal(back["optimizer"][0]["exp_avg"], torch.arange(6, dtype=torch.float32).reshape(2, 3) * 2)
    assert back["step"] == 7 and back["names"] == ("w",)
    buffers = dict(engine._buffers)
    engine.save(state, str(tmp_path / "a.pt"))
    engine.wait()
    assert all(engine._buffers[k] is v for k, v in buffers.items())  # allocated once
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["module"]["w"], w)


def test_writes_happen_off_the_caller_and_a_failed_write_is_raised(tmp_path):
    engine = StagedCheckpointEngine()
    gate = threading.Event()
    real_save = torch.save

    def slow_save(*args, **kwargs):
        gate.wait(10)
        real_save(*args, **kwargs)

    torch.save = slow_save
    try:
        engine.save({"x": torch.ones(3)}, str(tmp_path / "x.pt"))
        assert not engine.done() and not (tmp_path / "x.pt").exists()  # save returned before the write
        gate.set()
        engine.wait()
        assert engine.done() and (tmp_path / "x.pt").is_file()
    finally:
        torch.save = real_save
    engine.save({"x": torch.ones(3)}, str(tmp_path / "missing" / "x.pt"))  # no such directory
    with pytest.raises(RuntimeError, match="checkpoint writer failed"):
        engine.wait()
