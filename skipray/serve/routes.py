"""The HTTP routes of the skipray server: ``build_api(server, api_keys)`` -> a FastAPI app over an ``OpenAIServer``.

Contract (no Ray; the Serve deployment in ``skipray.serve.app`` builds this app in each replica, and
it runs under any ASGI server as well):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI), ``GET /v1/models``,
  ``GET /v1/models/{id}``, ``GET /health`` (200, or 503 with the reason); vLLM's utility routes
  ``POST /tokenize`` (``{"prompt"}`` or ``{"messages"}`` -> ``{"count", "max_model_len", "tokens"[,
  "token_strs"]}``), ``POST /detokenize`` (``{"tokens"}`` -> ``{"prompt"}``) and ``GET /version``
  (``{"version"}``); ``GET /openapi.json`` describes them with their request models.
* With API keys (``skipray.serve.guard.ApiKeys``), ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
  ``Authorization: Bearer <key>``: a 401 error object (``invalid_api_key``) otherwise.
* Bodies are read up to the server's ``max_body_bytes`` (413 beyond) and parsed in a worker thread with
  a nesting bound (``guard.parse_json``); no route parses or tokenizes on the event loop.
* Every error is OpenAI's error JSON: a body that is not JSON 400 (``invalid_json``), an unknown
  route 404, a client mistake 4xx, anything unexpected a generic 500 with the request id (logged).
* Completions responses carry ``X-Request-Id``: the client's, or the reply's ``id``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path

from skipray.serve import protocol as P
from skipray.serve.guard import PROTECTED, ApiKeys, parse_json, read_body
from skipray.serve.server import OpenAIServer, error_status


def _error(e: BaseException) -> JSONResponse:
    status, body = error_status(e)
    return JSONResponse(body, status_code=status)


REF = "#/components/schemas/{model}"
BODIES = {
    "/v1/completions": [P.CompletionRequest],
    "/v1/chat/completions": [P.ChatRequest],
    "/tokenize": [P.TokenizeCompletionRequest, P.TokenizeChatRequest],
    "/detokenize": [P.DetokenizeRequest],
}


def _openapi(api: FastAPI) -> dict:
    """The app's OpenAPI description with each POST route's request body from its request models (the
    routes read their bodies themselves, so FastAPI cannot see them)."""
    from fastapi.openapi.utils import get_openapi

    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, routes=api.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, models in BODIES.items():
            refs = []
            for m in models:
                js = m.model_json_schema(ref_template=REF)
                schemas.update(js.pop("$defs", {}))
                schemas[m.__name__] = js
                refs.append({"$ref": REF.format(model=m.__name__)})
            schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        api.openapi_schema = doc
    return api.openapi_schema


def build_api(server: OpenAIServer, api_keys: ApiKeys | None = None) -> FastAPI:
    """The FastAPI app of one replica."""
    api = FastAPI(title="skipray", version=server.version()["version"])
    keys = api_keys or ApiKeys([])

    async def body_of(request: Request) -> Any:
        raw = await read_body(request, server.limits)
        return await asyncio.to_thread(parse_json, raw, server.limits)

    @api.middleware("http")
    async def _auth(request: Request, call_next):
        if (
            keys.enabled
            and get_route_path(request.scope).startswith(PROTECTED)  # the path below a mount prefix
            and not keys.allows(request.headers.get("authorization"))
        ):
            return JSONResponse(
                P.error_body("invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key"),
                status_code=401,
            )
        return await call_next(request)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(exc.detail), kind), status_code=exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(P.error_body(str(exc.errors()[:3]), code="invalid_value"), status_code=400)

    for kind in (P.RequestError, ValidationError, Exception):
        api.add_exception_handler(kind, lambda request, exc: _error(exc))

    @api.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @api.get("/version")
    async def version() -> dict:
        return server.version()

    @api.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return server.model(model_id)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await server.create(await body_of(request), chat=False, request_id=request.headers.get("x-request-id"))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.create(await body_of(request), chat=True, request_id=request.headers.get("x-request-id"))

    @api.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        return await asyncio.to_thread(server.tokenize, await body_of(request))

    @api.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        return await asyncio.to_thread(server.detokenize, await body_of(request))

    api.openapi = lambda: _openapi(api)
    return api
