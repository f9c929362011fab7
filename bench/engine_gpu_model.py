"""The model of `bench/engine_gpu.py`: the real 11B shapes with random weights built on the
device (or the demo model with `--tiny`), the test images and requests.

Imported by `bench/engine_gpu.py`, which puts the repository root on `sys.path`.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REAL_TEXT = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 40,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "pad_token_id": 128004,
}
REAL_VISION = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "attention_heads": 16,
    "image_size": 560,
    "patch_size": 14,
    "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
    "vision_output_dim": 7680,
    "norm_eps": 1e-5,
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
}
PROMPT = "Describe a quiet harbour at dawn in three short sentences, with the boats and the gulls."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- model and processor ----------------------------------------------------------------------
def build(tiny: bool, device: torch.device) -> tuple[Any, Any, float]:
    """Random weights built in place on `device` (the demo config when tiny, else 11B shapes).

    `--tiny` takes the same path as the GPU run, only the config, dtype and device differ.
    """
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
    )

    from model.demo_model import build_demo_model

    demo = build_demo_model(Path(tempfile.mkdtemp(prefix="bench-demo-")))
    processor = AutoProcessor.from_pretrained(demo)
    if tiny:
        config = MllamaConfig.from_pretrained(demo)
    else:
        config = MllamaConfig(
            text_config=REAL_TEXT, vision_config=REAL_VISION, image_token_index=128256
        )
    # The demo tokenizer (its ids are valid in any vocabulary), with the config's tile size.
    vision: Any = config.vision_config
    tile = int(vision.image_size)
    settings = processor.image_processor.to_dict()
    settings["size"] = {"height": tile, "width": tile}
    processor = MllamaProcessor(
        image_processor=type(processor.image_processor).from_dict(settings),
        tokenizer=processor.tokenizer,
        chat_template=processor.chat_template,
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    sync(device)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # allocated and initialised on the device, never on the host
        model = MllamaForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():  # random init closes the gates: open them so that images matter
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    model.eval()
    sync(device)
    build_s = time.perf_counter() - start
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id,
    )
    tok.padding_side = "left"
    return model, processor, build_s


def test_image(tiny: bool, seed: int = 0, tiles: int = 4) -> Image.Image:
    """An image of `tiles` tiles (2x2 for 4) with some structure."""
    tile = 56 if tiny else 560
    w, h = {1: (tile, tile), 2: (2 * tile, tile), 4: (2 * tile, 2 * tile)}[tiles]
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(200):
        img.putpixel((rng.randrange(w), rng.randrange(h)), (255, rng.randrange(256), 0))
    return img


def messages(processor: Any, image: Image.Image | None, text: str = PROMPT) -> str:
    content: list[dict[str, str]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image"})
    return str(
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    )


def engine_request(image: Image.Image | None, max_tokens: int, rid: str) -> Any:
    from model.engine import ChatTurn, EngineRequest, ImagePart, SamplingParams, TextPart

    parts: tuple[Any, ...] = (TextPart(PROMPT),)
    if image is not None:
        parts = (ImagePart(image), *parts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return EngineRequest(rid, (ChatTurn("user", parts),), params)
