"""The checks of `bench/engine_gpu.py`: logits of the fast path against eager transformers,
which SDPA kernel each attention shape gets, and kernels per decode step.

Imported by `bench/engine_gpu.py`, which puts the repository root on `sys.path`.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from engine_gpu_model import messages, sync, test_image
from packaging.version import Version


# -- numerical check -----------------------------------------------------------------------------
def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    ref, got = ref.float().flatten(), got.float().flatten()
    diff = (ref - got).abs().max().item()
    return {
        "max_abs": diff,
        "rel": diff / max(ref.abs().max().item(), 1e-6),
        "cos": torch.nn.functional.cosine_similarity(ref, got, dim=0).item(),
        "argmax_equal": float(int(ref.argmax()) == int(got.argmax())),
    }


@torch.inference_mode()
def logits_check(
    model: Any, processor: Any, engine: Any, tiny: bool
) -> dict[str, dict[str, float]]:
    from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
    from model.fast.graphs import DecodeGraphs
    from model.fast.kv_cache import CacheGeometry, StaticKVCache
    from testkit.fast_reference import transformers_row_mask_fix

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    image = test_image(tiny, seed=99)
    prompt = messages(processor, image)
    inputs = processor(
        text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt"
    ).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    cache_kw = (
        "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    )
    with transformers_row_mask_fix():
        out = model(**inputs, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        step = model(
            input_ids=torch.tensor([[token]], device=device),
            cross_attention_mask=inputs["cross_attention_mask"][:, -1:],
            use_cache=True,
            **{cache_kw: getattr(out, cache_kw)},
        )
    geometry = CacheGeometry.from_model(model, max_len=256, max_images=1, dtype=dtype)
    forward = FastForward(model, StaticKVCache(geometry, slots=1, device=device))
    ids, tile_mask, images = engine.prepare(prompt, [image])
    states = forward.encode_images(
        images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask
    )
    forward.write_cross_kv(0, torch.cat(states))
    vision = tile_mask.repeat_interleave(forward.tokens_per_tile, dim=1).to(device)
    prefill = forward.prefill([PrefillChunk(0, ids.to(device), 0, vision, True)])[0]
    n = int(ids.shape[0])
    rows = {0: (token, n)}
    forward.cache.set_vision_mask(0, vision[-1])
    eager = forward.decode(
        make_decode_inputs(forward.cache, rows, n=1, kv_len=n + 1, vision_len=vision.shape[-1])
    )[0]
    result = {
        "prefill vs eager": compare(out.logits[0, -1], prefill),
        "decode vs eager": compare(step.logits[0, -1], eager),
    }
    # The graph path (on the CPU: its buckets and static buffers, no capture) against our own
    # eager decode; the padded bucket (idle rows, longer kv, full vision) must not change row 0.
    graphs = DecodeGraphs(forward, batch_sizes=(1,), min_kv_len=256, capture=device.type == "cuda")
    b, kv_len, vis = graphs.bucket(1, n + 1, vision.shape[-1])
    padded = make_decode_inputs(forward.cache, rows, n=b, kv_len=kv_len, vision_len=vis)
    result["graph decode vs eager"] = compare(eager, graphs.run(padded)[0].clone())
    return result


# -- attention kernels ---------------------------------------------------------------------------
@torch.inference_mode()
def attention_backends(model: Any, device: torch.device) -> dict[str, str]:
    """Which SDPA kernel runs for the fast engine's attention shapes (bf16 on the GPU), each
    called once. If one fails on cuDNN (which SDPA may prefer on sm90), cuDNN attention is
    switched off for the whole process and the call retried on what SDPA picks next."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    text = model.config.get_text_config(decoder=True)
    vision = model.config.vision_config
    heads, kv_heads = int(text.num_attention_heads), int(text.num_key_value_heads)
    dim = int(text.hidden_size) // heads
    vision_heads = int(vision.attention_heads)
    vision_dim = int(vision.hidden_size) // vision_heads
    image = int(vision.max_num_tiles) * int(model.model.vision_model.num_patches)
    dtype = next(model.parameters()).dtype

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    def mask(queries: int, keys: int) -> torch.Tensor:
        return torch.zeros(1, 1, queries, keys, device=device, dtype=dtype)

    rep = heads // kv_heads
    cases = {
        "decode self, kv 256": (t(1, kv_heads, rep, dim), t(1, kv_heads, 256, dim), mask(1, 256)),
        "decode cross, 4 tiles": (
            t(1, kv_heads, rep, dim),
            t(1, kv_heads, image, dim),
            mask(1, image),
        ),
        "prefill self, 40 tokens": (t(1, heads, 40, dim), t(1, heads, 40, dim), mask(40, 40)),
        "vision, real queries": (
            t(1, vision_heads, image, vision_dim),
            t(1, vision_heads, image + 28, vision_dim),
            None,
        ),
    }
    result: dict[str, str] = {}
    for name, (q, k, m) in cases.items():
        chosen = SDPBackend(torch._fused_sdp_choice(q, k, k, attn_mask=m)).name
        try:
            F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            sync(device)
            result[name] = chosen
        except RuntimeError as exc:
            if chosen != "CUDNN_ATTENTION":
                raise
            torch.backends.cuda.enable_cudnn_sdp(False)
            retry = SDPBackend(torch._fused_sdp_choice(q, k, k, attn_mask=m)).name
            F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            sync(device)
            result[name] = f"CUDNN_ATTENTION failed ({str(exc)[:80]}); cuDNN off, now {retry}"
    return result


# -- kernels per decode step (GPU) ---------------------------------------------------------------
@torch.inference_mode()
def kernels_per_decode_step(engine: Any) -> dict[str, float]:
    """CUDA kernels launched by one eager decode step (1 row, text and image), from the
    profiler: the count a CUDA graph replays (`bench/engine_ops.py` counts operations on the
    CPU; this checks that count on the device)."""
    from torch.profiler import ProfilerActivity, profile

    from model.fast.forward import make_decode_inputs

    forward = engine.batcher.forward
    cache = forward.cache
    result: dict[str, float] = {}
    for name, vision in (("text", 0), ("image", cache.geometry.max_vision_tokens)):
        step = make_decode_inputs(cache, {0: (5, 10)}, n=1, kv_len=256, vision_len=vision)
        forward.decode(step)  # warm: cuBLAS handles, autotuning
        sync(forward.device)
        # On the CPU (--tiny dry run) this counts every profiled CPU op, nested ones included:
        # it only checks that the code runs.
        on_cuda = forward.device.type == "cuda"
        activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
        kind = torch.autograd.DeviceType.CUDA if on_cuda else torch.autograd.DeviceType.CPU
        with profile(activities=[activity]) as prof:
            forward.decode(step)
            sync(forward.device)
        kernels = [
            e
            for e in prof.events()
            if e.device_type == kind and not e.name.startswith(("Memcpy", "Memset"))
        ]
        result[f"{name} kernels"] = float(len(kernels))
        result[f"{name} kernel ms"] = sum(e.device_time for e in kernels) / 1e3
    return result
