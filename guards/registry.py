"""The guards this process has: the embedded ones always, model guards when weights are given.

Used by the gateway at start-up and by `gateway policy eval`, so both judge with the same set.
"""

from __future__ import annotations

from pathlib import Path

from guards.base import Guard
from guards.jailbreak_heuristic import JailbreakHeuristicGuard
from guards.profanity import ProfanityGuard


def build_guards(
    *,
    prompt_guard_path: Path | None = None,
    llama_guard_path: Path | None = None,
    device: str = "auto",
) -> dict[str, Guard]:
    """Blocking (loads classifiers and weights): call it from a worker thread in async code."""
    profanity = ProfanityGuard()
    profanity.load()
    guards: dict[str, Guard] = {
        "profanity": profanity,
        "jailbreak_heuristic": JailbreakHeuristicGuard(),
    }
    if prompt_guard_path is not None:
        from guards.prompt_guard import PromptGuard

        guards["prompt_guard"] = PromptGuard(prompt_guard_path, device=device)
    if llama_guard_path is not None:
        from guards.llama_guard import LlamaGuard

        guards["llama_guard"] = LlamaGuard(llama_guard_path, device=device)
    return guards
