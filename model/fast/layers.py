"""Fewer, larger kernels per decoder layer: fused projections, one-kernel norms, rotary in 4 ops.

At batch 1 a decode step is bound by reading the weights once, and by how many kernels it
launches (each costs a few microseconds even inside a CUDA graph). transformers' Mllama text
layer, run op by op, is dozens of kernels per layer (RMSNorm alone is 7: upcast, pow, mean, add,
rsqrt, mul, downcast + weight), and its K and V projections are 8 MB GEMVs too small to reach
the memory bandwidth. Here:

- `fuse_linears`: q/k/v (self-attention) and gate/up (MLP) become one weight each, one GEMV
  each. The modules' own weights are re-pointed at views of the fused tensor, so the memory is
  not doubled and transformers' forward over the same model (the reference, `generate()`)
  still works and reads the same numbers.
- `rms_norm`: `F.rms_norm`, one fused kernel on CUDA (float32 accumulation, as transformers).
- `RotaryTables.rotate`: `x * cos + roll(x) * sin_signed` for the query and key heads together
  (4 ops instead of transformers' 10): `rotate_half(x) = cat(-x2, x1)` is `roll(x, D/2)` with
  the first half negated, and the sign is folded into the sine table; every product and sum is
  the same as transformers', so the result is bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_FUSED = "_fast_fused_weight"  # attribute of a fused module: (fused tensor, fused modules)


def fuse_linears(modules: Sequence[nn.Linear]) -> torch.Tensor:
    """One `[sum(out), in]` weight for bias-free linears over the same input; the modules'
    weights become views of it (no second copy).

    Idempotent: fusing the same modules again (a second engine over the same loaded model)
    returns the same tensor rather than a new copy.
    """
    if any(m.bias is not None for m in modules):
        raise ValueError("only bias-free linears are fused")
    key = tuple(id(m) for m in modules)
    marks = [getattr(m, _FUSED, None) for m in modules]
    if all(mark is not None and mark[1] == key for mark in marks):
        shared: torch.Tensor = marks[0][0]  # type: ignore[index]
        return shared
    fused = torch.cat([m.weight.detach() for m in modules])
    offset = 0
    for m in modules:
        rows = int(m.weight.shape[0])
        m.weight = nn.Parameter(fused[offset : offset + rows], requires_grad=False)
        setattr(m, _FUSED, (fused, key))
        offset += rows
    return fused


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' `MllamaTextRMSNorm` (`weight`, `variance_epsilon`) as one `F.rms_norm`."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


class LayerWeights:
    """Fused weights of one decoder layer (self-attention: qkv and gate_up; cross: gate_up)."""

    def __init__(self, layer: Any, *, cross: bool) -> None:
        mlp = layer.mlp
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj.weight
        self.act = mlp.act_fn
        self.qkv: torch.Tensor | None = None
        if not cross:
            attn = layer.self_attn
            self.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down)


class RotaryTables:
    """RoPE cos/sin for every position of a slot, computed once by the model's rotary module."""

    def __init__(self, rotary: Any, positions: int, dtype: torch.dtype, device: torch.device):
        ids = torch.arange(positions, device=device)[None]
        with torch.inference_mode():
            probe = torch.empty(1, dtype=dtype, device=device)
            cos, sin = rotary(probe, ids)
        self.cos = cos[0].clone()  # [positions, D]
        half = self.cos.shape[-1] // 2
        sign = torch.ones(self.cos.shape[-1], dtype=dtype, device=device)
        sign[:half] = -1
        self.sin_signed = sin[0] * sign

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) rows for these positions, ready to broadcast over heads."""
        return self.cos[positions].unsqueeze(-2), self.sin_signed[positions].unsqueeze(-2)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """`x` `[..., heads, D]` rotated as transformers' `apply_rotary_pos_emb` does."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
