"""Which device a command computes on: the one place that decides."""

from __future__ import annotations

import os

import torch


def pick_device(name: str = "auto") -> str:
    """``"auto"``: ``$UNITOKEN_DEVICE`` when set (a served model's pods), else ``cuda`` when a GPU
    is visible, else ``cpu``; any other name as given (``cpu``, ``cuda``, ``cuda:1``)."""
    if name != "auto":
        return name
    return os.environ.get("UNITOKEN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
