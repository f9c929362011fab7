"""The routes file (`GATEWAY_ROUTES_FILE`): its schema, and parsing with file/line/field errors.

```yaml
routes:
  - model: meta-llama/llama-3.2-11b-vision-instruct      # the served name (canonical)
    aliases: [meta-llama/Llama-3.2-11B-Vision-Instruct]   # optional, matched case-insensitively
    api_base: http://engine.ns.svc:8000/v1               # engine: upstream (the default)
    api_key_env: GATEWAY_BOOTSTRAP_KEY                   # or api_key_file: /run/secrets/key
  - model: llama-90b
    engine: litellm
    litellm_model: bedrock/meta.llama3-2-90b-instruct-v1:0
  - model: local-llama
    engine: local                                        # the transformers engine in this pod
```

The first entry is exactly what the Helm chart writes in split mode. Unknown keys are errors;
every error names the file, the line and the field (`routes[0].api_base`). Without a routes file
the gateway serves the local engine under `settings.model_id` (and its aliases), as before; with
one, the local engine (the demo model included) is built only when a route says `engine: local`.
docs/scaling.md describes every field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

EngineKind = Literal["local", "upstream", "litellm"]
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    connect: PositiveFloat = 5.0
    read: PositiveFloat = 120.0  # the longest silence: time to first byte, gap between chunks
    total: PositiveFloat = 600.0  # the whole call, retries and the full stream included
    pool: PositiveFloat = 10.0  # waiting for a free pooled connection


class BaseRoute(_Strict):
    model: str = Field(min_length=1, max_length=256)
    aliases: list[Annotated[str, AfterValidator(lambda v: _check_name(v, "alias"))]] = Field(
        default_factory=list
    )
    policy: str | None = Field(default=None, min_length=1)  # per-route guard policy name

    @field_validator("model")
    @classmethod
    def _plain_model(cls, value: str) -> str:
        return _check_name(value, "model name")


def _check_name(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if value != value.strip():
        raise ValueError(f"{what} {value!r} has leading or trailing spaces")
    if any(c.isspace() or not c.isprintable() for c in value) or len(value) > 256:
        raise ValueError(f"{what} {value!r} must be printable, without spaces, <= 256 characters")
    return value


class LocalRoute(BaseRoute):
    engine: Literal["local"]


class RemoteRoute(BaseRoute):
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)
    api_key_file: Path | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retries: NonNegativeInt = Field(default=2, le=10)  # only ever before the first token
    context_length: PositiveInt = 131_072
    tokenizer_path: Path | None = None  # exact prompt counts (else ~4 characters per token)

    @model_validator(mode="after")
    def _one_key_source(self) -> RemoteRoute:
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self


def _check_base(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://host:8000/v1")
    return value.rstrip("/")


class UpstreamRoute(RemoteRoute):
    engine: Literal["upstream"] = "upstream"
    api_base: str
    upstream_model: str | None = None  # the name sent upstream; default: `model`
    pool_size: PositiveInt = 100

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str) -> str | None:
        return _check_base(value)


class LiteLLMRoute(RemoteRoute):
    engine: Literal["litellm"] = "litellm"
    litellm_model: str = Field(min_length=1)  # e.g. "bedrock/...", "openai/<name>"
    api_base: str | None = None
    litellm_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("api_base")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _check_base(value)


def route_kind(value: Any) -> str | None:
    """`engine` may be left out: litellm when `litellm_model` is set, else upstream."""
    if isinstance(value, dict):
        engine = value.get("engine")
        if engine is None:
            return "litellm" if "litellm_model" in value else "upstream"
        return str(engine)
    return getattr(value, "engine", None)


RouteSpec = Annotated[
    Annotated[LocalRoute, Tag("local")]
    | Annotated[UpstreamRoute, Tag("upstream")]
    | Annotated[LiteLLMRoute, Tag("litellm")],
    Discriminator(
        route_kind,
        custom_error_type="engine",
        custom_error_message="engine must be one of: local, upstream, litellm",
    ),
]


class _Located(ValueError):
    """A cross-route error that knows where it is (model validators have no location)."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in loc)


class RoutesFile(_Strict):
    routes: list[RouteSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> RoutesFile:
        seen: dict[str, str] = {}
        for i, route in enumerate(self.routes):
            names = [("model", route.model)] + [
                (f"aliases[{j}]", a) for j, a in enumerate(route.aliases)
            ]
            for where, name in names:
                key = name.lower()
                if key in seen:
                    raise _Located(
                        ("routes", i, *where.replace("[", ".").rstrip("]").split(".")),
                        f"{name!r} is already served by {seen[key]} "
                        "(names and aliases are case-insensitive)",
                    )
                seen[key] = f"routes[{i}]"
        locals_ = [i for i, r in enumerate(self.routes) if isinstance(r, LocalRoute)]
        if len(locals_) > 1:
            raise _Located(
                ("routes", locals_[1], "engine"),
                "at most one route can use engine: local (one local model per gateway)",
            )
        return self


class RoutesFileError(ValueError):
    """The routes file is unreadable or invalid; `errors` lists "where: what" lines."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors


def load_routes_file(path: Path) -> RoutesFile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesFileError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    return parse_routes(text, str(path))


def parse_routes(text: str, source: str = "<routes>") -> RoutesFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RoutesFileError(source, [f"{where}invalid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise RoutesFileError(source, ["the file must be a mapping with a `routes:` list"])
    try:
        return RoutesFile.model_validate(data)
    except ValidationError as exc:
        raise RoutesFileError(source, _messages(exc, text)) from None


def _messages(exc: ValidationError, text: str) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = [p for p in err["loc"] if p not in ("local", "upstream", "litellm")]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Located):
            loc = list(cause.loc)
        if err["type"] == "engine":  # the discriminator's error sits on the route itself
            loc.append("engine")
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the routes schema)"
        line = _line_of(text, loc)
        prefix = f"line {line}: " if line else ""
        out.append(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")
    return out


def _line_of(text: str, loc: Sequence[int | str]) -> int | None:
    """The YAML line of the deepest node on `loc` (a missing field: its parent mapping)."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        elif isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line
