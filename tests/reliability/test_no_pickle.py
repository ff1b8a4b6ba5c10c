"""Resume checkpoints are read with torch.load(weights_only=True): a file that would run code when
unpickled is refused, DeepSpeed's own state (tensors, loss scaler, ZeRO fragment maps) loads."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from unitoken.train.parallel import _load_without_pickle


class Payload:
    """Unpickling this would call os.system: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "optim_states.pt"
    torch.save({"step": 3, "evil": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        _load_without_pickle(str(path))


def test_deepspeed_state_loads(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}], "ds_version": "0.19.8",
             "rng": torch.get_rng_state(), "sampler": {"draws": 4, "weights": [0.5, 0.5]}}
    path = tmp_path / "ok.pt"
    torch.save(state, path)
    loaded = _load_without_pickle(str(path))
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and loaded["sampler"]["draws"] == 4
    assert loaded["param_slice_mappings"][0]["w"].numel == 2
