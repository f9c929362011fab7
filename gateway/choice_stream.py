"""One streamed choice: an engine event in, the chunks it allows out.

A delta is counted in the request's token ledger, its logprobs and tool-call position noted,
then fed to the choice's `StreamModerator` (a policy with no output guard holds nothing back);
what moderation releases passes the tool-call hold (`gateway.tool_stream`) and goes out as
content with the logprobs of the text it completes. A violation stops the choice's generation
and ends it with `finish_reason: "content_filter"`; what was withheld is never sent. The finish
event brings the engine's exact token counts, the final check of the whole answer, then what
was held (text, or the tool calls it was) and the finish reason.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import structlog

from gateway.audit import should_audit
from gateway.chat import checked_finish
from gateway.chunk_writer import ChunkWriter
from gateway.logprob_stream import HeldLogprobs
from gateway.prepared_chat import PreparedChat
from gateway.tool_stream import ToolCallStream
from gateway.wire_shapes import ContentFilterResults, Logprobs
from guards.base import GuardInput
from guards.code_block_hold import CodeBlockHold
from guards.decision import Decision
from guards.pipeline import GuardPipeline
from guards.stream_context import stream_context_chars
from guards.stream_moderator import ModerationStep, StreamModerator
from model.engine import Finished, TextDelta
from model.logprobs import openai_logprobs

log = structlog.get_logger(__name__)

_NOTHING: ModerationStep[Decision] = ModerationStep()


class ChoiceStream:
    """The state of one streamed choice, from its role chunk to its finish chunk."""

    def __init__(
        self,
        chat: PreparedChat,
        index: int,
        writer: ChunkWriter,
        stop_generating: Callable[[], object],
        audit: Callable[[PreparedChat, Decision, str], None],
    ) -> None:
        self.index = index
        self.open = True
        self._chat = chat
        self._tokens = chat.tokens
        self._writer = writer
        self._stop_generating = stop_generating
        self._wants_logprobs = bool(chat.request.logprobs)
        self._results = safe_output_results(chat)  # of the last check (safe until the first)
        self._logprobs = HeldLogprobs()
        self._tools = ToolCallStream(chat.request)
        # No output guard at all: nothing to hold text back for, it is sent as it comes.
        self._moderator: StreamModerator[Decision] | None = None
        if guards := chat.pipeline.guards_for("output"):
            judge = OutputJudge(chat, audit)
            self._moderator = StreamModerator(
                check=judge.check,
                check_piece=judge.check_piece,
                is_blocked=_blocked,
                window=chat.policy.streaming.window_chars,
                context=stream_context_chars(chat.policy, guards),
                code_hold=code_block_hold(chat, guards),
            )

    def begin(self) -> None:
        self._writer.role(self.index, self._results)

    async def take(self, event: TextDelta | Finished) -> bool:
        """One engine event of this choice; returns whether moderation released text that
        went out as content (the stream's first such text is its first token)."""
        moderator = self._moderator
        step: ModerationStep[Decision]
        if isinstance(event, TextDelta):
            finished = None
            self._tokens.streamed(self.index, event.tokens)
            self._logprobs.add(event.text, event.logprobs)
            self._tools.produced(event.text, event.tool_calls)
            if moderator is None:
                step = ModerationStep(release=event.text)
            else:
                step = await moderator.feed(event.text)
        else:
            finished = checked_finish(event)  # an engine error or cancellation raises here
            self._tokens.finish(self.index, finished)
            step = await moderator.finish() if moderator else _NOTHING
        if step.result is not None:
            self._results = step.result.content_filter_results()
        # What moderation released, less what the tool-call hold keeps, goes out.
        text = self._tools.feed(step.release) if step.release else ""
        if text:
            self._send(text)
        if step.blocked:
            self._withhold()
        elif finished is not None:
            self._end(finished.reason)
        return bool(text)

    def _send(self, text: str) -> None:
        """Content, with the logprobs of the tokens whose text it completes."""
        released = self._logprobs.release(len(text))
        logprobs: Logprobs | None = openai_logprobs(released) if self._wants_logprobs else None
        self._writer.chunk(self.index, {"content": text}, None, self._results, logprobs)

    def _withhold(self) -> None:
        """A violation: stop generating what will never be sent, and end the choice."""
        self.open = False
        self._stop_generating()
        log.info("completion_withheld", choice=self.index, policy=self._chat.policy.name)
        self._writer.chunk(self.index, {}, "content_filter", self._results)

    def _end(self, reason: str) -> None:
        """The engine finished and the whole answer passed: what was held, then the reason."""
        self.open = False
        tail, call_deltas = self._tools.finish(reason)
        if tail:
            self._send(tail)
        for delta in call_deltas:
            self._writer.chunk(self.index, delta, None, self._results)
        self._writer.chunk(self.index, {}, "tool_calls" if call_deltas else reason, self._results)


class OutputJudge:
    """The policy's output guards for one streamed choice.

    A stream is checked piece by piece, then whole at the end: each distinct outcome is audited
    once, not at every check (the non-streamed path's rule: blocked, annotated or a guard
    failed)."""

    def __init__(
        self, chat: PreparedChat, audit: Callable[[PreparedChat, Decision, str], None]
    ) -> None:
        self._chat = chat
        self._audit = audit
        # The last audited (hits, failed guards): a failure's message may vary between checks.
        self._audited: tuple[dict[str, str], frozenset[str]] | None = None

    async def check(self, text: str) -> Decision:
        return await self._judge(text, piece=False)

    async def check_piece(self, text: str) -> Decision:
        return await self._judge(text, piece=True)

    async def _judge(self, text: str, *, piece: bool) -> Decision:
        chat = self._chat
        item = GuardInput("output", chat.turns, completion=text)
        (decision,) = await chat.pipeline.run("output", [item], piece=piece)
        if should_audit(decision):
            seen = (dict(decision.hits), frozenset(decision.errors))
            if decision.blocked or self._audited != seen:
                self._audited = seen
                self._audit(chat, decision, text)
        return decision


def _blocked(decision: Decision) -> bool:
    return decision.blocked


def code_block_hold(chat: PreparedChat, output_guards: list[str]) -> CodeBlockHold | None:
    """A code-block hold when Code Shield judges this stream's output (guards.code_block_hold)."""
    if "code_shield" not in output_guards:
        return None
    return CodeBlockHold(window=chat.policy.streaming.code_block_window_chars)


def safe_output_results(chat: PreparedChat) -> ContentFilterResults:
    """The output results of a check that found nothing, for chunks sent before the first
    check: the same for every request of a pipeline, so computed once per pipeline."""
    pipeline = chat.pipeline
    cached = _SAFE_OUTPUT.get(pipeline)
    if cached is None:
        cached = pipeline.safe_decision("output").content_filter_results()
        _SAFE_OUTPUT[pipeline] = cached
    return cached


# Per pipeline object (a reloaded policy gets a new pipeline; old ones drop out with it).
_SAFE_OUTPUT: weakref.WeakKeyDictionary[GuardPipeline, ContentFilterResults] = (
    weakref.WeakKeyDictionary()
)
