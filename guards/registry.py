"""The guards this process has: the embedded ones always, model guards when weights are given.

Used by the gateway at start-up and by `gateway policy eval`, so both judge with the same set.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from guards.base import Guard
from guards.jailbreak_heuristic import JailbreakHeuristicGuard
from guards.language import LanguageGuard
from guards.profanity import ProfanityGuard

log = structlog.get_logger("guards")


def build_guards(
    *,
    prompt_guard_path: Path | None = None,
    llama_guard_path: Path | None = None,
    device: str = "auto",
    code_shield_workers: int = 2,
    code_shield_timeout_s: float = 10.0,
    background_loads: bool = False,
) -> dict[str, Guard]:
    """Blocking (loads classifiers and weights): call it from a worker thread in async code.

    Code Shield is there when the optional extra is installed (`pip install '.[codeshield]'`);
    without it a policy that names `code_shield` skips it (optional) or fails closed.
    `background_loads` (the gateway): the language guard's slow short-text models load in a
    background thread (short texts read "unknown" until then) instead of delaying start-up."""
    profanity = ProfanityGuard()
    profanity.load()
    language = LanguageGuard()
    language.load(wait=not background_loads)
    guards: dict[str, Guard] = {
        "profanity": profanity,
        "jailbreak_heuristic": JailbreakHeuristicGuard(),
        "language": language,
    }
    from guards.code_scan import CodeScanner, CodeShieldUnavailable
    from guards.code_shield import CodeShieldGuard

    code_shield = CodeShieldGuard(
        CodeScanner(semgrep_timeout_s=code_shield_timeout_s), workers=code_shield_workers
    )
    try:
        code_shield.load()
    except CodeShieldUnavailable as exc:
        code_shield.close()
        log.warning("code_shield_unavailable", reason=str(exc))
    else:
        if code_shield.scanner.dropped_rules:
            log.warning("code_shield_rules_dropped", rules=code_shield.scanner.dropped_rules)
        guards["code_shield"] = code_shield
    if prompt_guard_path is not None:
        from guards.prompt_guard import PromptGuard

        guards["prompt_guard"] = PromptGuard(prompt_guard_path, device=device)
    if llama_guard_path is not None:
        from guards.llama_guard import LlamaGuard

        guards["llama_guard"] = LlamaGuard(llama_guard_path, device=device)
    return guards
