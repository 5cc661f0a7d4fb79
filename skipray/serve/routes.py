"""The HTTP routes of the skipray server: ``build_api(server)`` -> a FastAPI app over an ``OpenAIServer``.

Contract (no Ray; the Serve deployment in ``skipray.serve.app`` builds this app in each replica, and
it runs under any ASGI server as well):

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI), ``GET /v1/models``,
  ``GET /health``; vLLM's utility routes ``POST /tokenize`` (``{"prompt"}`` or ``{"messages"}`` ->
  ``{"count", "max_model_len", "tokens"[, "token_strs"]}``), ``POST /detokenize`` (``{"tokens"}`` ->
  ``{"prompt"}``) and ``GET /version`` (``{"version"}``).
* Every error is OpenAI's error JSON: a body that is not JSON 400 (``invalid_json``), an unknown
  route 404, a client mistake 4xx, anything unexpected 500 (and logged).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from skipray.serve import protocol as P
from skipray.serve.server import OpenAIServer, error_status


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise P.RequestError("request body is not valid JSON", code="invalid_json") from None


def _error(e: BaseException) -> JSONResponse:
    status, body = error_status(e)
    return JSONResponse(body, status_code=status)


def build_api(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of one replica."""
    api = FastAPI(title="skipray")

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
    async def health() -> dict:
        return server.health()

    @api.get("/version")
    async def version() -> dict:
        return server.version()

    @api.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await server.create(await _body(request), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.create(await _body(request), chat=True)

    @api.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        return server.tokenize(await _body(request))

    @api.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        return server.detokenize(await _body(request))

    return api
