"""The policy workbench's admin endpoints (admin token), next to `GET /admin/policies`:

- `GET /admin/policies/overview`: every policy with version, file, load time, last reload
  error, the categories it can judge with the guards loaded, and whether the directory is
  writable;
- `GET /admin/policies/{name}/source`: the YAML and its `etag`;
- `POST /admin/policies/validate` `{"yaml", "name"?}`: the errors `gateway policy check` gives,
  with lines (200 with `valid: false`, not an error: the page shows them);
- `PUT /admin/policies/{name}` `{"yaml", "etag"}`: validate, then save atomically if the file
  still has that etag (409 otherwise; 403 for a read-only directory), and reload at once;
- `POST /admin/policies/dry-run` `{"policy"? | "draft"?, "prompt", "image"?, "answer"?}`;
- `POST /admin/policies/evaluate` `{"policy"?, "draft"?, "jsonl"? | "dataset"?}`;
- `GET /admin/policies/datasets`: the labelled sets shipped with the project.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway import dry_run, policy_files
from gateway.admin import require_admin
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.guard_services import GuardServices
from gateway.services import ServicesDep
from gateway.settings import PROJECT_ROOT
from guards.policy import Policy
from guards.policy_store import PolicyNotFound

router = APIRouter(prefix="/admin/policies", tags=["admin"], dependencies=[Depends(require_admin)])

DATASETS_DIR = PROJECT_ROOT / "bench" / "guard_eval"
MAX_EVAL_LINES = 2000

M = TypeVar("M", bound=BaseModel)
Yaml = Annotated[str, Field(max_length=1_000_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ValidateBody(_Body):
    yaml: Yaml
    name: str | None = None


class SaveBody(_Body):
    yaml: Yaml
    etag: str | None


class DryRunBody(_Body):
    policy: str | None = None
    draft: Yaml | None = None
    prompt: Annotated[str, Field(max_length=200_000)]
    image: Annotated[str, Field(max_length=30_000_000)] | None = None
    answer: Annotated[str, Field(max_length=200_000)] | None = None


class EvaluateBody(_Body):
    policy: str | None = None
    draft: Yaml | None = None
    jsonl: Annotated[str, Field(max_length=10_000_000)] | None = None
    dataset: str | None = None


async def _parse(request: Request, model: type[M]) -> M:
    try:
        data = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("The body must be valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param) from None


def _row(guards: GuardServices, name: str) -> dict[str, Any] | None:
    return next((r for r in guards.store.status() if r["name"] == name), None)


def _file_for(guards: GuardServices, name: str) -> Path:
    row = _row(guards, name)
    if row is not None:
        return Path(row["file"])
    return guards.store.directory / f"{name}.yaml"


def _saved(guards: GuardServices, name: str) -> Policy:
    try:
        return guards.store.get(name)
    except PolicyNotFound:
        raise NotFound(f"No policy named '{name}' is loaded.", param="policy") from None


@router.get("/overview")
async def overview(services: ServicesDep) -> JSONResponse:
    guards = services.guards
    available = list(guards.guards)
    rows = []
    for row in guards.store.status():
        judged: list[str] = []
        if row["name"] in guards.store:
            judged = dry_run.judged_categories(guards.store.get(row["name"]), guards.guards)
        rows.append({**row, "judges": judged})
    problem = policy_files.writable_problem(guards.store.directory)
    return JSONResponse(
        {
            "object": "list",
            "data": rows,
            "directory": str(guards.store.directory),
            "writable": problem is None,
            "read_only_reason": problem,
            "guards_loaded": sorted({*available, "blocklist"}),
        }
    )


@router.get("/datasets")
async def datasets() -> JSONResponse:
    names = sorted(p.name for p in DATASETS_DIR.glob("*.jsonl")) if DATASETS_DIR.is_dir() else []
    return JSONResponse({"object": "list", "data": names})


@router.get("/{name}/source")
async def source(name: str, services: ServicesDep) -> JSONResponse:
    guards = services.guards
    if _row(guards, name) is None:
        raise NotFound(f"No policy named '{name}'.", param="name")
    src = await asyncio.to_thread(policy_files.read_source, _file_for(guards, name))
    row = _row(guards, name) or {}
    return JSONResponse(
        {
            "name": name,
            "file": str(src.file),
            "yaml": src.text,
            "etag": src.etag,
            "version": row.get("version"),
            "error": row.get("error"),
            "writable": policy_files.writable_problem(guards.store.directory) is None,
        }
    )


@router.post("/validate")
async def validate(request: Request) -> JSONResponse:
    body = await _parse(request, ValidateBody)
    file_name = f"{body.name or 'draft'}.yaml"
    try:
        policy = policy_files.validate(body.yaml, file_name)
    except InvalidRequest as exc:
        return JSONResponse({"valid": False, "errors": exc.extra["errors"]})
    return JSONResponse(
        {"valid": True, "errors": [], "policy": {"name": policy.name, "version": policy.version}}
    )


@router.put("/{name}")
async def save(name: str, request: Request, services: ServicesDep) -> JSONResponse:
    guards = services.guards
    body = await _parse(request, SaveBody)
    file = _file_for(guards, name)
    policy = policy_files.validate(body.yaml, file.name)
    if policy.name != name:
        raise InvalidRequest(
            f"The YAML says 'name: {policy.name}' but is being saved as policy '{name}'.",
            param="yaml",
            code="invalid_policy",
            extra={"errors": [{"line": 1, "field": "name", "message": "does not match"}]},
        )
    new_etag = await asyncio.to_thread(policy_files.save, file, body.yaml, body.etag)
    # Apply it now rather than at the watcher's next poll: the page shows the version live.
    await asyncio.to_thread(guards.store.load)
    row = _row(guards, name) or {}
    return JSONResponse({"name": name, "etag": new_etag, "version": row.get("version"), **row})


def _draft_policy(text: str) -> Policy:
    return policy_files.validate(text, "draft.yaml")


@router.post("/dry-run")
async def dry_run_endpoint(request: Request, services: ServicesDep) -> JSONResponse:
    guards = services.guards
    body = await _parse(request, DryRunBody)
    if body.draft is None and body.policy is None:
        raise InvalidRequest("Send 'policy' (a saved policy's name) or 'draft' (YAML).")
    draft = _draft_policy(body.draft) if body.draft is not None else None
    saved_name = body.policy or (draft.name if draft is not None else None)
    saved = guards.store.get(saved_name) if saved_name in guards.store else None
    if draft is None and saved is None:
        raise NotFound(f"No policy named '{body.policy}' is loaded.", param="policy")
    image = None
    if body.image:
        try:  # the app's loader: its limits, one client
            image = await services.images.load(body.image)
        except GatewayError as exc:
            exc.param = "image"
            raise
    run = dry_run.dry_run
    if draft is None:
        assert saved is not None
        result = await run(saved, guards.guards, body.prompt, image, body.answer)
        return JSONResponse({"source": "saved", **result})
    result = await run(draft, guards.guards, body.prompt, image, body.answer)
    out: dict[str, Any] = {"source": "draft", **result}
    if saved is not None:
        before = await run(saved, guards.guards, body.prompt, image, body.answer)
        out["saved"] = before
        out["difference"] = dry_run.difference(before, result)
    return JSONResponse(out)


@router.post("/evaluate")
async def evaluate(request: Request, services: ServicesDep) -> JSONResponse:
    guards = services.guards
    body = await _parse(request, EvaluateBody)
    if body.jsonl is not None:
        text = body.jsonl
    elif body.dataset is not None:
        path = (DATASETS_DIR / body.dataset).resolve()
        if not path.is_relative_to(DATASETS_DIR.resolve()) or not path.is_file():
            raise NotFound(f"No shipped data set '{body.dataset}'.", param="dataset")
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    else:
        raise InvalidRequest("Send 'jsonl' (the labelled lines) or 'dataset' (a shipped one).")
    try:
        lines = await asyncio.to_thread(dry_run.parse_jsonl, text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="jsonl") from None
    if not lines or len(lines) > MAX_EVAL_LINES:
        raise InvalidRequest(f"Send 1 to {MAX_EVAL_LINES} labelled lines.", param="jsonl")
    draft = _draft_policy(body.draft) if body.draft is not None else None
    name = body.policy or (draft.name if draft is not None else None)
    saved = (
        _saved(guards, name)
        if name is not None and (draft is None or name in guards.store)
        else None
    )
    images = await dry_run.load_images(lines, services.images, DATASETS_DIR)
    result = await dry_run.evaluate(saved, draft, guards.guards, lines, images)
    return JSONResponse(result)
