"""The policy schema: what a policy file (YAML under `policies/`) may say, and the queries the
pipeline and the decision ask of a loaded policy.

A policy says which guards run at each stage, what each category's threshold and action are,
how Llama Guard's hazard codes map onto Azure's categories, custom blocklists, the streaming
hold-back window, timeouts and what a guard failure means. See `docs/policies.md` for the
reference and the shipped files for examples. Reading a file, with every problem reported by
file, line and field, is `guards.policy_loader`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationInfo,
    model_validator,
)

from guards.base import SEVERITY_ORDER, Stage
from guards.blocklist import CompiledBlocklist, check_regex, check_term
from guards.language_codes import CARD_IMAGE_LANGUAGES, CARD_TEXT_LANGUAGES, check_language_code

GuardName = Literal[
    "blocklist", "profanity", "jailbreak_heuristic", "prompt_guard", "llama_guard",
    "code_shield", "language",
]  # fmt: skip
KNOWN_GUARDS: tuple[str, ...] = GuardName.__args__  # type: ignore[attr-defined]
# Guards that only make sense on the prompt.
INPUT_ONLY_GUARDS = frozenset({"jailbreak_heuristic", "prompt_guard"})
# Guards that only make sense on the completion.
OUTPUT_ONLY_GUARDS = frozenset({"code_shield"})

Threshold = Literal["low", "medium", "high"]
Action = Literal["block", "annotate"]
OnError = Literal["block", "allow"]
AzureSeverityCategory = Literal["hate", "self_harm", "sexual", "violence"]
LlamaGuardCode = Literal[
    "S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11", "S12", "S13", "S14"
]  # fmt: skip
LLAMA_GUARD_CODES: tuple[str, ...] = LlamaGuardCode.__args__  # type: ignore[attr-defined]
CategoryName = Literal[
    "hate", "self_harm", "sexual", "violence", "jailbreak", "indirect_attack", "profanity",
    "S1", "S2", "S3", "S4", "S5", "S6", "S7", "S8", "S9", "S10", "S11", "S12", "S13", "S14",
    "insecure_code", "unsupported_language",
]  # fmt: skip
CATEGORY_NAMES: tuple[str, ...] = CategoryName.__args__  # type: ignore[attr-defined]

LLAMA_GUARD_NAMES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex Crimes",
    "S4": "Child Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
DEFAULT_LLAMA_GUARD_MAP: dict[str, str] = {
    "S1": "violence",
    "S3": "sexual",
    "S4": "sexual",
    "S9": "violence",
    "S10": "hate",
    "S11": "self_harm",
    "S12": "sexual",
}

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


# -- the schema ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _to_str(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError("values must be unique")
    return values


class GuardSettings(_Strict):
    """One guard of the policy: where it runs and how its failures count."""

    stages: Annotated[list[Stage], AfterValidator(_unique)] = Field(min_length=1)
    # Optional guards that are not available (no weights configured) are skipped with a log
    # line; a required guard that is not available fails (and `on_error` decides).
    optional: bool = False
    timeout_s: float | None = Field(default=None, gt=0, le=60)
    on_error: OnError | None = None


class CategoryRule(_Strict):
    """Threshold and action of one category; unset fields come from `defaults`."""

    threshold: Threshold | None = None
    action: Action | None = None


class Defaults(_Strict):
    threshold: Threshold = "medium"
    action: Action = "block"


@dataclass(frozen=True)
class Rule:
    """A category's resolved rule: flagged when severity >= threshold; then `action`."""

    threshold: Threshold
    action: Action

    def hit(self, severity: str) -> bool:
        return SEVERITY_ORDER.get(severity, 0) >= SEVERITY_ORDER[self.threshold]


class LlamaGuardSettings(_Strict):
    # Hazard code -> Azure severity category it counts towards. Codes not in the map have no
    # Azure counterpart: they are reported under the `llama_guard` key of the results with
    # their own rule (`categories.<code>`, else `unmapped`, else `defaults`).
    map: dict[LlamaGuardCode, AzureSeverityCategory] = Field(
        default_factory=lambda: dict(DEFAULT_LLAMA_GUARD_MAP)  # type: ignore[arg-type]
    )
    unmapped: CategoryRule = CategoryRule()


class BlocklistSettings(_Strict):
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    # Words and phrases, matched on word boundaries after normalisation (see guards.blocklist).
    terms: list[Annotated[str, AfterValidator(check_term)]] = Field(default_factory=list)
    # Regular expressions on the normalised (lower-case) text; validated here.
    regexes: list[Annotated[str, AfterValidator(check_regex)]] = Field(default_factory=list)
    stage: Literal["input", "output", "both"] = "both"
    action: Action = "block"

    @property
    def stages(self) -> frozenset[Stage]:
        if self.stage == "both":
            return frozenset({"input", "output"})
        return frozenset({self.stage})


class StreamingSettings(_Strict):
    # At most this many characters of generated text are held back before the output guards
    # check them; checks also happen earlier at natural boundaries (sentence or line ends).
    window_chars: int = Field(default=200, ge=16, le=4000)
    # With code_shield on output: a fenced code block is held back whole until it closes (so
    # Code Shield scans it complete before any of it is sent), at most this many characters;
    # past that, what is held is scanned as it is and released if clean.
    code_block_window_chars: int = Field(default=4000, ge=16, le=100_000)


LanguageCode = Annotated[str, AfterValidator(check_language_code)]


class LanguageSettings(_Strict):
    """The `language` guard's allowed languages (ISO 639-1) and its floors."""

    # Text-only conversations: the model card's eight languages by default.
    text: Annotated[list[LanguageCode], AfterValidator(_unique)] = Field(
        default_factory=lambda: list(CARD_TEXT_LANGUAGES), min_length=1
    )
    # Conversations with an image: English only by default (the card's image+text support).
    image: Annotated[list[LanguageCode], AfterValidator(_unique)] = Field(
        default_factory=lambda: list(CARD_IMAGE_LANGUAGES), min_length=1
    )
    # Below this confidence, or with fewer letters, the language is unknown: never flagged.
    min_confidence: float = Field(default=0.6, ge=0, le=1)
    min_letters: int = Field(default=16, ge=1, le=1000)


class AuditSettings(_Strict):
    # The audit log is content-free unless the policy asks for samples (a privacy decision
    # that belongs to whoever owns the policy); samples are cut to `max_chars`.
    include_content: bool = False
    max_chars: int = Field(default=200, ge=1, le=4000)


class Policy(_Strict):
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None
    version: Annotated[str, BeforeValidator(_to_str), Field(min_length=1, max_length=64)]
    description: str = ""
    guards: dict[GuardName, GuardSettings]
    guard_timeout_s: float = Field(default=2.0, gt=0, le=60)
    on_guard_error: OnError = "block"
    defaults: Defaults = Defaults()
    categories: dict[CategoryName, CategoryRule] = Field(default_factory=dict)
    llama_guard: LlamaGuardSettings = LlamaGuardSettings()
    excluded_categories: Annotated[list[CategoryName], AfterValidator(_unique)] = Field(
        default_factory=list
    )
    custom_blocklists: list[BlocklistSettings] = Field(default_factory=list)
    streaming: StreamingSettings = StreamingSettings()
    audit: AuditSettings = AuditSettings()
    language: LanguageSettings = LanguageSettings()

    _compiled: tuple[CompiledBlocklist, ...] = PrivateAttr(default=())
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Policy:
        problems = self.cross_problems()
        collect = info.context.get("cross_problems") if isinstance(info.context, dict) else None
        if isinstance(collect, list):
            collect.extend(problems)
        elif problems:
            path, message = problems[0]
            raise ValueError(f"{dotted_path(path)}: {message}")
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._compiled = tuple(
            CompiledBlocklist(
                name=b.name,
                terms=tuple(b.terms),
                regexes=tuple(b.regexes),
                stages=b.stages,
                action=b.action,
            )
            for b in self.custom_blocklists
        )

    def cross_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Rules that span fields, each with the path of the field to blame."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for guard, settings in self.guards.items():
            if guard in INPUT_ONLY_GUARDS and "output" in settings.stages:
                problems.append((("guards", guard, "stages"), f"{guard} runs on input only"))
            if guard in OUTPUT_ONLY_GUARDS and "input" in settings.stages:
                problems.append((("guards", guard, "stages"), f"{guard} runs on output only"))
        seen: set[str] = set()
        for i, blocklist in enumerate(self.custom_blocklists):
            if blocklist.name in seen:
                problems.append(
                    (("custom_blocklists", i, "name"), f"duplicate list name {blocklist.name!r}")
                )
            seen.add(blocklist.name)
            if not blocklist.terms and not blocklist.regexes:
                problems.append((("custom_blocklists", i), "a list needs terms or regexes"))
            runs = self.guards.get("blocklist")
            missing = sorted(blocklist.stages - set(runs.stages if runs else ()))
            if missing:
                problems.append(
                    (
                        ("custom_blocklists", i, "stage"),
                        f"the blocklist guard does not run on {', '.join(missing)}: add it "
                        f"under guards.blocklist.stages",
                    )
                )
        return problems

    # -- queries used by the pipeline and the decision ---------------------------------------

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def compiled_blocklists(self) -> tuple[CompiledBlocklist, ...]:
        return self._compiled

    def with_source(self, path: Path) -> Policy:
        self._source = path
        return self

    def guards_for(self, stage: Stage) -> list[tuple[str, GuardSettings]]:
        return [(name, s) for name, s in self.guards.items() if stage in s.stages]

    def timeout_for(self, guard: str) -> float:
        settings = self.guards.get(guard)  # type: ignore[call-overload]
        if settings is not None and settings.timeout_s is not None:
            return float(settings.timeout_s)
        return self.guard_timeout_s

    def on_error_for(self, guard: str) -> OnError:
        settings = self.guards.get(guard)  # type: ignore[call-overload]
        if settings is not None and settings.on_error is not None:
            return settings.on_error  # type: ignore[no-any-return]
        return self.on_guard_error

    def rule(self, category: str) -> Rule:
        """The resolved threshold and action of a category (any key, S-codes included)."""
        own = self.categories.get(category)  # type: ignore[call-overload]
        fallbacks: list[CategoryRule] = [own] if own is not None else []
        if category in LLAMA_GUARD_CODES and category not in self.llama_guard.map:
            fallbacks.append(self.llama_guard.unmapped)
        threshold = next(
            (r.threshold for r in fallbacks if r.threshold is not None), self.defaults.threshold
        )
        action = next((r.action for r in fallbacks if r.action is not None), self.defaults.action)
        return Rule(threshold=threshold, action=action)

    def blocklist(self, name: str) -> BlocklistSettings | None:
        return next((b for b in self.custom_blocklists if b.name == name), None)

    def blocklists_for(self, stage: Stage) -> list[BlocklistSettings]:
        return [b for b in self.custom_blocklists if stage in b.stages]

    def is_excluded(self, category: str) -> bool:
        return category in self.excluded_categories

    def llama_guard_target(self, code: str) -> str | None:
        """The Azure category a hazard code counts towards, or None (no counterpart)."""
        target: str | None = self.llama_guard.map.get(code)  # type: ignore[call-overload]
        return target

    def llama_guard_excluded_codes(self) -> list[str]:
        """Codes to pass to Llama Guard as `excluded_category_keys`: excluded codes, and codes
        whose Azure category is excluded."""
        excluded = set(self.excluded_categories)
        return [
            code
            for code in LLAMA_GUARD_CODES
            if code in excluded or self.llama_guard.map.get(code) in excluded  # type: ignore[call-overload]
        ]

    @property
    def may_block(self) -> bool:
        """False when nothing in this policy can ever block (an audit policy)."""
        if self.on_guard_error == "block" and self.guards:
            return True
        if any(g.on_error == "block" for g in self.guards.values()):
            return True
        if any(b.action == "block" for b in self.custom_blocklists):
            return True
        return any(self.rule(c).action == "block" for c in CATEGORY_NAMES)


def dotted_path(path: Sequence[str | int]) -> str:
    """A field path as it reads in an error: `custom_blocklists[0].name`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(policy)"
