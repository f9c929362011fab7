"""Loading a policy file: YAML text -> a validated `Policy`, or every problem in it.

`load_policy(path)` reads one file. Every problem is reported with the file, the line and the
field (`policies/x.yaml:12: categories.hate.threshold: Input should be 'low', ...`), through
`PolicyError.issues`. Unknown keys and duplicate keys are errors: a typo must never silently
weaken a policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from guards.policy import NAME_PATTERN, Policy, dotted_path

MAX_POLICY_BYTES = 1_000_000


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
    return PolicyIssue(file=file, line=index.line(loc), field=dotted_path(loc), message=message)


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
                PolicyIssue(file=file, line=line, field=dotted_path(path), message="duplicate key")
                for path, line in duplicates
            ]
        )
    index = _NodeIndex(root)
    data = yaml.load(text, Loader=yaml.SafeLoader)
    if stem is not None and data.get("name") is None:
        if not re.match(NAME_PATTERN, stem):
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
                PolicyIssue(file=file, line=index.line(path), field=dotted_path(path), message=msg)
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
