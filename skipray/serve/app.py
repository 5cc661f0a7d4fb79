"""The OpenAI-compatible Ray Serve application: FastAPI routes, the ``SkipServer`` deployment, the builder.

Contract:

* ``build_app(args)`` is the Serve application builder (``import_path: skipray.serve.app:build_app``);
  ``args`` (all optional): ``model`` (a ``skipray.loading.load`` spec, default ``"default"``),
  ``model_name`` (the id served in ``model``; default ``"skipray"``), ``schedule`` (schedule flags as
  in ``skipray.options``: ``full``, ``max_layers``, ...), ``max_batch`` (cache rows), ``max_len``
  (cache slots), ``max_waiting`` (bounded waiting queue in the replica), ``max_prefill_tokens``
  (padded prompt tokens admitted per engine iteration), ``max_tokens_limit``,
  ``default_max_tokens``, ``torch_threads``, ``device``. ``deployment_options`` (Python callers
  only) are passed to ``SkipServer.options``; with ``serve run`` the YAML's ``deployments`` do that.
* Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives OpenAI
  SSE chunks ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.
* Each replica owns one ``ContinuousEngine`` driven by a background thread; requests join the batch
  between decode steps. A cancelled request (client gone) aborts its row. Client mistakes answer
  4xx with ``protocol.error_body``; a full waiting queue answers 503 at once.
* torch/transformers are imported inside the replica only.
"""

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from skipray.serve import protocol as P

api = FastAPI(title="skipray")


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status)


def _from_validation(errors: list[dict]) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors[:5])
    return _error(400, msg or "invalid request", param=".".join(loc) or None, code="invalid_value")


@api.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _from_validation(list(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind)


class _ValidationWrap(Exception):
    def __init__(self, e: ValidationError) -> None:
        super().__init__(str(e))
        self.errors = [dict(x, loc=tuple(x.get("loc", ()))) for x in e.errors(include_url=False)]


class _TextStream:
    """Incremental detokenization: text deltas safe to send (no half characters, no stop-string head)."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop, self.ids, self.sent = tokenizer, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int, final: bool, emit: bool = True) -> str:
        """Append a token; -> the text that may be sent now. ``emit=False`` (a reply sent whole at the
        end) skips decoding until the final token, which keeps a long reply linear, not quadratic."""
        from skipray.text import truncate_at_stop

        self.ids.append(token_id)
        if not (emit or final):
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if final:
            text = truncate_at_stop(text, self.stop)
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self._text = text
        return delta

    def final_text(self) -> str:
        return self._text


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@serve.deployment(max_ongoing_requests=48, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SkipServer:
    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        from skipray.loading import load
        from skipray.options import schedule_from_args
        from skipray.scheduler import ContinuousEngine

        if args.get("torch_threads"):
            torch.set_num_threads(int(args["torch_threads"]))
        self.model_name = args.get("model_name", "skipray")
        m = load(args.get("model", "default"), device=args.get("device"))
        self.tokenizer, self.trained = m.tokenizer, m.schedule
        self.num_layers = m.model.num_layers
        flags = args.get("schedule") or {}
        self.schedule = schedule_from_args(argparse.Namespace(**flags), self.num_layers, m.schedule)
        max_len = min(int(args.get("max_len", 1024)), m.model.max_positions)
        self.context = max_len
        self.max_tokens_limit = int(args.get("max_tokens_limit", min(512, max_len)))
        self.default_max_tokens = int(args.get("default_max_tokens", min(256, self.max_tokens_limit)))
        self.engine = ContinuousEngine(
            m.model, self.schedule, max_batch=int(args.get("max_batch", 16)), max_len=max_len,
            eos_token_ids=m.eos_token_ids, max_waiting=int(args.get("max_waiting", 32)),
            max_prefill_tokens=int(args.get("max_prefill_tokens", 2048)),
        )
        from skipray.metrics import EngineMetrics

        self.metrics = EngineMetrics("serve")
        self._sinks: dict[str, _Sink] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="skipray-engine", daemon=True)
        self._thread.start()

    # -- the engine loop (background thread) --------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                continue
            try:
                events: list[Any] = self.engine.step()
            except Exception as e:  # a bug, not a client mistake: fail every live request, keep serving
                events = [(r.rid, e) for r in self.engine.live]
                self.engine.live.clear()
            toks = [e for e in events if not isinstance(e, tuple) and e.token_id is not None]
            if toks:
                self.metrics.record_layers([e.layers for e in toks], self.num_layers)
                self.metrics.record_occupancy(len({e.request_id for e in toks}), self.engine.max_batch)
            for ev in events:
                rid = ev[0] if isinstance(ev, tuple) else ev.request_id
                sink = self._sinks.get(rid)
                if sink is not None:
                    item = ev[1] if isinstance(ev, tuple) else ev
                    sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("engine loop thread died")

    def __del__(self) -> None:
        self._stop = True

    async def _events(self, prompt: list[int], params, schedule) -> AsyncIterator[Any]:
        """Submit a request and yield its engine events; abort it if the consumer goes away."""
        from skipray.scheduler import QueueFull

        rid = uuid.uuid4().hex
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue())
        self._sinks[rid] = sink
        done = False
        try:
            try:
                self.engine.add_request(prompt, params, schedule, request_id=rid)
            except QueueFull as e:
                raise ClientError(503, f"server is at capacity ({e}); retry later", code="server_overloaded",
                                  type_="server_overloaded") from None
            except ValueError as e:
                raise ClientError(400, str(e), code="invalid_value") from None
            self._wake.set()
            while True:
                ev = await sink.queue.get()
                if isinstance(ev, Exception):
                    done = True
                    raise ev
                yield ev
                if ev.finish_reason is not None:
                    done = True
                    return
        finally:
            self._sinks.pop(rid, None)
            if not done:
                self.engine.abort(rid)
                self._wake.set()

    # -- request preparation ------------------------------------------------------------------------
    def _prepare(self, req: P._Common, prompt_ids: list[int]):
        from skipray.engine import SamplingParams
        from skipray.options import schedule_from_args
        from skipray.text import stop_checker

        if req.model != self.model_name:
            raise ClientError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                              param="model", code="model_not_found")
        if req.max_tokens is not None and req.max_tokens > self.max_tokens_limit:
            raise ClientError(400, f"max_tokens must be <= {self.max_tokens_limit}", "max_tokens", "invalid_value")
        room = self.context - len(prompt_ids)
        max_tokens = req.max_tokens or min(self.default_max_tokens, room)
        if len(prompt_ids) + max_tokens > self.context:
            raise ClientError(400, f"this model's context is {self.context} tokens; the prompt has "
                              f"{len(prompt_ids)} and max_tokens is {max_tokens}", "max_tokens",
                              "context_length_exceeded")
        schedule = self.schedule
        if req.skip is not None:
            flags = req.skip.model_dump(exclude_none=True)
            try:
                schedule = schedule_from_args(argparse.Namespace(**flags), self.num_layers, self.trained)
            except (TypeError, ValueError) as e:
                raise ClientError(400, f"invalid skip schedule: {e}", "skip", "invalid_value") from None
        params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, stop_fn=stop_checker(self.tokenizer, req.stop))
        return params, schedule

    async def _parse(self, request: Request, model: type[P._Common]) -> P._Common:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError(400, "request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ClientError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            raise _ValidationWrap(e) from None

    # -- routes ---------------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "live": len(self.engine.live), "waiting": self.engine.num_waiting,
                "steps": self.engine.steps}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "skipray",
            "schedule": self.schedule.to_dict(), "context_length": self.context,
        }]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        from skipray.text import encode_messages, encode_prompt

        t0 = time.perf_counter()
        try:
            req = await self._parse(request, P.ChatRequest if chat else P.CompletionRequest)
            try:
                if chat:
                    ids = encode_messages(self.tokenizer, [m.model_dump() for m in req.messages])
                else:
                    ids = encode_prompt(self.tokenizer, req.prompt)
            except (TypeError, ValueError) as e:
                raise ClientError(400, str(e), "messages" if chat else "prompt", "invalid_value") from None
            if not ids:
                raise ClientError(400, "the prompt encodes to no tokens", "prompt", "invalid_value")
            params, schedule = self._prepare(req, ids)
        except ClientError as e:
            return _error(e.status, e.message, e.type, e.param, e.code)
        except _ValidationWrap as e:
            return _from_validation(e.errors)
        events = self._events(ids, params, schedule)
        try:
            first = await anext(events)  # surfaces 400/503 before any byte is sent
        except ClientError as e:
            await events.aclose()
            return _error(e.status, e.message, e.type, e.param, e.code)
        except BaseException:  # cancelled (client gone) while waiting: free the row
            await events.aclose()
            raise
        ttft = time.perf_counter() - t0
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        texts = _TextStream(self.tokenizer, req.stop)
        if req.stream:
            return StreamingResponse(self._sse(rid, req, chat, len(ids), first, events, texts, t0, ttft),
                                     media_type="text/event-stream")
        layers, finish = [], None
        ev = first
        try:
            while True:
                layers.append(ev.layers)
                texts.add(ev.token_id, final=ev.finish_reason is not None, emit=False)
                finish = ev.finish_reason
                if finish is not None:
                    break
                ev = await anext(events)
        finally:
            await events.aclose()
        use = P.usage(len(ids), layers)
        self.metrics.record_request(time.perf_counter() - t0, len(ids), len(layers), ttft)
        build = P.chat_response if chat else P.completion_response
        return JSONResponse(build(rid, self.model_name, texts.final_text(), finish, use))

    async def _sse(self, rid, req, chat, prompt_len, first, events, texts, t0, ttft) -> AsyncIterator[str]:
        def pack(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        layers = []
        try:
            if chat:
                yield pack(P.chat_chunk(rid, self.model_name, {"role": "assistant", "content": ""}, None))
            ev = first
            while True:
                layers.append(ev.layers)
                finish = ev.finish_reason
                delta = texts.add(ev.token_id, final=finish is not None)
                use = P.usage(prompt_len, layers) if finish is not None else None
                if delta or finish is not None:
                    if chat:
                        d = {"content": delta} if delta else {}
                        yield pack(P.chat_chunk(rid, self.model_name, d, finish, use))
                    else:
                        yield pack(P.completion_chunk(rid, self.model_name, delta, finish, use))
                if finish is not None:
                    self.metrics.record_request(time.perf_counter() - t0, prompt_len, len(layers), ttft)
                    break
                ev = await anext(events)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # client gone mid-stream: abort the request and free its row


def build_app(args: dict[str, Any] | None = None, deployment_options: dict[str, Any] | None = None) -> Application:
    """The Serve application (``serve run skipray.serve.app:build_app model=...`` or the YAML config)."""
    args = dict(args or {})
    dep = SkipServer.options(**deployment_options) if deployment_options else SkipServer
    return dep.bind(args)
