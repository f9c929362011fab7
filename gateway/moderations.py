"""`POST /v1/moderations`: OpenAI's moderation API over the gateway's own guards and policies.

Request: `{"input": str | [str] | [part], "model"?: str}`. A list of strings is one input per
string (one result each); a list of parts (`{"type": "text", "text"}`,
`{"type": "image_url", "image_url": {"url"}}`) is one multimodal input (one result), as in
OpenAI's API. At most `GATEWAY_MODERATION_MAX_INPUTS` strings or parts (default 32); images go
through the chat intake (same URL rules, sizes, and `GATEWAY_MAX_IMAGES_PER_REQUEST`).
`model`: absent, an OpenAI moderation model name (`omni-moderation-latest`,
`omni-moderation-2024-09-26`, `text-moderation-latest`, `text-moderation-stable`: all mean "the
key's policy"), or a loaded policy's name (only the key's own policy when the key names one).

Every input is judged as a prompt (the policy's input stage); all inputs of a request go through
each guard as one batch. Same keys, rate limits (one request; the inputs' tokens, image tokens
included, for TPM) and `x-policy` header as chat. The result per input: OpenAI's fields (see
`guards.omni_categories` for the mapping), `gateway_categories`, `blocked` (what chat would do
with it) and `content_filter_results` (Azure's shape of the same judgement).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.audit import AuditContext
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    RequestTooLarge,
)
from gateway.guard_services import GuardServices, policy_header
from gateway.image_tokens import ImageTokenCounter
from gateway.images import ImageLoader
from gateway.keys import ApiKey
from gateway.ratelimit import settle_in_background
from gateway.services import ServicesDep
from gateway.settings import Settings
from guards.base import GuardInput
from guards.omni_categories import moderation_result
from guards.pipeline import log_decision
from guards.policy import Policy
from model.engine import ChatTurn, Engine, EngineRequest, ImagePart, SamplingParams, TextPart

log = structlog.get_logger(__name__)

OPENAI_MODERATION_MODELS = frozenset(
    {
        "omni-moderation-latest",
        "omni-moderation-2024-09-26",
        "text-moderation-latest",
        "text-moderation-stable",
    }
)
DEFAULT_MODEL = "omni-moderation-latest"

router = APIRouter()


@dataclass(frozen=True)
class _Part:
    text: str | None = None
    image_url: str | None = None


@dataclass(frozen=True)
class ModerationRequest:
    model: str | None
    inputs: list[list[_Part]]  # one list of parts per input

    @classmethod
    def parse(cls, body: bytes, max_inputs: int) -> ModerationRequest:
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidRequest(
                "We could not parse the JSON body of your request. The body must be valid JSON."
            ) from exc
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise InvalidRequest("'model' must be a non-empty string.", param="model")
        if "input" not in data:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input")
        raw = data["input"]
        if isinstance(raw, str):
            return cls(model, [[_Part(text=raw)]])
        if not isinstance(raw, list):
            raise InvalidRequest(
                "'input' must be a string, a list of strings or a list of parts.", param="input"
            )
        if not raw:
            raise InvalidRequest("'input' must not be an empty list.", param="input")
        if len(raw) > max_inputs:
            raise InvalidRequest(
                f"Too many inputs: {len(raw)} (at most {max_inputs}).",
                param="input",
                code="too_many_inputs",
            )
        if all(isinstance(item, str) for item in raw):
            return cls(model, [[_Part(text=item)] for item in raw])
        if any(isinstance(item, str) for item in raw):
            raise InvalidRequest(
                "'input' mixes strings and parts: send a list of strings or a list of parts.",
                param="input",
            )
        return cls(model, [[_parse_part(item, i) for i, item in enumerate(raw)]])


def _parse_part(item: Any, index: int) -> _Part:
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{where}' must be a string or an object.", param=where)
    kind = item.get("type")
    if kind == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"'{where}.text' must be a string.", param=f"{where}.text")
        return _Part(text=text)
    if kind == "image_url":
        image = item.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str) or not url.strip():
            raise InvalidRequest(
                f"'{where}.image_url.url' must be a non-empty string.",
                param=f"{where}.image_url.url",
            )
        return _Part(image_url=url)
    raise InvalidRequest(
        f"Invalid value for '{where}.type': {kind!r}; expected 'text' or 'image_url'.",
        param=f"{where}.type",
    )


class ModerationService:
    """Built once at start-up: intake, policy, guards and the result shape."""

    def __init__(
        self,
        settings: Settings,
        guards: GuardServices,
        images: ImageLoader,
        engine: Engine | None,
    ) -> None:
        self._settings = settings
        self._guards = guards
        self._images = images
        self._engine = engine
        self._image_counter: ImageTokenCounter | None = None

    def policy_for(self, key: ApiKey, model: str | None) -> Policy:
        if model is None or model in OPENAI_MODERATION_MODELS:
            return self._guards.policy(key.policy)
        if key.policy is not None and model != key.policy:
            raise PermissionDenied(
                f"This key may use only its own policy '{key.policy}', not '{model}'.",
                param="model",
            )
        if model not in self._guards.store:
            raise ModelNotFound(
                f"The moderation model '{model}' does not exist: use "
                f"'{DEFAULT_MODEL}' or the name of a loaded policy.",
                param="model",
            )
        return self._guards.policy(model)

    async def turns(self, request: ModerationRequest) -> list[ChatTurn]:
        urls = [(i, p.image_url) for item in request.inputs for i, p in enumerate(item)]
        urls = [(i, u) for i, u in urls if u is not None]
        cap = self._settings.max_images_per_request
        if len(urls) > cap:
            raise InvalidRequest(
                f"Too many images: {len(urls)} in this request (at most {cap}).",
                param="input",
                code="too_many_images",
            )
        loaded = await asyncio.gather(
            *(self._load(url, index) for index, url in urls)  # type: ignore[arg-type]
        )
        images = iter(loaded)
        out = []
        for item in request.inputs:
            parts = tuple(
                TextPart(p.text) if p.text is not None else ImagePart(next(images)) for p in item
            )
            out.append(ChatTurn("user", parts))
        return out

    async def _load(self, url: str, index: int) -> Any:
        try:
            return await self._images.load(url)
        except InvalidRequest as exc:  # the chat intake names `messages`: name our field
            exc.param = f"input[{index}].image_url"
            raise

    async def count_tokens(self, turns: list[ChatTurn]) -> int:
        """Tokens for TPM: each input as a user turn by the served model's tokenizer, plus its
        image tokens (estimated at ceil(chars / 4) without a local tokenizer)."""
        images = [img for turn in turns for img in turn.images]
        if self._image_counter is None:
            self._image_counter = ImageTokenCounter.from_engine(self._engine)
        image_tokens = self._image_counter.count(images)
        engine = self._engine
        if engine is None or not engine.ready():
            chars = sum(len(p.text) for t in turns for p in t.parts if isinstance(p, TextPart))
            return -(-chars // 4) + image_tokens
        probes = [EngineRequest("moderation", (t,), SamplingParams(max_tokens=1)) for t in turns]

        def count() -> int:
            return sum(engine.count_prompt_tokens(p) for p in probes)

        # As chat does: a cheap count inline, a real tokenizer off the event loop.
        cheap = engine.cheap_token_count
        text = count() if cheap else await asyncio.to_thread(count)
        if engine.info.image_placeholder_usage:  # each image's placeholder -> its tokens
            text -= len(images)
        return text + image_tokens

    async def moderate(
        self, policy: Policy, turns: list[ChatTurn], audit: AuditContext | None = None
    ) -> list[dict[str, Any]]:
        pipeline = self._guards.pipeline(policy)
        items = [GuardInput("input", (turn,)) for turn in turns]
        decisions = await pipeline.run("input", items)  # every guard gets all inputs at once
        results = []
        for turn, item, decision in zip(turns, items, decisions, strict=True):
            log_decision(decision, endpoint="moderations")
            # The same audit trail as chat: what a policy flagged here is a decision too.
            self._guards.audit_decision(decision, policy, audit, item.text_to_check)
            has_text = any(isinstance(p, TextPart) for p in turn.parts)
            results.append(moderation_result(policy, decision, has_text=has_text))
        return results


@router.post("/v1/moderations")
async def create_moderation(request: Request, services: ServicesDep) -> JSONResponse:
    settings = services.settings
    service = services.moderations
    key = await services.auth.authenticate(request.headers.get("authorization"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise RequestTooLarge(f"Request body too large: {declared} bytes.")
    body = await request.body()
    if len(body) > settings.max_body_bytes:
        raise RequestTooLarge("Request body too large.")
    parsed = ModerationRequest.parse(body, settings.moderation_max_inputs)
    policy = service.policy_for(key, parsed.model)
    turns = await service.turns(parsed)
    tokens = await service.count_tokens(turns)
    limiter = services.limiter
    adm = await limiter.admit(key, tokens, 0)
    headers = {**adm.headers(), "x-policy": policy_header(policy)}
    try:
        audit = AuditContext(
            request_id=structlog.contextvars.get_contextvars().get("request_id"),
            key_id=key.id,
            key_name=key.name,
            endpoint="/v1/moderations",
        )
        results = await service.moderate(policy, turns, audit)
    except GatewayError as exc:
        exc.headers = {**headers, **exc.headers}
        raise
    finally:
        settle_in_background(services.background, limiter, adm, tokens)
    body_out = {
        "id": f"modr-{secrets.token_hex(16)}",
        "model": parsed.model or DEFAULT_MODEL,
        "results": results,
    }
    return JSONResponse(body_out, headers=headers)
