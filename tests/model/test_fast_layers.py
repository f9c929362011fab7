"""The fast forward's fused building blocks against transformers' Mllama modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import MllamaTextConfig
from transformers.models.mllama.modeling_mllama import (
    MllamaRotaryEmbedding,
    MllamaTextMLP,
    MllamaTextRMSNorm,
    apply_rotary_pos_emb,
)

from model.fast.layers import LayerWeights, RotaryTables, fuse_linears, rms_norm


def text_config() -> MllamaTextConfig:
    return MllamaTextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        cross_attention_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def test_fused_linears_give_the_same_outputs_on_shared_storage() -> None:
    torch.manual_seed(0)
    q, k, v = (
        nn.Linear(64, 64, bias=False),
        nn.Linear(64, 32, bias=False),
        nn.Linear(64, 32, bias=False),
    )
    x = torch.randn(3, 5, 64)
    want = [m(x) for m in (q, k, v)]
    fused = fuse_linears([q, k, v])
    assert fused.shape == (128, 64)
    got = torch.nn.functional.linear(x, fused).split([64, 32, 32], dim=-1)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # The modules read views of the fused tensor: same numbers, no second copy.
    for m, rows in ((q, slice(0, 64)), (k, slice(64, 96)), (v, slice(96, 128))):
        assert m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert torch.equal(m.weight, fused[rows])
        assert torch.equal(m(x), want[[q, k, v].index(m)])
    with torch.no_grad():  # a change through the fused tensor is what the module computes
        fused[0].zero_()
    assert torch.equal(q.weight[0], torch.zeros(64))


def test_fusing_again_reuses_the_fused_tensor() -> None:
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False)
    first = fuse_linears([a, b])
    assert fuse_linears([a, b]) is first  # a second engine over the same model: no new copy
    assert a.weight.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    # Another grouping of the same modules is a new fusion.
    assert fuse_linears([b, a]) is not first


def test_linears_with_a_bias_are_refused() -> None:
    with pytest.raises(ValueError, match="bias-free"):
        fuse_linears([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_fused_mlp_equals_transformers_mlp() -> None:
    torch.manual_seed(1)
    config = text_config()
    mlp = MllamaTextMLP(config)
    x = torch.randn(2, 7, 64)
    want = mlp(x)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = mlp

    weights = LayerWeights(Layer(), cross=True)
    assert torch.allclose(weights.mlp(x), want, atol=1e-6)
    assert torch.allclose(mlp(x), want, atol=1e-6)  # the module still works on the views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    norm = MllamaTextRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(3, 64) * 5).to(dtype)
    got, want = rms_norm(norm, x), norm(x)
    assert got.dtype == want.dtype
    if dtype == torch.float32:
        assert torch.allclose(got, want, atol=1e-6)
    else:  # transformers rounds to bf16 before the weight, F.rms_norm after: within one step
        assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_rotary_equals_apply_rotary_pos_emb_bit_for_bit() -> None:
    torch.manual_seed(3)
    config = text_config()
    rotary = MllamaRotaryEmbedding(config)
    tables = RotaryTables(rotary, 64, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[0, 5, 17, 63]])
    q = torch.randn(1, 4, 4, 16)  # [batch, heads, T, D], transformers' layout
    k = torch.randn(1, 2, 4, 16)
    cos, sin = rotary(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    # Ours: q and k heads together, [batch, T, heads, D].
    qk = torch.cat([q, k], dim=1).transpose(1, 2)
    c, s = tables.at(positions)
    got = RotaryTables.rotate(qk, c, s).transpose(1, 2)
    assert torch.equal(got[:, :4], want_q)
    assert torch.equal(got[:, 4:], want_k)
