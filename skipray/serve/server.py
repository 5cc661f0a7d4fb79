"""The OpenAI-compatible request handling of one replica, apart from Ray and routing.

Contract: ``OpenAIServer(tokenizer, engine, ...)`` owns an ``EngineLoop`` over the given
``skipray.core.engine.Engine``. ``create(body, chat)`` answers a ``/v1/completions`` or ``/v1/chat/completions``
body (already parsed JSON) with a Starlette response: the whole reply as JSON, or with ``stream:
true`` OpenAI's server-sent events ending with ``data: [DONE]``. ``tokenize`` / ``detokenize`` /
``models`` / ``model`` / ``version`` answer the utility routes as dicts (vLLM's shapes for the first
two), ``health`` as (status, body): 503 with the reason when the replica cannot serve (``EngineLoop.problem``).
Before any work a body is bounded (``guard.check_sizes``: prompt characters, messages, stop strings,
token-id prompts) and parsed and tokenized in a worker thread, so no request stalls the event loop that
serves the others. Errors are OpenAI error JSON (``protocol.error_body``), mapped by ``error_status``:
client mistakes 4xx with their message, a full queue or a draining replica 503, and server faults 500
with a generic message and the request id (the traceback goes to the log); a failure that reaches a
stream after its first byte is sent as one ``data: {"error": ...}`` event before the end. Every object of
one reply shares ``id``, ``created``, ``model`` and ``system_fingerprint``. A non-zero ``priority`` is a
400 unless the server runs with ``scheduling_policy="priority"`` (vLLM's ``--scheduling-policy``).
Streamed deltas and the non-streamed text come from the same ``skipray.text.TextStream``, so they
are equal. Only ``stream_options.include_usage`` puts usage in a stream (one last chunk with
``choices: []``). ``respond(body, chat, offline=True)`` answers the same bodies with the reply as a dict
(or raises), for the deployment's handle methods; its requests are the engine's offline class.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from skipray.serve import protocol as P
from skipray.serve import responses as R
from skipray.serve.engine_loop import EngineFailed, EngineLoop, LoopStopped, RequestFailed
from skipray.serve.guard import ServeLimits, check_sizes
from skipray.serve.prepare import RequestPreparation
from skipray.serve.replies import Reply, collect, names, whole_reply

logger = logging.getLogger("skipray.serve")


def error_status(e: BaseException, request_id: str | None = None) -> tuple[int, dict]:
    """HTTP status and OpenAI error body for an exception raised while answering a request. Client
    mistakes are 4xx with their message; server faults are a 500 with a generic message and the request
    id, their traceback goes to the log only."""
    from skipray.core.requests import QueueFull

    if isinstance(e, P.RequestError):
        return e.status, P.error_body(e.message, e.type, e.param, e.code)
    if isinstance(e, ValidationError):
        errs = e.errors(include_url=False)
        loc = [str(x) for x in (errs[0].get("loc", ()) if errs else ())]
        msg = "; ".join(f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in errs[:5])
        return 400, P.error_body(msg or "invalid request", param=".".join(loc) or None, code="invalid_value")
    if isinstance(e, QueueFull):
        return 503, P.error_body(
            f"server is at capacity ({e}); retry later", "server_overloaded", code="server_overloaded"
        )
    if isinstance(e, LoopStopped):
        return 503, P.error_body(str(e), "server_error", code="engine_stopped")
    if isinstance(e, RequestFailed) and isinstance(e.cause, ValueError):
        return 400, P.error_body(f"invalid request: {e.cause}", code="invalid_value")
    if isinstance(e, ValueError) and not isinstance(e, (RequestFailed, EngineFailed)):
        return 400, P.error_body(str(e), code="invalid_value")  # the engine's own validation of a request
    rid = request_id or R.Meta.new("req", "", "").id
    logger.error("request %s failed", rid, exc_info=e)
    code = {RequestFailed: "generation_failed", EngineFailed: "engine_failed"}.get(type(e), "internal_error")
    return 500, P.error_body(
        f"the server failed to answer this request (request id {rid}); it has been logged", "server_error", code=code
    )


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class OpenAIServer(RequestPreparation):
    def __init__(
        self,
        tokenizer,
        engine,
        schedule,
        trained=None,
        model_name: str = "skipray",
        max_tokens_limit: int = 512,
        default_max_tokens: int = 256,
        metrics=None,
        limits: ServeLimits | None = None,
        scheduling_policy: str = "fcfs",
        max_failed_steps: int = 3,
        health_stall_s: float = 60.0,
    ) -> None:
        from skipray import __version__

        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {scheduling_policy!r}")
        self.tokenizer, self.engine, self.schedule, self.trained = tokenizer, engine, schedule, trained
        self.model_name, self.metrics = model_name, metrics
        self.num_layers = engine.model.num_layers
        self.cost = engine.model.cost_model()  # FLOPs per token, for each request's theoretical speedup
        self.context = engine.context
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, default_max_tokens
        self.limits = limits or ServeLimits()
        self.scheduling_policy = scheduling_policy
        self.max_failed_steps, self.health_stall_s = max_failed_steps, health_stall_s
        self.fingerprint = f"skipray-{__version__}-{model_name}"
        # structured output: the tokenizer's side and a compile pool, built on first use
        self._constraints, self._constraints_lock, self._compile_pool = None, threading.Lock(), None
        self.loop = EngineLoop(engine, metrics)

    # -- utility routes -------------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why this replica cannot serve (``EngineLoop.problem``), or None."""
        return self.loop.problem(self.max_failed_steps, self.health_stall_s)

    def health(self) -> tuple[int, dict]:
        """(200, status) when the replica can serve, else (503, an OpenAI error object with the reason)."""
        why = self.problem()
        if why is not None:
            return 503, P.error_body(f"unhealthy: {why}", "server_error", code="unhealthy")
        return 200, {
            "status": "ok",
            "live": self.engine.num_running,
            "waiting": self.engine.num_waiting,
            "steps": self.engine.steps,
        }

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "skipray",
            "schedule": self.schedule.to_dict(),
            "context_length": self.context,
            "max_model_len": self.context,
        }

    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    def model(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``; 404 error object for another id."""
        self._check_model(model_id)
        return self._model_card()

    def version(self) -> dict:
        from skipray import __version__

        return {"version": __version__}

    def tokenize(self, body: Any) -> dict:
        from skipray.text import encode_messages, encode_prompt

        chat = isinstance(body, dict) and "messages" in body
        check_sizes(body, chat, self.limits, self.context)  # before tokenizing, as for completions
        req = _validate(P.TokenizeChatRequest if chat else P.TokenizeCompletionRequest, body)
        self._check_model(req.model)
        if chat:
            ids = self._encode(
                lambda: encode_messages(
                    self.tokenizer,
                    P.render_messages(req.messages),
                    req.add_generation_prompt,
                    req.continue_final_message,
                    req.add_special_tokens,
                ),
                "messages",
            )
        else:
            ids = self._encode(
                lambda: encode_prompt(self.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens), "prompt"
            )
        out = {"count": len(ids), "max_model_len": self.context, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, body: Any) -> dict:
        req = _validate(P.DetokenizeRequest, body)
        self._check_model(req.model)
        vocab = len(self.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise P.RequestError(f"token ids outside [0, {vocab}): {bad[:5]}", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # -- completions ----------------------------------------------------------------------------------
    async def create(self, body: Any, chat: bool, request_id: str | None = None) -> Response:
        """Answer a completions (``chat=False``) or chat completions request body; the response carries
        ``X-Request-Id``: ``request_id`` (the client's) or the reply's ``id``. ``n`` choices are ``n``
        engine requests over the same prompt (seeded ones with seeds ``seed, seed + 1, ...``)."""
        t0 = time.perf_counter()
        meta = R.Meta.new("chatcmpl" if chat else "cmpl", self.model_name, self.fingerprint)
        headers = {"X-Request-Id": request_id or meta.id}
        try:
            req, ids, grammar, tools = await asyncio.to_thread(self._parse, body, chat)  # never blocks the loop
            params, schedule, top = self._prepare(req, ids, grammar)
            choices = await self._start(req, ids, params, schedule)  # 400/503/500 surface before any byte
        except Exception as e:
            status, err = error_status(e, meta.id)
            return JSONResponse(err, status_code=status, headers=headers)
        ttft = time.perf_counter() - t0
        replies = [Reply(self.tokenizer, ids, req.stop, top, req.include_stop_str_in_output) for _ in choices]
        echo = self._echo(req, chat, ids)
        if req.stream:
            gen = self._stream(meta, req, chat, echo, replies, choices, t0, ttft, tools)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        try:
            out = await asyncio.gather(*(collect(r, first, ev) for r, (first, ev) in zip(replies, choices)))
        except Exception as e:
            status, err = error_status(e, meta.id)
            return JSONResponse(err, status_code=status, headers=headers)
        finally:
            for _, events in choices:
                await events.aclose()
        for r in replies:
            self._record(t0, r, ttft)
        return JSONResponse(whole_reply(self.tokenizer, meta, chat, echo, replies, out, top, tools), headers=headers)

    async def respond(self, body: Any, chat: bool, offline: bool = True) -> dict:
        """The whole (non-streamed) reply to a completions or chat body as OpenAI's JSON object, for the
        deployment's handle methods (the batch job): ``offline`` puts it in the engine's offline class.
        Raises what ``create`` answers with an error status: ``RequestError`` / ``ValidationError`` /
        ``ValueError`` for a bad request, ``RequestFailed`` / ``EngineFailed`` / ``LoopStopped``."""
        t0 = time.perf_counter()
        if isinstance(body, dict) and body.get("stream"):
            raise P.RequestError("stream is not supported here: the handle returns the whole reply", "stream")
        try:
            req, ids, grammar, tools = await asyncio.to_thread(self._parse, body, chat)
        except ValidationError as e:  # not picklable: the caller may be in another process
            _, err = error_status(e)
            raise P.RequestError(err["error"]["message"]) from None
        params, schedule, top = self._prepare(req, ids, grammar)
        choices = await self._start(req, ids, params, schedule, offline)
        replies = [Reply(self.tokenizer, ids, req.stop, top, req.include_stop_str_in_output) for _ in choices]
        try:
            out = await asyncio.gather(*(collect(r, first, ev) for r, (first, ev) in zip(replies, choices)))
        finally:
            for _, events in choices:
                await events.aclose()
        if not offline:  # the request metrics (latency, time to first token) are the online traffic's
            for r in replies:
                self._record(t0, r, time.perf_counter() - t0)
        echo = self._echo(req, chat, ids)
        meta = R.Meta.new("chatcmpl" if chat else "cmpl", self.model_name, self.fingerprint)
        return whole_reply(self.tokenizer, meta, chat, echo, replies, out, top, tools)

    async def _start(self, req, ids, params, schedule, offline: bool = False) -> list[tuple[Any, Any]]:
        """Submit the ``n`` choices; -> ``(first event, event stream)`` per choice. Raises what the first
        event of any raises, after closing every stream (so no row is left behind)."""
        from dataclasses import replace

        streams = []
        for i in range(req.n):
            p = params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)
            streams.append(self.loop.generate(ids, p, schedule, offline=offline, priority=req.priority))
        try:
            firsts = await asyncio.gather(*(anext(ev) for ev in streams))
        except BaseException:  # also cancelled (client gone) while waiting: free the rows
            for ev in streams:
                await ev.aclose()
            raise
        return list(zip(firsts, streams))

    async def _stream(self, meta, req, chat, echo, replies, choices, t0, ttft, tools=None) -> AsyncIterator[str]:
        """SSE chunks of one reply, each choice's chunks under its ``index`` as its events come. With
        ``tools`` the text is held back and a choice's last chunk carries its whole message (its
        ``tool_calls``, or the text when it calls none)."""
        continuous = req.stream_options.continuous_usage_stats
        with_usage = req.stream_options.include_usage or continuous
        offsets, pending = [len(echo)] * len(choices), [[] for _ in choices]

        def usage() -> dict:
            return R.usage(replies[0].prompt_len, [x for r in replies for x in r.layers])

        def sse(chunk: dict) -> str:  # vLLM's continuous_usage_stats: the usage so far in every chunk
            if continuous and chunk["choices"]:
                chunk["usage"] = usage()
            return _sse(chunk)

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, first, events) -> None:
            try:
                await queue.put((i, first))
                while first.finish_reason is None:
                    first = await anext(events)
                    await queue.put((i, first))
            except BaseException as e:  # noqa: BLE001 - handed to the stream, which ends the reply
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, first, ev)) for i, (first, ev) in enumerate(choices)]
        try:
            for i, (first_ev, _) in enumerate(choices):
                plps, reply = first_ev.prompt_logprobs, replies[i]
                known = names(self.tokenizer, reply, plps) if plps is not None else {}
                if chat:
                    first = {"role": "assistant", "content": "" if tools else echo}
                    chunk = R.chat_chunk(meta, first, None, None, with_usage, i)
                elif echo or plps is not None:
                    lp = None
                    if echo and plps is not None and reply.top is not None:
                        empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                        lp = R.echo_logprobs(plps, reply.prompt_ids, known, empty)
                    chunk = R.completion_chunk(meta, echo, None, lp, with_usage, i)
                else:
                    continue
                if plps is not None:  # vLLM's: the prompt's log-probs come with a choice's first chunk
                    chunk["choices"][0]["prompt_logprobs"] = R.prompt_logprobs(plps, reply.prompt_ids, known)
                yield sse(chunk)
            open_choices = len(choices)
            while open_choices:
                i, ev = await queue.get()
                if isinstance(ev, BaseException):
                    raise ev
                reply = replies[i]
                delta, entries = reply.add(ev)
                pending[i] += entries
                finish = ev.finish_reason
                if tools is not None:  # held back: a tool call is whole or nothing
                    delta = ""
                    if finish is not None:
                        msg, finish = tools.message(reply.out, finish)
                        delta = R.tool_delta(msg)
                if delta or finish is not None:
                    if chat:
                        lp = R.chat_logprobs(pending[i]) if reply.top is not None else None
                        d = delta if isinstance(delta, dict) else {"content": delta} if delta else {}
                        chunk = R.chat_chunk(meta, d, finish, lp, with_usage, i)
                    else:
                        lp = R.completion_logprobs(pending[i], offsets[i]) if reply.top is not None else None
                        offsets[i] += sum(len(e.token) for e in pending[i])
                        chunk = R.completion_chunk(meta, delta, finish, lp, with_usage, i)
                    pending[i] = []
                    yield sse(chunk)
                open_choices -= finish is not None
            if with_usage:
                yield _sse(R.usage_chunk(meta, chat, usage()))
            for r in replies:
                self._record(t0, r, ttft)
        except Exception as e:  # the request failed after the stream began: tell the client, then end
            _, err = error_status(e, meta.id)
            yield _sse(err)
        finally:
            for t in tasks:
                t.cancel()
            for _, events in choices:
                await events.aclose()  # client gone mid-stream: abort the requests and free their rows
        yield "data: [DONE]\n\n"

    def _record(self, t0: float, reply: Reply, ttft: float) -> None:
        if self.metrics is None:
            return
        from skipray.core.schedule import flop_speedup

        try:
            speedup = flop_speedup(reply.layers, self.cost, reply.prompt_len, self.num_layers)
            latency = time.perf_counter() - t0
            self.metrics.record_request(latency, reply.prompt_len, len(reply.layers), reply.finish, ttft, speedup)
        except Exception:  # metrics never fail a request
            logger.exception("recording request metrics failed")


def _validate(model: type, body: Any):
    if not isinstance(body, dict):
        raise P.RequestError("request body must be a JSON object", code="invalid_json")
    return model.model_validate(body)
