"""The OpenAPI document's description of the routes that FastAPI does not build itself.

`POST /v1/chat/completions` is a raw ASGI endpoint (`gateway.public_api.ChatCompletions`) that
parses its body with `ChatCompletionRequest.model_validate_json`, outside FastAPI's routing, so
FastAPI cannot describe it. This module adds it to the document from the same pydantic model
that parses the requests, once, when the document is first built (`GET /openapi.json`): the
request path is untouched. It also states what every `/v1` route really answers: bearer
authentication and errors in the OpenAI envelope (400, never FastAPI's 422).
"""

from __future__ import annotations

from typing import Any

from gateway.protocol import ChatCompletionRequest

REF = "#/components/schemas/{model}"
BEARER = "bearerAuth"

ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "description": "The OpenAI error envelope.",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "additionalProperties": True,
        }
    },
}

CHAT_COMPLETION_SCHEMA: dict[str, Any] = {
    "title": "ChatCompletion",
    "description": "A chat completion (docs/api.md and the public contract give every field).",
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "prompt_filter_results": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
        "system_fingerprint": {"type": "string"},
    },
}

# Status codes a /v1 route answers with besides 200, and when.
ERRORS = {
    "400": "Invalid request, or a prompt blocked by the input policy.",
    "401": "Missing, unknown, disabled or expired API key.",
    "403": "The key may not use this model.",
    "404": "No such model.",
    "413": "Request body or image too large.",
    "429": "Rate limit (requests, tokens or concurrency); see Retry-After.",
    "503": "Engine or Redis unavailable.",
}


def _error(description: str) -> dict[str, Any]:
    ref = {"$ref": REF.format(model="ErrorResponse")}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _model_schemas(schemas: dict[str, Any]) -> dict[str, Any]:
    """ChatCompletionRequest's JSON schema, its sub-models moved into `schemas`; returns a
    reference to it."""
    schema = ChatCompletionRequest.model_json_schema(ref_template=REF, mode="validation")
    schemas.update(schema.pop("$defs", {}))
    schemas["ChatCompletionRequest"] = schema
    return {"$ref": REF.format(model="ChatCompletionRequest")}


def chat_completions_operation(schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "Create a chat completion",
        "description": "OpenAI's Chat Completions API, with text and images; `stream: true` "
        "answers with server-sent events (`chat.completion.chunk` objects, then `[DONE]`). "
        "Unknown fields are ignored; known OpenAI parameters that are not supported get 400.",
        "operationId": "createChatCompletion",
        "tags": ["chat"],
        "security": [{BEARER: []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _model_schemas(schemas)}},
        },
        "responses": {
            "200": {
                "description": "The completion, or its stream.",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(model="ChatCompletion")}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **{status: _error(why) for status, why in ERRORS.items()},
        },
    }


def describe_raw_routes(document: dict[str, Any], chat_path: str) -> dict[str, Any]:
    """Add the raw routes, the bearer scheme and the envelope errors to FastAPI's document."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA
    schemas["ChatCompletion"] = CHAT_COMPLETION_SCHEMA
    components.setdefault("securitySchemes", {})[BEARER] = {"type": "http", "scheme": "bearer"}
    paths = document.setdefault("paths", {})
    paths.setdefault(chat_path, {})["post"] = chat_completions_operation(schemas)
    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        for operation in operations.values():
            operation.setdefault("security", [{BEARER: []}])
            responses = operation.setdefault("responses", {})
            # Validation errors are 400 in the envelope here, never FastAPI's 422.
            if responses.pop("422", None) is not None:
                responses.setdefault("400", _error(ERRORS["400"]))
            responses.setdefault("401", _error(ERRORS["401"]))
            if "{" in path:
                responses.setdefault("404", _error(ERRORS["404"]))
            responses.setdefault("503", _error(ERRORS["503"]))
    if not any(s.startswith("HTTPValidationError") for s in _referenced(paths)):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return document


def _referenced(node: Any) -> set[str]:
    """The component names that `node` refers to."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for value in node.values():
            found |= _referenced(value)
    elif isinstance(node, list):
        for value in node:
            found |= _referenced(value)
    return found
