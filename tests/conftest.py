"""Shared fixtures: tiny random models built in-process (no hub, no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def build_tiny(mode: str = "dual", anyres: bool = False, seed: int = 0):
    """(model, tokenizer, builder) for the tiny recipe in the given encoder mode."""
    from unitoken.model.io import init_model
    from unitoken.model.sequence import SequenceBuilder
    from unitoken.recipes import get_recipe

    overrides = [f"model.encoder_mode={mode}", f"model.vision.anyres={str(anyres).lower()}"]
    recipe = get_recipe("tiny", overrides)
    model, tok = init_model(recipe.model, seed=seed)
    return model, tok, SequenceBuilder(model.tokens, tok, model.config)


@pytest.fixture(scope="session")
def tiny():
    return build_tiny()
