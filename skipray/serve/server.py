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

import argparse
import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin TimeoutError before Python 3.11
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from skipray.serve import protocol as P
from skipray.serve import responses as R
from skipray.serve.engine_loop import EngineFailed, EngineLoop, LoopStopped, RequestFailed
from skipray.serve.guard import ServeLimits, check_sizes

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


class _Reply:
    """One request's events turned into text deltas, log-prob entries and usage."""

    def __init__(
        self, tokenizer, prompt: list[int], stop: list[str], top: int | None, include_stop: bool = False
    ) -> None:
        from skipray.text import TextStream

        self.tokenizer, self.top = tokenizer, top  # top: top log-probs per token; None: no log-probs
        self.text = TextStream(tokenizer, prompt, stop, include_stop)
        self.prompt_len, self.layers = len(prompt), []
        self.out = ""  # the text handed out so far

    def add(self, ev) -> tuple[str, list[R.TokenLogprob]]:
        from skipray.text import token_bytes, token_strings

        self.layers.append(ev.layers)
        delta = self.text.add(ev.token_id, final=ev.finish_reason is not None)
        self.out += delta
        if self.top is None or ev.logprobs is None:
            return delta, []
        lp = ev.logprobs
        ids = [ev.token_id, *lp.top_ids[: self.top]]
        names, raw = token_strings(self.tokenizer, ids), token_bytes(self.tokenizer, ids)
        top = list(zip(names[1:], lp.top_logprobs[: self.top], raw[1:]))
        return delta, [R.TokenLogprob(names[0], lp.logprob, top, raw[0])]


class OpenAIServer:
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
        self.context = min(engine.max_len, engine.model.max_positions)
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
        ``X-Request-Id``: ``request_id`` (the client's) or the reply's ``id``."""
        t0 = time.perf_counter()
        meta = R.Meta.new("chatcmpl" if chat else "cmpl", self.model_name, self.fingerprint)
        headers = {"X-Request-Id": request_id or meta.id}
        try:
            req, ids, grammar = await asyncio.to_thread(self._parse, body, chat)  # never blocks the loop
            params, schedule, top = self._prepare(req, ids, grammar)
            events = self.loop.generate(ids, params, schedule, priority=req.priority)
            try:
                first = await anext(events)  # surfaces 400/503/500 before any byte is sent
            except BaseException:  # also cancelled (client gone) while waiting: free the row
                await events.aclose()
                raise
        except Exception as e:
            status, err = error_status(e, meta.id)
            return JSONResponse(err, status_code=status, headers=headers)
        ttft = time.perf_counter() - t0
        reply = _Reply(self.tokenizer, ids, req.stop, top, req.include_stop_str_in_output)
        echo = "" if chat or not req.echo else self._prompt_text(req, ids)
        if req.stream:
            gen = self._stream(meta, req, chat, echo, reply, first, events, t0, ttft)
            return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
        entries = []
        try:
            ev = first
            while True:
                _, logprobs = reply.add(ev)
                entries += logprobs
                if ev.finish_reason is not None:
                    break
                ev = await anext(events)
        except Exception as e:
            status, err = error_status(e, meta.id)
            return JSONResponse(err, status_code=status, headers=headers)
        finally:
            await events.aclose()
        self._record(t0, reply, ttft)
        use = R.usage(len(ids), reply.layers)
        if chat:
            lp = R.chat_logprobs(entries) if top is not None else None
            return JSONResponse(R.chat_response(meta, reply.out, ev.finish_reason, use, lp), headers=headers)
        lp = R.completion_logprobs(entries) if top is not None else None
        return JSONResponse(R.completion_response(meta, echo + reply.out, ev.finish_reason, use, lp), headers=headers)

    async def respond(self, body: Any, chat: bool, offline: bool = True) -> dict:
        """The whole (non-streamed) reply to a completions or chat body as OpenAI's JSON object, for the
        deployment's handle methods (the batch job): ``offline`` puts it in the engine's offline class.
        Raises what ``create`` answers with an error status: ``RequestError`` / ``ValidationError`` /
        ``ValueError`` for a bad request, ``RequestFailed`` / ``EngineFailed`` / ``LoopStopped``."""
        t0 = time.perf_counter()
        if isinstance(body, dict) and body.get("stream"):
            raise P.RequestError("stream is not supported here: the handle returns the whole reply", "stream")
        try:
            req, ids, grammar = await asyncio.to_thread(self._parse, body, chat)
        except ValidationError as e:  # not picklable: the caller may be in another process
            _, err = error_status(e)
            raise P.RequestError(err["error"]["message"]) from None
        params, schedule, top = self._prepare(req, ids, grammar)
        reply = _Reply(self.tokenizer, ids, req.stop, top, req.include_stop_str_in_output)
        echo = "" if chat or not req.echo else self._prompt_text(req, ids)
        entries, ttft, ev = [], None, None
        events = self.loop.generate(ids, params, schedule, offline=offline)
        try:
            async for ev in events:
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                _, logprobs = reply.add(ev)
                entries += logprobs
                if ev.finish_reason is not None:
                    break
        finally:
            await events.aclose()
        if not offline:  # the request metrics (latency, time to first token) are the online traffic's
            self._record(t0, reply, ttft or 0.0)
        meta, use = (
            R.Meta.new("chatcmpl" if chat else "cmpl", self.model_name, self.fingerprint),
            R.usage(len(ids), reply.layers),
        )
        if chat:
            lp = R.chat_logprobs(entries) if top is not None else None
            return R.chat_response(meta, reply.out, ev.finish_reason, use, lp)
        lp = R.completion_logprobs(entries) if top is not None else None
        return R.completion_response(meta, echo + reply.out, ev.finish_reason, use, lp)

    async def _stream(self, meta, req, chat, echo, reply, first, events, t0, ttft) -> AsyncIterator[str]:
        continuous = req.stream_options.continuous_usage_stats
        with_usage = req.stream_options.include_usage or continuous
        offset, pending = len(echo), []

        def sse(chunk: dict) -> str:  # vLLM's continuous_usage_stats: the usage so far in every chunk
            if continuous and chunk["choices"]:
                chunk["usage"] = R.usage(reply.prompt_len, reply.layers)
            return _sse(chunk)

        try:
            if chat:
                yield sse(R.chat_chunk(meta, {"role": "assistant", "content": ""}, None, None, with_usage))
            elif echo:
                yield sse(R.completion_chunk(meta, echo, None, None, with_usage))
            ev = first
            while True:
                delta, entries = reply.add(ev)
                pending += entries
                finish = ev.finish_reason
                if delta or finish is not None:
                    if chat:
                        lp = R.chat_logprobs(pending) if reply.top is not None else None
                        chunk = R.chat_chunk(meta, {"content": delta} if delta else {}, finish, lp, with_usage)
                    else:
                        lp = R.completion_logprobs(pending, offset) if reply.top is not None else None
                        offset += sum(len(e.token) for e in pending)
                        chunk = R.completion_chunk(meta, delta, finish, lp, with_usage)
                    pending = []
                    yield sse(chunk)
                if finish is not None:
                    break
                ev = await anext(events)
            if with_usage:
                yield _sse(R.usage_chunk(meta, chat, R.usage(reply.prompt_len, reply.layers)))
            self._record(t0, reply, ttft)
        except Exception as e:  # the request failed after the stream began: tell the client, then end
            _, err = error_status(e, meta.id)
            yield _sse(err)
        finally:
            await events.aclose()  # client gone mid-stream: abort the request and free its row
        yield "data: [DONE]\n\n"

    # -- request preparation ----------------------------------------------------------------------------
    def _parse(self, body: Any, chat: bool):
        from skipray.text import encode_messages, encode_prompt

        if not isinstance(body, dict):
            raise P.RequestError("request body must be a JSON object", code="invalid_json")
        check_sizes(body, chat, self.limits, self.context)
        P.check_unsupported(body, chat)
        req = (P.ChatRequest if chat else P.CompletionRequest).model_validate(body)
        if chat:
            msgs = req.prompt_messages()
            ids = self._encode(
                lambda: encode_messages(
                    self.tokenizer,
                    msgs,
                    req.add_generation_prompt,
                    req.continue_final_message,
                    template_kwargs=req.chat_template_kwargs,
                ),
                "messages",
            )
        elif isinstance(req.prompt, str):
            ids = self._encode(lambda: encode_prompt(self.tokenizer, req.prompt), "prompt")
        else:
            ids = list(req.prompt)  # token ids; the engine checks their range
        if not ids:
            raise P.RequestError("the prompt encodes to no tokens", "messages" if chat else "prompt")
        return req, ids, self._structured(req)

    def _structured(self, req):
        """The structured-output factory a request asks for (compiled here, in the worker thread), or None."""
        asked = req.structured_spec()
        if asked is None:
            return None
        field, spec = asked
        with self._constraints_lock:
            if self._constraints is None:
                from concurrent.futures import ThreadPoolExecutor

                from skipray.structured import Constraints

                self._constraints = Constraints(self.tokenizer, self.engine.model.vocab_size, self.engine.eos_token_ids)
                self._compile_pool = ThreadPoolExecutor(2, thread_name_prefix="skipray-grammar")
        bound = self.limits.max_grammar_seconds
        future = self._compile_pool.submit(self._constraints.for_spec, spec)
        try:  # compiled in a pool of its own, with a time bound: a grammar too costly to check is a 400
            return future.result(timeout=bound)
        except ValueError as e:
            raise P.RequestError(f"{field}: {e}", field, "invalid_structured_output") from None
        except FutureTimeout:
            future.cancel()
            raise P.RequestError(
                f"{field}: checking this structured output took more than {bound} s; simplify it",
                field,
                "structured_output_too_complex",
            ) from None

    def _prepare(self, req, ids: list[int], grammar=None):
        """-> (SamplingParams, schedule, top log-probs per token or None)."""
        from skipray.core.requests import SamplingParams
        from skipray.options import schedule_from_args

        self._check_model(req.model)
        if req.priority != 0 and self.scheduling_policy != "priority":
            raise P.RequestError(
                "priority is honoured only when the server runs with --scheduling-policy priority "
                "(scheduling_policy: priority in the Serve config); omit it or send 0",
                "priority",
            )
        field, max_tokens = req.length_field
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise P.RequestError(f"{field} must be <= {self.max_tokens_limit}", field)
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, self.context - len(ids))
        if max_tokens < 1 or len(ids) + max_tokens > self.context:
            raise P.RequestError(
                f"this model's context is {self.context} tokens; the prompt has {len(ids)} and {field} is {max_tokens}",
                field,
                "context_length_exceeded",
            )
        schedule = self.schedule
        if req.skip is not None:
            flags = req.skip.model_dump(exclude_none=True)
            try:
                schedule = schedule_from_args(argparse.Namespace(**flags), self.num_layers, self.trained)
            except (TypeError, ValueError) as e:
                raise P.RequestError(f"invalid skip schedule: {e}", "skip") from None
        if isinstance(req, P.ChatRequest):
            top = (req.top_logprobs or 0) if req.logprobs else None
        else:
            top = req.logprobs
        from skipray.text import bad_words_ids

        try:
            banned = bad_words_ids(self.tokenizer, req.bad_words)
        except Exception as e:  # noqa: BLE001 - what the tokenizer refuses is the client's
            raise P.RequestError(f"cannot encode bad_words: {e}", "bad_words") from None
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            seed=req.seed,
            stop=list(req.stop),
            logprobs=0 if top is None else max(top, 1),
            ignore_eos=req.ignore_eos,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            min_p=req.min_p,
            min_tokens=min(req.min_tokens, max_tokens),
            stop_token_ids=list(req.stop_token_ids),
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()} or None,
            bad_words_ids=banned,
            structured=grammar,
        )
        return params, schedule, top

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise P.RequestError(
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
                status=404,
                type_="not_found_error",
            )

    @staticmethod
    def _encode(fn, param: str) -> list[int]:
        """Run a tokenizer call; what it raises (bad input, a chat template that refuses the messages) is a 400."""
        try:
            return fn()
        except P.RequestError:
            raise
        except Exception as e:
            raise P.RequestError(f"cannot encode the {param}: {e}", param) from None

    def _prompt_text(self, req, ids: list[int]) -> str:
        return req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(ids)

    def _record(self, t0: float, reply: _Reply, ttft: float) -> None:
        if self.metrics is not None:
            self.metrics.record_request(time.perf_counter() - t0, reply.prompt_len, len(reply.layers), ttft)


def _validate(model: type, body: Any):
    if not isinstance(body, dict):
        raise P.RequestError("request body must be a JSON object", code="invalid_json")
    return model.model_validate(body)
