"""Streamed moderation through the real guard pipeline: bounded context, no leaks, linear cost.

Each stream runs as the gateway runs it (`gateway.choice_stream.ChoiceStream`): a `StreamModerator`
whose check is `GuardPipeline.run("output", ...)` with the policy's window and the context that
`stream_context_chars` gives for the policy and the guards that run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest

from guards.base import Guard, GuardInput, GuardVerdict, Stage
from guards.blocklist import BlocklistGuard
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.policy import Policy
from guards.policy_loader import parse_policy
from guards.stream_context import stream_context_chars
from guards.stream_moderator import StreamModerator
from model.engine import ChatTurn, TextPart

TURNS = (ChatTurn(role="user", parts=(TextPart("Tell me a story."),)),)
WORDS = [
    "river",
    "stone",
    "moss",
    "light",
    "reader",
    "map",
    "street",
    "baker",
    "morning",
    "quiet",
    "field",
    "tower",
]


def policy(terms: Sequence[str] = (), regexes: Sequence[str] = (), window: int = 64) -> Policy:
    lines = [
        "name: t",
        'version: "1"',
        "guards:",
        "  blocklist: {stages: [input, output]}",
        "custom_blocklists:",
        "  - name: out",
        f"    terms: {json.dumps(list(terms))}",
        f"    regexes: {json.dumps(list(regexes))}",
        "    stage: output",
        "streaming:",
        f"  window_chars: {window}",
    ]
    return parse_policy("\n".join(lines) + "\n")


def prose(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = ""
    while len(out) < chars:
        out += " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + ". "
    return out[:chars]


def moderator(pipeline: GuardPipeline, context: int | None = None) -> StreamModerator[Decision]:
    async def check(text: str) -> Decision:
        (decision,) = await pipeline.run("output", [GuardInput("output", TURNS, completion=text)])
        return decision

    pol = pipeline.policy
    if context is None:
        context = stream_context_chars(pol, pipeline.guards_for("output"))
    return StreamModerator(
        check=check,
        is_blocked=lambda d: d.blocked,
        window=pol.streaming.window_chars,
        context=context,
    )


async def stream(
    mod: StreamModerator[Decision], text: str, chunk: int = 7
) -> tuple[str, bool, int]:
    """(what was sent, whether it ended blocked, the most characters ever held)."""
    sent, held = "", 0
    for i in range(0, len(text), chunk):
        step = await mod.feed(text[i : i + chunk])
        held = max(held, len(mod.held))
        sent += step.release
        if step.blocked:
            return sent, True, held
    step = await mod.finish()
    return sent + step.release, step.blocked, held


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
async def test_a_term_across_chunk_boundaries_is_caught_at_every_offset(chunk: int) -> None:
    pipeline = GuardPipeline(policy(terms=["forbidden phrase"], window=48), {})
    for offset in range(0, 60):
        text = prose(300 + offset, seed=offset) + " forbidden phrase " + prose(200, seed=99)
        start = text.index("forbidden")
        sent, blocked, held = await stream(moderator(pipeline), text, chunk)
        assert blocked, (chunk, offset)
        assert len(sent) <= start, (chunk, offset)  # not even its first letter went out
        assert text.startswith(sent)
        assert held < 48


async def test_a_term_longer_than_the_tail_is_caught_through_the_released_context() -> None:
    # Window 32 (tail 16): the start of this 41-character term is released before its end
    # arrives; the check that sees the end still sees the start, in the context.
    term = "alpha bravo charlie delta echo foxtrot"
    pol = policy(terms=[term], window=32)
    pipeline = GuardPipeline(pol, {})
    assert stream_context_chars(pol, ["blocklist"]) >= 3 * len(term)
    for pad in ("", " " * 300, "\u200b" * 300 + " ", "\n\n \t " * 50):
        text = prose(120) + " " + term.replace(" ", " " + pad) + " and on. " + prose(80)
        sent, blocked, _ = await stream(moderator(pipeline), text)
        assert blocked, repr(pad[:3])
        assert "foxtrot" not in sent
        assert "alpha" in sent  # the start had gone out: only the context could catch it


async def test_without_the_context_the_long_term_would_be_missed() -> None:
    # The same stream with no context: the check that sees "foxtrot" no longer sees "alpha".
    term = "alpha bravo charlie delta echo foxtrot"
    pipeline = GuardPipeline(policy(terms=[term], window=32), {})
    text = prose(120) + " " + term + " and on. " + prose(80)
    mod = moderator(pipeline, context=0)
    mod_sent, blocked_early = "", False
    for i in range(0, len(text), 7):
        step = await mod.feed(text[i : i + 7])
        mod_sent += step.release
        blocked_early = blocked_early or step.blocked
    assert not blocked_early
    assert "foxtrot" in mod_sent
    final = await mod.finish()
    assert final.blocked  # the final check of the whole answer still sees it


async def test_a_regex_straddling_the_context_bound_is_caught() -> None:
    # At most 34 characters wide: longer than the tail (12), so its start is released before
    # its end arrives, and within the context sized from that width.
    pattern = r"secret\W{1,16}code\W{1,4}\d{4}"
    pipeline = GuardPipeline(policy(regexes=[pattern], window=24), {})
    for gap in (1, 4, 15):
        text = prose(200) + " the secret" + "-" * gap + "code: 4821 " + prose(60)
        sent, blocked, _ = await stream(moderator(pipeline), text, chunk=5)
        assert blocked, gap
        assert "4821" not in sent
        if gap == 15:
            assert "secret" in sent


async def test_a_match_longer_than_the_context_is_blocked_by_the_final_check() -> None:
    # The documented difference: `secret.*leak` spans the whole answer; the streamed checks see
    # bounded pieces, the final check sees the whole answer as the non-streamed path does.
    pipeline = GuardPipeline(policy(regexes=[r"secret.*leak"], window=64), {})
    text = "A secret. " + prose(3000) + " a leak."
    (whole,) = await pipeline.run("output", [GuardInput("output", TURNS, completion=text)])
    assert whole.blocked
    sent, blocked, _ = await stream(moderator(pipeline), text)
    assert blocked
    assert "leak" not in sent


class CountingGuard(Guard):
    """A real guard, wrapped: counts the characters it is asked to check."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.stages: frozenset[Stage] = inner.stages
        self.counter = counter

    def for_policy(self, pol: Policy) -> CountingGuard:
        return CountingGuard(self.inner.for_policy(pol), self.counter)

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        self.counter[0] += sum(len(item.text_to_check()) for item in items)
        verdicts: list[GuardVerdict] = await self.inner.check(items)
        return verdicts


async def test_the_characters_each_guard_checks_grow_linearly() -> None:
    from guards.profanity import ProfanityGuard

    pol = parse_policy(
        "name: t\nversion: '1'\nguard_timeout_s: 30\nguards:\n"
        "  blocklist: {stages: [input, output]}\n"
        "  profanity: {stages: [input, output]}\ncustom_blocklists:\n"
        "  - {name: out, terms: [forbidden phrase], stage: output}\n"
    )
    blocklist_chars, profanity_chars = [0], [0]
    profanity = ProfanityGuard()
    profanity.load()
    guards: dict[str, Guard] = {
        "blocklist": CountingGuard(BlocklistGuard(), blocklist_chars),
        "profanity": CountingGuard(profanity, profanity_chars),
    }
    pipeline = GuardPipeline(pol, guards)
    per_char: dict[int, tuple[float, float]] = {}
    for n in (2_000, 8_000, 32_000):
        blocklist_chars[0] = profanity_chars[0] = 0
        text = prose(n, seed=n)
        sent, blocked, _ = await stream(moderator(pipeline), text)
        assert not blocked and sent == text
        per_char[n] = (blocklist_chars[0] / n, profanity_chars[0] / n)
    for n, (blocklist, profanity) in per_char.items():
        # Each character: the final check of the whole answer, about twice in the checks of
        # the stream (as new text, then as the tail or context of the next check).
        assert 2.0 < blocklist < 4.5, (n, blocklist)
        assert profanity == blocklist
    # Flat, where re-checking the answer so far grows with n (32k: over 100 per character).
    assert per_char[32_000][0] <= per_char[2_000][0] * 1.1


async def test_the_held_text_stays_under_the_window_whatever_the_chunks() -> None:
    pipeline = GuardPipeline(policy(terms=["zzzz"], window=40), {})
    rng = random.Random(3)
    text = prose(2000) + "x" * 300 + " " + prose(500) + " " * 200 + prose(100)
    mod = moderator(pipeline)
    i = sent = 0
    while i < len(text):
        size = rng.choice([1, 2, 7, 13, 39])
        step = await mod.feed(text[i : i + size])
        sent += len(step.release)
        i += size
        assert len(mod.held) < 40
    step = await mod.finish()
    assert sent + len(step.release) == len(text)
