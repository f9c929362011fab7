"""Code Shield on the completion: insecure code in what the model wrote (output stage only).

What is scanned: each fenced code block of the completion (its language from the fence tag when
it names one Code Shield knows; else every language's rules), and the whole completion when it
has no fence but reads as code. A fence that never closes (generation stopped, or a streamed
block held past its window) is scanned up to the end of the text. The scans
(`guards.code_scan.CodeScanner`: Meta's regex rules, semgrep when a prescan matches) run in a
worker pool sized by settings (`GATEWAY_CODE_SHIELD_WORKERS`), never on the event loop; a
completion without code is answered inline (no thread hop).

Category `insecure_code`: severity from the worst issue (semgrep/regex `error` -> high, i.e.
Code Shield's `block` treatment; `warning` -> medium, its `warn`; `advice` -> low); details list
each issue's CWE, rule, line within its block, block index and language. A scan that fails
raises, so the pipeline reports a guard error and `on_guard_error` decides (block by default).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from guards.base import CategoryScore, Guard, GuardInput, GuardVerdict, Severity, Stage
from guards.code_scan import LANGUAGES, CodeScanner, Issue

CATEGORY = "insecure_code"
_SEVERITY: dict[str, Severity] = {"error": "high", "warning": "medium", "advice": "low"}
_SCORE = {"high": 0.95, "medium": 0.75, "low": 0.55, "safe": 0.0}
_TREATMENT = {"high": "block", "medium": "warn", "low": "warn"}

# A fence opens a line with ``` or ~~~ (three or more), an optional info string, and closes
# with the same character, at least as long, on a line of its own.
_FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)

_FENCE_LANGUAGES = {
    "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp",
    "cs": "csharp", "csharp": "csharp", "c#": "csharp", "java": "java", "js": "javascript",
    "javascript": "javascript", "jsx": "javascript", "node": "javascript", "mjs": "javascript",
    "php": "php", "python": "python", "py": "python", "python3": "python", "py3": "python",
    "rust": "rust", "rs": "rust",
}  # fmt: skip
assert set(_FENCE_LANGUAGES.values()) <= set(LANGUAGES)
# Info strings that are certainly not code Code Shield could judge: skipped.
_NOT_CODE = frozenset({"text", "txt", "markdown", "md", "json", "yaml", "yml", "csv", "output"})

# Lines that read as code, for a completion without fences.
_CODE_LINE = re.compile(
    r"^\s*(?:#include\b|import\s|from\s+\S+\s+import\b|def\s|class\s|fn\s|pub\s|use\s|"
    r"public\s|private\s|function\b|const\s|let\s|var\s|return\b|if\s*\(|for\s*\(|while\s*\(|"
    r"<\?php)|[;{}]\s*$"
)


@dataclass(frozen=True)
class CodeBlock:
    code: str
    language: str | None  # a Code Shield language, or None (unknown: every language's rules)
    start: int  # offset of the block's first code character in the completion
    closed: bool


def code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of a text; the text itself when it has no fence and reads as
    code. Blocks whose info string says they are not code (json, text, ...) are skipped."""
    blocks: list[CodeBlock] = []
    pos = 0
    found_fence = False
    while True:
        opening = _FENCE_OPEN.search(text, pos)
        if opening is None:
            break
        found_fence = True
        fence, info = opening.group(1), opening.group(2).lower()
        body_start = min(len(text), opening.end() + 1)
        closing = re.compile(
            rf"^[ \t]{{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE
        ).search(text, body_start)
        body_end = closing.start() if closing else len(text)
        if info not in _NOT_CODE:
            code = text[body_start:body_end]
            if code.strip():
                blocks.append(
                    CodeBlock(code, _FENCE_LANGUAGES.get(info), body_start, closing is not None)
                )
        if closing is None:
            break
        pos = closing.end()
    if not found_fence and looks_like_code(text):
        blocks.append(CodeBlock(text, None, 0, True))
    return blocks


def looks_like_code(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    return sum(1 for line in lines if _CODE_LINE.search(line)) / len(lines) >= 0.5


class CodeShieldGuard(Guard):
    name = "code_shield"
    stages: frozenset[Stage] = frozenset({"output"})

    def __init__(self, scanner: CodeScanner | None = None, *, workers: int = 2) -> None:
        self.scanner = scanner if scanner is not None else CodeScanner()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cs")

    def load(self) -> None:
        """Locate semgrep and check its rules now (a few seconds); raises CodeShieldUnavailable
        when the optional extra is not installed."""
        self.scanner.load()

    async def check(self, items: Sequence[GuardInput]) -> list[GuardVerdict]:
        found = [code_blocks(item.completion or "") for item in items]
        if not any(found):
            return [_verdict([], 0, 0.0) for _ in items]  # no code: nothing to scan, inline
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(
                *(loop.run_in_executor(self._pool, self._scan, blocks) for blocks in found)
            )
        )

    def _scan(self, blocks: list[CodeBlock]) -> GuardVerdict:
        started = time.perf_counter()
        issues: list[tuple[int, Issue]] = []
        for index, block in enumerate(blocks):
            issues.extend((index, issue) for issue in self.scanner.scan(block.code, block.language))
        return _verdict(issues, len(blocks), time.perf_counter() - started)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.scanner.close()


def _verdict(issues: list[tuple[int, Issue]], blocks: int, latency: float) -> GuardVerdict:
    severity: Severity = "safe"
    for _, issue in issues:
        mapped = _SEVERITY.get(issue.severity, "medium")
        if _SCORE[mapped] > _SCORE[severity]:
            severity = mapped
    details: dict[str, Any] = {"blocks": blocks}
    if issues:
        details["treatment"] = _TREATMENT[severity]
        details["cwe_ids"] = sorted({i.cwe_id for _, i in issues if i.cwe_id})
        details["issues"] = [{"block": b, **i.as_dict()} for b, i in issues]
    return GuardVerdict(
        guard=CodeShieldGuard.name,
        categories={
            CATEGORY: CategoryScore(
                score=_SCORE[severity], severity=severity, detected=bool(issues)
            )
        },
        latency_s=latency,
        details={CATEGORY: details},
    )
