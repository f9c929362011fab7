"""Streaming with Code Shield: a code block is held until it closes, then released or withheld.

The stream moderator runs the real output pipeline (Code Shield with real semgrep scans) on
token-sized pieces, as the gateway's streams do.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guards.base import GuardInput
from guards.code_block_hold import CodeBlockHold
from guards.code_scan import CodeScanner
from guards.code_shield import CodeShieldGuard
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.policy_loader import parse_policy
from guards.stream_moderator import StreamModerator
from model.engine import ChatTurn, TextPart

POLICY = """
name: hold
version: "1"
guards:
  code_shield: {stages: [output]}
categories:
  insecure_code: {threshold: medium, action: block}
streaming: {window_chars: 40, code_block_window_chars: 4000}
"""
INTRO = "Sure. Here is a function that loads the data you asked for, step by step.\n\n"
VULNERABLE = "```python\nimport pickle\n\ndef load(blob):\n    return pickle.loads(blob)\n```\n"
SAFE = "```python\nimport json\n\ndef load(blob):\n    return json.loads(blob)\n```\n"
OUTRO = "Call it with the bytes you received. It returns the decoded object."


@pytest.fixture(scope="module")
def pipeline() -> Iterator[GuardPipeline]:
    guard = CodeShieldGuard(CodeScanner(), workers=2)
    guard.load()
    yield GuardPipeline(parse_policy(POLICY), {"code_shield": guard})
    guard.close()


def tokens(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def moderator(pipeline: GuardPipeline, window: int = 4000) -> StreamModerator[Decision]:
    async def check(text: str) -> Decision:
        item = GuardInput("output", (ChatTurn("user", (TextPart("code?"),)),), completion=text)
        (decision,) = await pipeline.run("output", [item])
        return decision

    return StreamModerator(
        check=check,
        is_blocked=lambda d: d.blocked,
        window=40,
        code_hold=CodeBlockHold(window=window),
    )


async def stream(mod: StreamModerator[Decision], text: str) -> tuple[list[str], bool]:
    """What the client receives, chunk by chunk, and whether the stream was cut."""
    sent: list[str] = []
    for piece in tokens(text):
        step = await mod.feed(piece)
        if step.release:
            sent.append(step.release)
        if step.blocked:
            return sent, True
    step = await mod.finish()
    if step.release:
        sent.append(step.release)
    return sent, step.blocked


async def test_a_clean_block_is_held_until_it_closes_then_released(
    pipeline: GuardPipeline,
) -> None:
    mod = moderator(pipeline)
    text = INTRO + SAFE + OUTRO
    sent: list[str] = []
    fence_at = len(INTRO)
    closed_at = len(INTRO) + len(SAFE) - 1  # the closing fence's newline
    fed = 0
    for piece in tokens(text):
        step = await mod.feed(piece)
        fed += len(piece)
        sent.append(step.release)
        so_far = "".join(sent)
        assert not step.blocked
        if fed <= closed_at:
            # Nothing of the block goes out before it closes.
            assert len(so_far) <= fence_at
    final = await mod.finish()
    assert "".join(sent) + final.release == text
    # Text before the block flowed before the block was complete.
    assert mod.checks >= 2


async def test_a_vulnerable_block_is_withheld_with_no_byte_sent(pipeline: GuardPipeline) -> None:
    mod = moderator(pipeline)
    sent, blocked = await stream(mod, INTRO + VULNERABLE + OUTRO)
    assert blocked
    out = "".join(sent)
    assert "```" not in out and "pickle" not in out
    assert INTRO.startswith(out)
    assert out  # the introduction flowed before the block


async def test_past_the_window_the_held_part_is_scanned_as_it_is(pipeline: GuardPipeline) -> None:
    # A long clean block with a small window: released in window-sized pieces before it closes.
    body = "".join(f"x{i} = {i}\n" for i in range(60))
    text = INTRO + f"```python\n{body}```\n" + OUTRO
    mod = moderator(pipeline, window=120)
    released_before_close = 0
    fed = 0
    close_at = len(INTRO) + len(body) + 10
    for piece in tokens(text):
        step = await mod.feed(piece)
        fed += len(piece)
        if fed < close_at:
            released_before_close += len(step.release)
    final = await mod.finish()
    assert not final.blocked
    assert mod.released == text
    assert released_before_close > len(INTRO)  # part of the block went out early

    # The same with a vulnerable line in the first window: withheld before it is sent.
    bad = "import pickle\nobj = pickle.loads(blob)\n" + body
    mod = moderator(pipeline, window=120)
    sent, blocked = await stream(mod, INTRO + f"```python\n{bad}```\n")
    assert blocked
    assert "pickle" not in "".join(sent)


def test_hold_plan_keeps_text_before_a_fence_flowing() -> None:
    hold = CodeBlockHold(window=1000)
    plan = hold.plan("", "Intro line.\n```py\nx = 1\n")
    assert plan.text == "Intro line.\n"
    assert plan.release_limit == len("Intro line.\n")
    # A last line that may become a fence is held until its newline arrives.
    hold = CodeBlockHold(window=1000)
    plan = hold.plan("", "Intro.\n``")
    assert plan.text == "Intro.\n"
    closed = CodeBlockHold(window=1000)
    plan = closed.plan("", "a\n```py\nx = 1\n```\nafter")
    assert plan.text == "a\n```py\nx = 1\n```\nafter"


def test_the_hold_scanned_piece_by_piece_decides_as_one_scan_of_the_whole_text() -> None:
    """`release_limit` scans only the text that arrived since the last call; whatever the
    pieces, and whatever was released meanwhile, it decides as a fresh hold given the whole
    text at once."""
    import random

    rng = random.Random(7)
    lines = ["Some prose here.", "```python", "```", "~~~", "   ```", "    ```", "`` not", "x = 1"]
    lines += ["```` four", "````", "~~~~ ~", "", "  ~~~text", "a ``` b", "`"]
    for _ in range(200):
        text = "\n".join(rng.choice(lines) for _ in range(rng.randint(1, 12)))
        text += rng.choice(["", "\n", "\n`", "\n  ``", "\nplain"])
        hold = CodeBlockHold(window=10**9)
        released, held, i = 0, "", 0
        while i < len(text):
            size = rng.choice([1, 2, 3, 7, 20])
            held += text[i : i + size]
            i += size
            limit = hold.release_limit(released, held)
            answer = text[: released + len(held)]
            fresh = CodeBlockHold(window=10**9).release_limit(0, answer) - released
            assert limit == max(0, fresh), (text, i)
            cut = rng.randint(0, limit)  # the moderator releases at most the limit
            released, held = released + cut, held[cut:]
