"""Llama Guard's prompt: the checkpoint's chat template, the policy's categories in it, and the
conversation it is given.

The prompt is rendered by the checkpoint's own chat template, which carries the category list
and its quirks. Custom `categories` and `excluded_category_keys` go through the template's
arguments when it takes them (1B, 11B-Vision); for a template with a fixed list (8B) the list
inside the template text is replaced by the same rendering (`key: description` lines), so the
three behave alike. User text is tokenised with `sanitize_control_tokens=True`: a user who
writes `<|eot_id|>` or `<|image|>` gets those characters as plain text, not as control tokens
that could end the conversation early or inject an image slot.

Conversation given to the model (the template wants strictly alternating user/assistant turns):
system text is folded into the first user turn (API users write system messages too), text
parts of a turn are joined with newlines, consecutive turns of one role are merged, a leading
assistant turn gets an empty user turn before it. Input stage (prompt classification): the
conversation up to its last user turn; the template then asks about the last `User` message.
Output stage (response classification): the completion is appended as an assistant turn; the
template asks about the last `Agent` message. Only the vision model sees an image: the most
recent image of a user turn (the model takes one); text models ignore images.

The valid hazard codes are the ones the rendered prompt lists ("S1".."S14", fewer when the
policy excludes some).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL.Image import Image

from guards.base import GuardInput
from model.engine import ImagePart, TextPart

_BLOCK = re.compile(
    r"<BEGIN UNSAFE ?CONTENT CATEGORIES>\n(?P<body>.*?)<END UNSAFE CONTENT CATEGORIES>", re.S
)
_CODE_LINE = re.compile(r"^(S\d+): ", re.M)
_PROBE = "LLAMA-GUARD-PROBE-5f0c"


def _jinja_string_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")


class LlamaGuardPrompt:
    """Renders and tokenises Llama Guard's prompt for a `GuardInput` (see the module docstring).

    The tokenizer is used only in the guard's batcher thread after start (a fast tokenizer's
    state is not thread-safe, issue 13).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        vision: bool,
        categories: Mapping[str, str] | None = None,
        excluded_category_keys: Sequence[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.vision = vision
        # Categories: through the template's arguments, or by rewriting its fixed list.
        self.template_takes_categories = "excluded_category_keys" in template
        self.template_kwargs: dict[str, Any] = {}
        if self.template_takes_categories:
            self.template_kwargs["excluded_category_keys"] = list(excluded_category_keys)
            if categories is not None:
                self.template_kwargs["categories"] = dict(categories)
        elif categories is not None or excluded_category_keys:
            template = self._rewrite_fixed_categories(template, categories, excluded_category_keys)
        self.chat_template = template
        self.parts_content = self._probe_content_format()
        self.valid_codes = self._rendered_codes()

    # --- the template ------------------------------------------------------------------------

    @staticmethod
    def _rewrite_fixed_categories(
        template: str, categories: Mapping[str, str] | None, excluded: Sequence[str]
    ) -> str:
        match = _BLOCK.search(template)
        if match is None or len(_BLOCK.findall(template)) != 1:
            raise ValueError("cannot find the category list in this chat template")
        body = match.group("body")
        if categories is None:  # the template's own list (already template text), minus excluded
            lines = [line for line in body.splitlines() if line.strip()]
            kept = [line for line in lines if line.split(":", 1)[0] not in set(excluded)]
        else:  # new text inside the template's string literal: escape it
            kept = [
                _jinja_string_escape(f"{k}: {v}")
                for k, v in categories.items()
                if k not in set(excluded)
            ]
        new_body = "".join(line + "\n" for line in kept)
        return template[: match.start("body")] + new_body + template[match.end("body") :]

    def render(self, conversation: list[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False, **self.template_kwargs
        )
        return str(text)

    def _probe_content_format(self) -> bool:
        """True when the template reads a list of parts, False when it reads strings (8B)."""
        parts = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
        try:
            if _PROBE in self.render(parts):
                return True
        except Exception:  # the 8B template calls .strip() on the content
            pass
        if _PROBE in self.render([{"role": "user", "content": _PROBE}]):
            return False
        raise ValueError("this chat template does not render a conversation's text")

    def _rendered_codes(self) -> tuple[str, ...]:
        prompt = self.render(self._messages([("user", _PROBE)], with_image=False))
        match = _BLOCK.search(prompt)
        codes = tuple(_CODE_LINE.findall(match.group("body"))) if match else ()
        if not codes:
            raise ValueError("the rendered prompt lists no S<n> categories")
        return codes

    # --- the conversation --------------------------------------------------------------------

    def _turns(self, item: GuardInput) -> tuple[list[tuple[str, str]], Image | None]:
        """(role, text) pairs that alternate user/assistant, starting with user; and the image."""
        system: list[str] = []
        turns: list[tuple[str, str]] = []
        image: Image | None = None
        for turn in item.messages:
            text = "\n".join(p.text for p in turn.parts if isinstance(p, TextPart))
            if turn.role == "system":
                system.append(text)
                continue
            # A tool result is content brought into the conversation on the user's side:
            # Llama Guard knows only User and Agent turns.
            turns.append(("user" if turn.role == "tool" else turn.role, text))
            if turn.role == "user":
                images = [p.image for p in turn.parts if isinstance(p, ImagePart)]
                if images:
                    image = images[-1]  # the most recent user image wins
        if item.stage == "input":
            while turns and turns[-1][0] != "user":
                turns.pop()
        else:
            turns.append(("assistant", item.completion or ""))
        merged: list[list[str]] = []
        for role, text in turns:
            if merged and merged[-1][0] == role:
                merged[-1][1] = f"{merged[-1][1]}\n\n{text}"
            else:
                merged.append([role, text])
        if not merged or merged[0][0] != "user":
            merged.insert(0, ["user", ""])
        if system:
            merged[0][1] = "\n\n".join([*system, merged[0][1]]).strip("\n")
        return [(role, text) for role, text in merged], image if self.vision else None

    def _messages(self, turns: list[tuple[str, str]], *, with_image: bool) -> list[dict[str, Any]]:
        if not self.parts_content:
            return [{"role": role, "content": text} for role, text in turns]
        messages: list[dict[str, Any]] = []
        for i, (role, text) in enumerate(turns):
            content: list[dict[str, Any]] = [{"type": "text", "text": text}]
            if with_image and i == 0:  # the template only asks whether an image is present
                content.insert(0, {"type": "image"})
            messages.append({"role": role, "content": content})
        return messages

    def conversation(self, item: GuardInput) -> tuple[list[dict[str, Any]], Image | None]:
        """The template messages for `item`, and the image the vision model will see."""
        turns, image = self._turns(item)
        return self._messages(turns, with_image=image is not None), image

    def render_prompt(self, item: GuardInput) -> str:
        """The prompt text exactly as the template renders it (for logs and tests)."""
        messages, _ = self.conversation(item)
        return self.render(messages)

    def token_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt's token ids; control tokens in the text stay plain text."""
        ids = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
            **self.template_kwargs,
        )
        if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
            ids = ids[0]
        return [int(i) for i in ids]
