"""What the two in-process engines share: a loaded Mllama checkpoint and what is built on it.

The batch engine (`model.local_engine`) and the fast engine (`model.fast.engine`) differ in how
they run the model; everything around it is here, once, so that the two cannot drift apart (they
did: only one of them kept its processor behind a lock). That is: where the model runs and in
which dtype (`model.device`), loading the processor and the weights, the one `PromptEncoder`
over the processor, the end tokens, the `GrammarBook`, token bytes for logprobs, prompt-token
counting and the `EngineInfo`.

Loading goes through `AutoProcessor.from_pretrained(path)` and
`MllamaForConditionalGeneration.from_pretrained(path)`: the same code for the demo model and for
real weights.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model.device import device_and_dtype
from model.encoding import PromptEncoder
from model.engine import Engine, EngineInfo, EngineRequest
from model.errors import EngineError
from model.grammar import GrammarBook, RowGrammar
from model.logprobs import TokenBytes
from model.prompt import PromptRenderer

END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def eos_ids(processor: Any, model: Any) -> set[int]:
    """Token ids that end a completion: Llama's end tokens and the generation config's."""
    tokenizer = processor.tokenizer
    eos = {tid for t in END_TOKENS if (tid := tokenizer.convert_tokens_to_ids(t)) is not None}
    eos.discard(tokenizer.unk_token_id)
    gen_eos = model.generation_config.eos_token_id
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
    return eos


class MllamaEngineBase(Engine):
    """An `Engine` over a local Mllama checkpoint; subclasses bring the loop that runs it.

    A subclass's `_load` (run in a thread by `start`) calls `_load_checkpoint`, builds its
    worker, then `_build_grammars` with its vocabulary size, and starts the worker.
    """

    def __init__(
        self,
        model_path: Path | None,
        *,
        model_id: str,
        device: str = "auto",
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        self._path = Path(model_path) if model_path is not None else None
        self._model_id = model_id
        self._device, self._dtype = device_and_dtype(device)
        self._eos_override = None if eos_token_ids is None else set(eos_token_ids)
        self._processor: Any = None
        self._model: Any = None
        self._encoder: PromptEncoder | None = None
        self._grammars: GrammarBook | None = None

    def _adopt(self, model: Any, processor: Any) -> None:
        """Serve an already loaded model and processor, on the model's device and dtype."""
        param = next(model.parameters())
        self._device, self._dtype = param.device, param.dtype
        self._model, self._processor = model, processor

    # -- loading (in the start thread) -------------------------------------------------------
    def _load_checkpoint(self) -> None:
        """Load the processor and the weights (unless adopted), and the encoder over them.

        The encoder is the one owner of the processor: every tokenizer call (counting in request
        threads, encoding in the worker) goes through it, because a shared fast tokenizer is not
        thread-safe (`model.encoding`).
        """
        if self._model is None:
            from transformers import AutoProcessor, MllamaForConditionalGeneration

            if self._path is None:
                raise EngineError("no model path and no loaded model")
            processor = AutoProcessor.from_pretrained(self._path)  # type: ignore[no-untyped-call]
            model = MllamaForConditionalGeneration.from_pretrained(self._path, dtype=self._dtype)
            self._model = model.to(self._device).eval()  # type: ignore[arg-type]
            self._processor = processor
        self._encoder = PromptEncoder(self._processor)

    def _end_tokens(self) -> set[int]:
        """The ids that end a completion: as given to the engine, else the checkpoint's."""
        if self._eos_override is not None:
            return self._eos_override
        return eos_ids(self._processor, self._model)

    def _build_grammars(self, vocab_size: int, eos: set[int]) -> None:
        self._grammars = GrammarBook(self.encoder.tokenizer, vocab_size, eos)

    def _token_bytes(self) -> TokenBytes:
        """Each token's bytes for logprobs (the grammar book's decoded vocabulary, shared)."""
        return TokenBytes(self.encoder.tokenizer, lambda: self.grammars.decoded_vocab)

    def _max_positions(self) -> int:
        """The text decoder's context length, as the checkpoint's config gives it."""
        text_config = self._model.config.get_text_config(decoder=True)
        return int(text_config.max_position_embeddings)

    def _engine_info(
        self, *, context_length: int, max_batch_size: int, extra: dict[str, str] | None = None
    ) -> EngineInfo:
        return EngineInfo(
            model_id=self._model_id,
            context_length=context_length,
            max_batch_size=max_batch_size,
            device=str(self._device),
            dtype=str(self._dtype).removeprefix("torch."),
            extra=extra or {},
            image_placeholder_usage=True,
        )

    # -- what is loaded ----------------------------------------------------------------------
    @property
    def grammars(self) -> GrammarBook:
        if self._grammars is None:
            raise EngineError("the engine is not loaded yet")
        return self._grammars

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            raise EngineError("the engine is not loaded yet")
        return self._encoder

    @property
    def renderer(self) -> PromptRenderer:
        return self.encoder.renderer

    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def model(self) -> Any:
        return self._model

    # -- requests ----------------------------------------------------------------------------
    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.encoder.count(request.messages, request.tools_json)

    async def _grammar(self, request: EngineRequest) -> RowGrammar | None:
        """The request's response-format grammar, if it has one.

        Compiling a new schema takes milliseconds to seconds: in a thread, never on the
        event loop nor on the worker's thread.
        """
        schema = request.sampling.json_schema
        return await asyncio.to_thread(self.grammars.row, schema) if schema else None
