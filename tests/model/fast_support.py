"""Helpers of the fast engine tests: engines over the demo model, requests, greedy references
from `generate()` (with the #39379 fix patched in), and direct prefill/decode calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import torch
from PIL import Image

from model.engine import (
    ChatTurn,
    Engine,
    EngineEvent,
    EngineRequest,
    Finished,
    ImagePart,
    SamplingParams,
    TextDelta,
    TextPart,
)
from model.fast import FastEngineConfig, FastMllamaEngine
from model.fast.forward import FastForward, PrefillChunk, make_decode_inputs
from model.fast.sequence import FastSequence
from model.prompt import render_prompt
from testkit.fast_reference import transformers_row_mask_fix


class Recorder:
    """Finished sequences by request id (the batcher's `on_finish` hook)."""

    def __init__(self) -> None:
        self.seqs: dict[str, FastSequence] = {}

    def __call__(self, seq: FastSequence) -> None:
        self.seqs[seq.request.request_id] = seq


def make_engine(loaded: tuple[Any, Any], **config: Any) -> FastMllamaEngine:
    model, processor = loaded
    settings = {"max_len": 512, "max_slots": 6, "max_images_per_request": 2, **config}
    engine = FastMllamaEngine.from_loaded(
        model, processor, model_id="demo", config=FastEngineConfig(**settings)
    )
    asyncio.run(engine.start())
    engine.batcher.on_finish = Recorder()
    return engine


def recorded(engine: FastMllamaEngine) -> dict[str, FastSequence]:
    hook = engine.batcher.on_finish
    assert isinstance(hook, Recorder)
    return hook.seqs


def image(color: tuple[int, int, int], size: tuple[int, int] = (90, 60)) -> Image.Image:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):
        img.putpixel((x, x % size[1]), (255 - color[0], 30, 200))
    return img


def request(text: str, *images: Image.Image, rid: str = "r", **sampling: Any) -> EngineRequest:
    parts: tuple[TextPart | ImagePart, ...] = (*(ImagePart(i) for i in images), TextPart(text))
    params = {"max_tokens": 12, "temperature": 0.0, **sampling}
    return EngineRequest(rid, (ChatTurn("user", parts),), SamplingParams(**params))


async def run(engine: Engine, req: EngineRequest) -> tuple[str, Finished, list[str]]:
    """Collect a request's text deltas and its `Finished` event (any engine)."""
    deltas: list[str] = []
    async for event in engine.generate(req):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            return "".join(deltas), event, deltas
    raise AssertionError("no Finished event")


def stream_of(engine: FastMllamaEngine, req: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
    """The event stream as the async generator it is (closable)."""
    return cast(AsyncGenerator[EngineEvent, None], engine.generate(req))


async def together(engine: FastMllamaEngine, reqs: list[EngineRequest]) -> list[str]:
    """Submit all requests so that they are admitted at the same step."""
    batcher = engine.batcher
    batcher.pause()
    try:
        tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
        while batcher.waiting_count < len(reqs):
            await asyncio.sleep(0.001)
    finally:
        batcher.resume()
    return [text for text, _, _ in await asyncio.gather(*tasks)]


def reference_ids(loaded: tuple[Any, Any], req: EngineRequest) -> tuple[list[int], int]:
    """Greedy `generate()` on the request alone (with the #39379 fix): (new ids, prompt len)."""
    model, processor = loaded
    prompt, images = render_prompt(processor, req.messages)
    inputs = processor(
        text=[prompt],
        images=[images] if images else None,
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.inference_mode(), transformers_row_mask_fix():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=req.sampling.max_tokens, min_new_tokens=0
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist(), int(inputs["input_ids"].shape[1])


def assert_matches_reference(
    engine: FastMllamaEngine, loaded: tuple[Any, Any], req: EngineRequest, text: str
) -> None:
    seq = recorded(engine)[req.request_id]
    want, n_prompt = reference_ids(loaded, req)
    assert seq.output_ids == want
    assert seq.prompt_tokens == n_prompt
    eos = engine.batcher.eos
    want_text = loaded[1].tokenizer.decode(
        [t for t in want if t not in eos], skip_special_tokens=True
    )
    assert text == want_text


TEXTS = [
    "Hello there, how are you today?",
    "Describe a quiet harbour at dawn in three short sentences please.",
    "2 + 2 =",
]
RED, GREEN, BLUE = (200, 30, 30), (10, 200, 90), (5, 5, 250)


def encode(loaded: tuple[Any, Any], text: str, *images: Image.Image) -> dict[str, torch.Tensor]:
    processor = loaded[1]
    turns = (ChatTurn("user", (*(ImagePart(i) for i in images), TextPart(text))),)
    prompt, imgs = render_prompt(processor, turns)
    return dict(
        processor(
            text=[prompt],
            images=[imgs] if imgs else None,
            add_special_tokens=False,
            return_tensors="pt",
        )
    )


def prefill(
    forward: FastForward, slot: int, inputs: dict[str, torch.Tensor], chunk: int = 10_000
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill one request into `slot` (in chunks); (last logits, decode vision mask)."""
    ids = inputs["input_ids"][0]
    vision = None
    decode_mask = None
    if "pixel_values" in inputs:
        states = forward.encode_images(
            inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
        )
        forward.write_cross_kv(slot, torch.cat(states))
        tiles = int(inputs["aspect_ratio_mask"][0, 0].sum())
        tile_mask = inputs["cross_attention_mask"][0, :, 0, :tiles].bool()
        vision = tile_mask.repeat_interleave(forward.tokens_per_tile, dim=1)
        decode_mask = vision[-1]
    logits = torch.empty(0)
    for start in range(0, len(ids), chunk):
        end = min(start + chunk, len(ids))
        piece = PrefillChunk(
            slot=slot,
            tokens=ids[start:end],
            start=start,
            vision_mask=vision[start:end] if vision is not None else None,
            want_logits=end == len(ids),
        )
        logits = forward.prefill([piece])
    return logits[0], decode_mask


def decode_step(
    forward: FastForward, rows: dict[int, tuple[int, int, torch.Tensor | None]]
) -> torch.Tensor:
    """One decode step for {slot: (token, position, vision mask)}; logits of rows 0..n-1."""
    for slot, (_, _, mask) in rows.items():
        forward.cache.set_vision_mask(slot, mask)
    inputs = make_decode_inputs(
        forward.cache,
        {slot: (token, pos) for slot, (token, pos, _) in rows.items()},
        n=max(rows) + 1,
        kv_len=max(pos for _, pos, _ in rows.values()) + 1,
        vision_len=max((m.shape[0] for _, _, m in rows.values() if m is not None), default=0),
    )
    return forward.decode(inputs)
