"""A tiny, randomly initialised Llama 3.2-Vision checkpoint for demos and tests.

`build_demo_model(out_dir)` writes, with `save_pretrained` only, a directory laid out like
meta-llama/Llama-3.2-11B-Vision-Instruct: an `MllamaForConditionalGeneration` (float32,
safetensors, a few MB) and an `MllamaProcessor` (byte-level BPE tokenizer with Llama 3's special
tokens and chat template, `MllamaImageProcessor` with 56x56 tiles). `AutoProcessor` and
`MllamaForConditionalGeneration.from_pretrained` load it exactly as they load the real model.

The weights are random: the model answers gibberish by design. It exists so that the engine and
the gateway can run end to end on a CPU without downloading anything. Token ids, tile size and
layer counts differ from the real model; the layout (special tokens after the regular vocabulary,
`<|image|>` id == text `vocab_size`, cross-attention layers, tiling) is the same.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import tempfile
from typing import Any

import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GenerationConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils.import_utils import is_torchvision_available

from model.llama_chat_template import CHAT_TEMPLATE

TILE_SIZE = 56
MAX_IMAGE_TILES = 4
BPE_VOCAB_SIZE = 1024  # the trained part: 256 byte symbols + 768 merges

# Llama 3's pre-tokenisation pattern (tiktoken cl100k-style, as in transformers' MllamaConverter).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens in Llama 3.1/3.2 order, right after the regular vocabulary (offsets 0..15 here,
# 128000..128255 in the real model); <|image|> follows them, outside the LM head's rows.
_NAMES = (
    "begin_of_text end_of_text reserved_special_token_0 reserved_special_token_1"
    " finetune_right_pad_id reserved_special_token_2 start_header_id end_header_id"
    " eom_id eot_id python_tag"
)
SPECIAL_TOKENS = [f"<|{n}|>" for n in _NAMES.split()]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(3, 8)]
IMAGE_TOKEN = "<|image|>"
EOS_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")  # generation_config

CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
A gateway sits between the clients and the model: it checks every request, forwards it, and
streams the answer back, token by token. When the prompt or the answer is unsafe, it refuses,
and the client receives an error that explains which policy was triggered and why.
What is in this picture? A red bicycle leans against a blue wall; two cats sleep on the step.
The photograph shows a kitchen table with three cups of coffee, a newspaper and an old radio.
Describe the image in one sentence. The image shows a mountain lake at sunrise, with mist.
On 14 March 2024 at 09:45, the train left platform 3 with 128 passengers and 7 bicycles.
Prices rose by 12.5% in 2023 (from $40.00 to $45.00), then fell again: 3, 2, 1... done.
The meeting is at 10:30 on Tuesday, 2 July; the report has 256 pages and 1,024 figures.
"Don't panic," she said. "It's only a test; we'll see what happens, won't we?"
"I can't read that," he replied, "but I'd guess it's a map of the old town."
def add(a, b):\n    return a + b  # simple Python, with {braces}, [brackets] & <angles>.
for i in range(10):\n    print(f"step {i}: {i * i}")\nif x >= 3 and y != 4: pass
{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}
Email me at demo@example.com or visit https://example.org/path?q=llama&lang=en#top.
In the café, a naïve poet ordered crème brûlée and a piña colada; the façade was rosé.
Straße, Ærøskøbing, Łódź, São Paulo, Zürich, Ελληνικά, русский язык, العربية, עברית.
日本語のテキストも少し含めます。東京は大きな都市です。中文也可以：你好，世界！한국어 안녕하세요.
Emoji appear too: 🙂 😀 🚀 🦙 ❤️ 👍🏽 🇫🇷 and symbols like €, £, ¥, ©, ™, ≤, ≥, → and ∞.
Tabs\tand\tnew lines\nshould survive, as should   several   spaces and trailing ones.
The assistant answers questions about images, documents, code, cooking, travel and science.
Once upon a time, in a small village by the sea, there lived an old fisherman and his dog.
Every morning they walked to the harbour, counted the boats, and watched the gulls fly over
the water. In the evening the fisherman mended his nets while the dog slept by the fire.
One day a stranger arrived with a large wooden box. Nobody knew what was inside the box,
and the stranger would not say. The children of the village followed him everywhere, asking
questions, and the old women watched him from their windows, shaking their heads.
Language models predict the next token from the tokens before it. A tokenizer splits text into
tokens; a byte-level tokenizer can represent any text at all, because every string is made of
bytes. Rare characters are split into several tokens, and common words become single tokens.
Images are cut into tiles, each tile into patches, and a vision encoder turns the patches into
features that the language model reads through cross-attention layers.
To make a simple tomato soup, chop two onions and three cloves of garlic, fry them gently in
olive oil, add a kilogram of ripe tomatoes, a little salt and pepper, and simmer for thirty
minutes. Blend the soup until smooth, taste it, and serve it hot with fresh bread and basil.
The weather today is cloudy with a chance of rain in the afternoon; temperatures will reach
eighteen degrees in the north and twenty-two in the south, with light winds from the west.
Please summarise the following text, list the main points, and suggest a title for it.
Sure! Here is a short summary, followed by three main points and a possible title.
I'm sorry, but I can't help with that request. Is there anything else I can do for you?
Thank you very much for your help. You're welcome; let me know if you have more questions.
"""


def _build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:  # the corpus must offer enough merges
        raise RuntimeError(f"BPE vocabulary has {tok.get_vocab_size()} tokens")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            ),
        ]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _build_config(tokenizer: PreTrainedTokenizerFast) -> MllamaConfig:
    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))  # type: ignore[arg-type]

    image_token_id = tid(IMAGE_TOKEN)
    text_config = {
        "vocab_size": image_token_id,  # everything but <|image|>, as in the real model
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "cross_attention_layers": [1],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        "bos_token_id": tid("<|begin_of_text|>"),
        "eos_token_id": [tid(t) for t in EOS_TOKENS],
        "pad_token_id": tid("<|finetune_right_pad_id|>"),
    }
    vision_hidden, intermediate_layers = 32, [0, 1]
    vision_config = {
        "hidden_size": vision_hidden,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "image_size": TILE_SIZE,
        "patch_size": 14,
        "max_num_tiles": MAX_IMAGE_TILES,
        "intermediate_layers_indices": intermediate_layers,
        "vision_output_dim": vision_hidden * (1 + len(intermediate_layers)),
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    }
    return MllamaConfig(
        text_config=text_config, vision_config=vision_config, image_token_index=image_token_id
    )


def _build_image_processor() -> Any:
    # The torchvision backend where installed, else the PIL one; both save the same config
    # ("image_processor_type": "MllamaImageProcessor"), as the real checkpoint has.
    name = "MllamaImageProcessor" if is_torchvision_available() else "MllamaImageProcessorPil"
    return getattr(transformers, name)(
        do_convert_rgb=True,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_pad=True,
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=MAX_IMAGE_TILES,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=2,  # bilinear
        rescale_factor=1 / 255,
    )


def build_demo_model(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the demo checkpoint (model + processor) to `out_dir` and return `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    processor = MllamaProcessor(  # type: ignore[no-untyped-call]
        image_processor=_build_image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    config = _build_config(tokenizer)
    text: Any = config.text_config
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG state left untouched
        torch.manual_seed(seed)
        model = MllamaForConditionalGeneration(config).float().eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():  # the gates start at zero: open them so that images matter
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
        # The end tokens' output rows are zero: their logit is 0 while the largest of the
        # others is positive, so greedy decoding never ends an answer by itself. Where a random
        # model "ended" depended on the whole prompt, which holds today's date (the template's
        # `strftime_now`), so tests that need a long answer broke from one day to the next.
        # Sampled answers can still end (rarely); stop strings and max_tokens end the rest.
        model.lm_head.weight[text.eos_token_id] = 0.0
    # The real checkpoint's sampling defaults.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


DEMO_MARKER = ".demo-model-complete"
# Bumped when build_demo_model changes what it writes: an older demo directory is rebuilt.
DEMO_VERSION = 2


def ensure_demo_model(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Build the demo model into `out_dir` once; later calls reuse it.

    Built in a sibling temporary directory and renamed into place, so an interrupted build
    never leaves a half-written checkpoint that the next start would try to load.
    """
    out_dir = pathlib.Path(out_dir)
    marker = f"seed={seed} version={DEMO_VERSION}\n"
    with contextlib.suppress(OSError):
        if (out_dir / DEMO_MARKER).read_text() == marker:
            return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".demo-build-") as tmp:
        staging = pathlib.Path(tmp) / "model"
        build_demo_model(staging, seed=seed)
        (staging / DEMO_MARKER).write_text(marker)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir
