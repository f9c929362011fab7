"""One chat request's tokens, from admission to settlement, in one place.

Admission reserves `prompt + reserved_completion` of the key's tokens per minute; the answer's
`usage` and the token metrics report `prompt` and `completion`; the limiter is settled with
`total`, whatever ended the request (a finished answer, a stream the client left, an engine
failure), so a client is charged for what it was sent, and the rest of the reservation is given
back.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.wire_shapes import Usage
from model.engine import Finished


@dataclass(slots=True)
class TokenLedger:
    # Text tokens plus `image_tokens`: the gateway's own count until a choice finishes, then
    # the engine's.
    prompt: int
    # What admission reserved for the completions: `max_tokens` per choice.
    reserved_completion: int
    # Per choice: one per streamed delta while it generates, the engine's exact count once it
    # finished (what a client that leaves early is charged for).
    completion_per_choice: list[int]
    # Vision tokens of the request's images (reported on their own too), and how many
    # `<|image|>` placeholders a text count has (each image counts as its vision tokens).
    image_tokens: int = 0
    image_placeholders: int = 0
    # Whether the engine's prompt count has one placeholder token per image (a local model)
    # rather than counting images its own way (an upstream's count is taken as it is).
    counts_placeholders: bool = True

    @classmethod
    def admitted(
        cls,
        *,
        text_tokens: int,
        images: int,
        image_tokens: int,
        choices: int,
        max_tokens: int,
        counts_placeholders: bool,
    ) -> TokenLedger:
        """The ledger of a request about to be admitted: `text_tokens` counts each image as
        one placeholder token."""
        return cls(
            prompt=text_tokens - images + image_tokens,
            reserved_completion=max_tokens * choices,
            completion_per_choice=[0] * choices,
            image_tokens=image_tokens,
            image_placeholders=images,
            counts_placeholders=counts_placeholders,
        )

    def streamed(self, choice: int, tokens: int = 1) -> None:
        """One more delta (of `tokens` tokens) of a choice that is still generating."""
        self.completion_per_choice[choice] += tokens

    def finish(self, choice: int, finished: Finished) -> None:
        """A choice's end: the engine's counts replace what was known before."""
        self.completion_per_choice[choice] = finished.completion_tokens
        prompt = finished.prompt_tokens
        if self.counts_placeholders:
            prompt += self.image_tokens - self.image_placeholders
        self.prompt = prompt

    @property
    def completion(self) -> int:
        return sum(self.completion_per_choice)

    @property
    def total(self) -> int:
        """What the rate limiter is settled with."""
        return self.prompt + self.completion

    def usage(self) -> Usage:
        """The answer's `usage`: `prompt_tokens` includes the image tokens (also reported on
        their own)."""
        completion = self.completion
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": completion,
            "total_tokens": self.prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": self.image_tokens},
            "completion_tokens_details": None,
        }
