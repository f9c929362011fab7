"""Where a model runs, and in which dtype: the one rule for the engines and the guard models.

"auto" takes CUDA when there is one, else the CPU. bfloat16 on CUDA (the checkpoints' own
dtype); float32 on the CPU, where bfloat16 matmuls are slow or missing.
"""

from __future__ import annotations

import torch


def pick_device(choice: str) -> torch.device:
    """The device for `choice`: "cpu", "cuda" or "auto"."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def dtype_for(device: torch.device) -> torch.dtype:
    """The weights' dtype on `device`."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_and_dtype(choice: str) -> tuple[torch.device, torch.dtype]:
    """`pick_device(choice)` and its dtype."""
    device = pick_device(choice)
    return device, dtype_for(device)
