"""Where a guard model runs, and in which dtype."""

from __future__ import annotations

import torch

from model.local_engine import pick_device


def device_and_dtype(choice: str) -> tuple[torch.device, torch.dtype]:
    """`pick_device(choice)` ("auto", "cuda" or "cpu"): bfloat16 on CUDA, float32 on the CPU."""
    device = pick_device(choice)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32
