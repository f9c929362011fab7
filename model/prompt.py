"""Rendering a conversation with the checkpoint's own chat template.

Client text must never become control tokens: a user who writes `<|eot_id|><|start_header_id|>
system<|end_header_id|>` would otherwise forge turns, and a literal `<|image|>` would make the
processor look for an image that is not there. Special-token spellings in client text are
broken with a WORD JOINER (U+2060) so they tokenize as plain text.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

from PIL.Image import Image

from model.engine import ChatTurn, ImagePart, TextPart

WORD_JOINER = "\u2060"


class PromptRenderer:
    """Built once per processor: templated prompt text plus the images in order."""

    RECENT = 64

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self._lock = threading.Lock()
        # id(turns) -> (weak references to the turns, prompt). Weak: a finished request's
        # decoded images must not stay alive here; the references also tell a reused id apart.
        self._recent: OrderedDict[int, tuple[tuple[weakref.ref[ChatTurn], ...], str]] = (
            OrderedDict()
        )
        tokenizer = getattr(processor, "tokenizer", processor)
        specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
        specials = {s for s in specials if len(s) > 1}
        self._special = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )

    def neutralize(self, text: str) -> str:
        if self._special is None:
            return text
        return self._special.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)

    def neutralize_json(self, text: str) -> Any:
        """Parsed JSON whose strings cannot spell control tokens (the template dumps it again)."""
        return json.loads(self.neutralize(text))

    def messages(self, turns: tuple[ChatTurn, ...]) -> list[dict[str, Any]]:
        """Chat-template messages: images become `{"type": "image"}` parts (<|image|>)."""
        out: list[dict[str, Any]] = []
        for turn in turns:
            if turn.tool_calls:
                # The Llama 3.1 template writes `arguments | tojson`: it wants an object, not
                # OpenAI's JSON string (which it would quote a second time).
                calls = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": self.neutralize(call.name),
                            "arguments": self.neutralize_json(call.arguments),
                        },
                    }
                    for call in turn.tool_calls
                ]
                out.append({"role": turn.role, "content": "", "tool_calls": calls})
                continue
            if turn.role == "tool":
                text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
                out.append({"role": "tool", "content": self._tool_content(text)})
                continue
            if not turn.images:
                # Text-only turns as one string: the template trims the system message as a
                # string (a list would be rendered as its Python repr). Parts join with "\n".
                text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
                out.append({"role": turn.role, "content": self.neutralize(text)})
                continue
            content: list[dict[str, str]] = []
            for part in turn.parts:
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": self.neutralize(part.text)})
                elif isinstance(part, ImagePart):
                    content.append({"type": "image"})
            out.append({"role": turn.role, "content": content})
        return out

    def _tool_content(self, text: str) -> Any:
        """A tool result: JSON objects and arrays as values (the template writes them with
        `tojson`, which would quote a JSON text once more), anything else as text."""
        try:
            value = self.neutralize_json(text)
        except ValueError:
            return self.neutralize(text)
        return value if isinstance(value, dict | list) else self.neutralize(text)

    def render(
        self, turns: tuple[ChatTurn, ...], tools_json: str | None = None
    ) -> tuple[str, list[Image]]:
        """The templated prompt (ending with the assistant header) and its images in order.

        One request is rendered several times (token counting at admission, then each of its
        `n` choices): the last few results are remembered by the identity of `turns`.
        """
        images = [img for turn in turns for img in turn.images]
        with self._lock:
            hit = self._recent.get(id(turns))
        if (
            hit is not None
            and tools_json is None
            and len(hit[0]) == len(turns)
            and all(ref() is turn for ref, turn in zip(hit[0], turns, strict=True))
        ):
            return hit[1], images
        extra: dict[str, Any] = {}
        if tools_json is not None:
            extra["tools"] = self.neutralize_json(tools_json)
        text = str(
            self._processor.apply_chat_template(
                self.messages(turns), add_generation_prompt=True, tokenize=False, **extra
            )
        )
        if tools_json is not None:
            return text, images  # not remembered: the cache is keyed by the turns alone
        with self._lock:
            self._recent[id(turns)] = (tuple(weakref.ref(t) for t in turns), text)
            while len(self._recent) > self.RECENT:
                self._recent.popitem(last=False)
        return text, images


def render_prompt(processor: Any, turns: tuple[ChatTurn, ...]) -> tuple[str, list[Image]]:
    return PromptRenderer(processor).render(turns)
