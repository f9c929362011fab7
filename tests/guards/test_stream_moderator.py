"""The streaming moderator never releases text that a later check blocks."""

from __future__ import annotations

import pytest

from guards.stream_moderator import StreamModerator


def moderator(banned: str, window: int = 40) -> StreamModerator[bool]:
    async def check(text: str) -> bool:
        return banned in text

    return StreamModerator(check=check, is_blocked=lambda blocked: blocked, window=window)


async def run(mod: StreamModerator[bool], pieces: list[str]) -> tuple[str, bool]:
    sent = ""
    for piece in pieces:
        step = await mod.feed(piece)
        sent += step.release
        if step.blocked:
            return sent, True
    step = await mod.finish()
    return sent + step.release, step.blocked


@pytest.mark.parametrize("k", range(1, 12))
async def test_violation_at_token_k_leaks_nothing_past_last_boundary(k: int) -> None:
    # Tokens of a harmless sentence, then a violation that appears at token k.
    tokens = ["Hello", " there", ".", " This", " is", " fine", ".", " Now", " the", " bad", " part"]
    tokens = [*tokens[:k], " FORBIDDEN", " words", " follow", "."]
    sent, blocked = await run(moderator("FORBIDDEN"), tokens)
    assert blocked
    assert "FORBIDDEN" not in sent
    # Only checked text up to a boundary or space was released.
    assert sent == "" or sent[-1] in ". " or sent.endswith(tuple(tokens[:k]))
    assert "".join(tokens).startswith(sent)


async def test_term_split_across_checks_is_not_half_sent() -> None:
    sent, blocked = await run(moderator("kill", window=4), ["I will ki", "ll it."])
    assert blocked
    assert "ki" not in sent


async def test_clean_stream_releases_everything() -> None:
    pieces = ["One", " two", ".", " Three", " four", " five", " six", ".", " Seven", " eight"]
    pieces += [" and more words.", " Then the end of it all."]
    mod = moderator("nothing-bad", window=20)
    sent, blocked = await run(mod, pieces)
    assert not blocked
    assert sent == "".join(pieces)
    assert mod.checks >= 2  # at a boundary before the tail, and at the end


async def test_window_bounds_the_held_text() -> None:
    mod = moderator("zzz", window=10)
    held_max = 0
    for piece in ["abcdefghij" * 5]:
        await mod.feed(piece)
        held_max = max(held_max, len(mod.held))
    for ch in "klmnopqrstuvwxyz" * 3:
        await mod.feed(ch)
        held_max = max(held_max, len(mod.held))
    assert held_max < 10


async def test_blocked_at_the_end_releases_nothing_more() -> None:
    sent, blocked = await run(moderator("END"), ["Fine text", " and then END"])
    assert blocked
    assert sent == ""


@pytest.mark.parametrize(
    "pieces",
    [
        ["This is bad", ". ", "phrase and more"],
        ["so f.", "o.", "r.", "b.", "i.", "d. ok"],
        ["a b c d e f g h ", "bad ", "phrase", " x y z"],
    ],
)
async def test_a_term_spread_over_words_or_dots_is_never_half_sent(pieces: list[str]) -> None:
    def squash(text: str) -> str:  # as the blocklist's normalisation joins spaced-out letters
        return "".join(ch for ch in text if ch.isalnum())

    async def check(text: str) -> bool:
        return "badphrase" in squash(text) or "forbid" in squash(text)

    mod: StreamModerator[bool] = StreamModerator(check=check, is_blocked=bool, window=24)
    sent, blocked = await run(mod, pieces)
    assert blocked
    assert "bad" not in sent and "f." not in sent


async def test_the_tail_is_released_at_the_end() -> None:
    mod = moderator("nope", window=20)
    sent, blocked = await run(mod, ["Quite a long sentence here. ", "And a tail"])
    assert not blocked
    assert sent == "Quite a long sentence here. And a tail"
