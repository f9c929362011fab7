"""The policy schema (YAML files under `policies/`) and its loader.

A policy says which guards run at each stage, what each category's threshold and action are,
how Llama Guard's hazard codes map onto Azure's categories, custom blocklists, the streaming
hold-back window, timeouts and what a guard failure means. See `docs/policies.md` for the
reference and the shipped files for examples.

`load_policy(path)` reads one file. Every problem is reported with the file, the line and the
field (`policies/x.yaml:12: categories.hate.threshold: Input should be 'low', ...`), through
`PolicyError.issues`. Unknown keys and duplicate keys are errors: a typo must never silently
weaken a policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
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

MAX_POLICY_BYTES = 1_000_000
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class PolicyIssue(BaseModel):
    """One problem in a policy file."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}"


class PolicyError(ValueError):
    """A policy file could not be loaded; `issues` has one entry per problem."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


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
    name: Annotated[str, StringConstraints(pattern=_NAME_RE)]
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
    name: Annotated[str, StringConstraints(pattern=_NAME_RE)] | None = None
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
            raise ValueError(f"{_dotted(path)}: {message}")
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
        return self.llama_guard.map.get(code)  # type: ignore[call-overload]

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


# -- loading ---------------------------------------------------------------------------------


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(policy)"


class _NodeIndex:
    """Find the YAML node (and so the line) of a field path."""

    def __init__(self, root: yaml.Node) -> None:
        self.root = root

    def line(self, path: Sequence[str | int]) -> int:
        """1-based line of the deepest node on the path (a mapping entry's key line)."""
        node: yaml.Node = self.root
        line = int(node.start_mark.line) + 1
        for part in path:
            found = self._child(node, part)
            if found is None:
                break
            anchor, node = found
            line = int(anchor.start_mark.line) + 1
        return line

    @staticmethod
    def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    return key, value
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            item = node.value[part]
            return item, item
        return None


def _duplicate_keys(node: yaml.Node, path: tuple[str | int, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                found.append(((*path, name), key.start_mark.line + 1))
            seen.add(name)
            found.extend(_duplicate_keys(value, (*path, name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found.extend(_duplicate_keys(item, (*path, i)))
    return found


def _pydantic_issue(file: str, index: _NodeIndex, error: Any) -> PolicyIssue:
    loc: list[str | int] = list(error["loc"])
    message: str = error["msg"].removeprefix("Value error, ")
    if "[key]" in loc:
        # An unknown key in a mapping of known names (guards, categories, map).
        at = loc.index("[key]")
        loc = loc[:at]
        message = f"unknown key {loc[-1]!r}: {message}" if loc else message
    if error["type"] == "extra_forbidden":
        message = f"unknown field {loc[-1]!r} (check the spelling)"
    return PolicyIssue(file=file, line=index.line(loc), field=_dotted(loc), message=message)


def parse_policy(text: str, file: str = "<policy>", stem: str | None = None) -> Policy:
    """Validate a policy given as YAML text; `file` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise PolicyError(
            [PolicyIssue(file=file, line=line, field="(yaml)", message=problem)]
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(
            [PolicyIssue(file=file, line=None, field="(yaml)", message=str(exc))]
        ) from None
    if root is None:
        raise PolicyError([PolicyIssue(file=file, line=1, field="(policy)", message="empty file")])
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError(
            [
                PolicyIssue(
                    file=file,
                    line=root.start_mark.line + 1,
                    field="(policy)",
                    message="a policy is a mapping of fields",
                )
            ]
        )
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise PolicyError(
            [
                PolicyIssue(file=file, line=line, field=_dotted(path), message="duplicate key")
                for path, line in duplicates
            ]
        )
    index = _NodeIndex(root)
    data = yaml.load(text, Loader=yaml.SafeLoader)
    if stem is not None and data.get("name") is None:
        if not re.match(_NAME_RE, stem):
            raise PolicyError(
                [
                    PolicyIssue(
                        file=file,
                        line=1,
                        field="name",
                        message=f"no name, and the file stem {stem!r} is not a valid name",
                    )
                ]
            )
        data["name"] = stem
    cross: list[tuple[tuple[str | int, ...], str]] = []
    try:
        policy = Policy.model_validate(data, context={"cross_problems": cross})
    except ValidationError as exc:
        raise PolicyError([_pydantic_issue(file, index, e) for e in exc.errors()]) from None
    if cross:
        raise PolicyError(
            [
                PolicyIssue(file=file, line=index.line(path), field=_dotted(path), message=msg)
                for path, msg in cross
            ]
        )
    return policy


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file; raises PolicyError (file, line, field, message)."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(
            [PolicyIssue(file=file, line=None, field="(file)", message=exc.strerror or str(exc))]
        ) from None
    return load_policy_bytes(raw, path)


def load_policy_bytes(raw: bytes, path: Path) -> Policy:
    """Validate a policy file's bytes (already read, so what is checked is what was hashed)."""
    file = str(path)
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            [
                PolicyIssue(
                    file=file,
                    line=None,
                    field="(file)",
                    message=f"larger than {MAX_POLICY_BYTES} bytes",
                )
            ]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [PolicyIssue(file=file, line=None, field="(file)", message=f"not UTF-8: {exc}")]
        ) from None
    return parse_policy(text, file=file, stem=path.stem).with_source(path)
