"""Which JSON Schema features grammar-constrained decoding enforces, and refusing the rest.

xgrammar compiles a schema into a grammar, but it accepts some keywords it does not enforce
(tried here with xgrammar 0.2.9 on random logits, every output checked with `jsonschema`):
`uniqueItems` is ignored, `format` is approximate (`"date"` let `1415-02-30` through), `oneOf`
falls back to `anyOf`, and `not`/`if` are silently dropped. A schema using one of them would get
outputs that do not validate, so the request is refused with a 400 naming the keyword (OpenAI's
strict mode refuses a similar list). Annotations (`title`, `description`, ...) are allowed.
"""

from __future__ import annotations

import functools
import json
from typing import Any

# Enforced keywords (each one covered by the seeded-sample tests in tests/model/test_grammar.py).
ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
    }
)
# Keywords that change nothing about which values are valid.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "strict",
    }
)
# Keywords whose value is a map from names to subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames")
JSON_OBJECT_SCHEMA = '{"type":"object"}'


class SchemaError(ValueError):
    """A schema the engine cannot enforce; the message names what and where."""


def unsupported_features(schema: Any, where: str = "#") -> list[str]:
    """`keyword at path` for every keyword that constrained decoding would not enforce."""
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"a non-object schema at {where}"]
    found: list[str] = []
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key == "uniqueItems" and value is False:
            continue
        if key not in ENFORCED:
            found.append(f"'{key}' at {where}")
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                found += unsupported_features(sub, f"{where}/{key}/{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                found += unsupported_features(sub, f"{where}/{key}/{i}")
        elif key in _SCHEMA_VALUES:
            found += unsupported_features(value, f"{where}/{key}")
    return found


def canonical_schema(schema: Any) -> str:
    """The schema as compact, key-sorted JSON (the compiled-grammar cache key), after checking
    that every keyword is enforced and that xgrammar can compile it; else `SchemaError`."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    found = unsupported_features(schema)
    if found:
        raise SchemaError(
            "these JSON Schema features cannot be enforced by this server: " + ", ".join(found)
        )
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    _parse_with_xgrammar(text)
    return text


@functools.lru_cache(maxsize=256)
def _parse_with_xgrammar(text: str) -> None:
    """Tokenizer-independent conversion to a grammar: catches what xgrammar rejects (a bad
    `$ref`, contradictory bounds) at request time, as a 400, not in the engine."""
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(text, any_whitespace=False)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SchemaError(f"the schema cannot be compiled: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
