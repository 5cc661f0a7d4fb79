"""How the server turns a request body into engine work: parse, bound, tokenize, compile structured output,
and build the ``SamplingParams`` and skip schedule (no Ray; torch only through the engine's types).

Contract: ``RequestPreparation`` is the part of ``skipray.serve.server.OpenAIServer`` that prepares a
request; it reads the server's ``tokenizer``, ``engine``, ``limits``, ``context``, ``schedule``,
``trained``, ``num_layers``, ``model_name``, ``max_tokens_limit``, ``default_max_tokens`` and
``scheduling_policy``. ``_parse(body, chat)`` (run in a worker thread) -> ``(request, prompt ids, the
compiled structured-output factory or None, the ``ToolPlan`` or None)``; ``_prepare(request, ids,
grammar)`` -> ``(SamplingParams, schedule, top log-probs per token or None)``. Every client mistake is
a ``protocol.RequestError`` naming its field: an unknown model is a 404, a prompt plus ``max_tokens``
past the context (the engine's, ``skipray.core.config.check_length``) a 400 with code
``context_length_exceeded``, a structured output that does not compile (or takes longer than
``limits.max_grammar_seconds`` to) a 400 naming the field that asked for it.
"""

from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin TimeoutError before Python 3.11
from typing import Any

from skipray.core.config import check_length
from skipray.serve import protocol as P
from skipray.serve import tools as T
from skipray.serve.guard import check_sizes


class RequestPreparation:
    """Request preparation of ``OpenAIServer`` (see the module contract). The server's ``__init__`` sets
    ``_constraints`` / ``_compile_pool`` to None and ``_constraints_lock`` to a lock: the structured-output
    side is built on first use."""

    def _parse(self, body: Any, chat: bool):
        from skipray.text import encode_messages, encode_prompt

        if not isinstance(body, dict):
            raise P.RequestError("request body must be a JSON object", code="invalid_json")
        check_sizes(body, chat, self.limits, self.context)
        P.check_unsupported(body, chat)
        req = (P.ChatRequest if chat else P.CompletionRequest).model_validate(body)
        tools = None
        if chat:
            msgs = req.prompt_messages()
            tools = T.tool_plan(req.tools, req.tool_choice, T.renders_tools(self.tokenizer), req.parallel_tool_calls)
            kwargs = {**req.chat_template_kwargs, **({"tools": tools.template_tools} if tools else {})}
            ids = self._encode(
                lambda: encode_messages(
                    self.tokenizer, msgs, req.add_generation_prompt, req.continue_final_message, template_kwargs=kwargs
                ),
                "messages",
            )
        elif isinstance(req.prompt, str):
            ids = self._encode(lambda: encode_prompt(self.tokenizer, req.prompt), "prompt")
        else:
            ids = list(req.prompt)  # token ids; the engine checks their range
        if req.truncate_prompt_tokens is not None:
            keep = self.context if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
            if keep < 1:
                raise P.RequestError("truncate_prompt_tokens must be -1 or at least 1", "truncate_prompt_tokens")
            ids = ids[-keep:]
        if not ids:
            raise P.RequestError("the prompt encodes to no tokens", "messages" if chat else "prompt")
        asked = req.structured_spec()
        if tools is not None and tools.spec is not None:
            if asked is not None:
                raise P.RequestError(f"tool_choice {tools.mode!r} cannot be combined with {asked[0]}", asked[0])
            asked = ("tool_choice", tools.spec)
        return req, ids, self._structured(asked), tools

    def _structured(self, asked):
        """The structured-output factory for ``(field, spec)`` (compiled here, in the worker thread), or None."""
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
        from skipray.core.schedule import resolve_schedule

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
        try:
            check_length(len(ids), max_tokens, self.context, field)
        except ValueError as e:
            raise P.RequestError(str(e), field, "context_length_exceeded") from None
        schedule = self.schedule
        if req.skip is not None:
            flags = req.skip.model_dump(exclude_none=True)
            try:
                schedule = resolve_schedule(flags, self.num_layers, self.trained).schedule
            except ValueError as e:
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
            prompt_logprobs=req.prompt_logprobs if req.prompt_logprobs is not None else self._echo_top(req),
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

    @staticmethod
    def _echo_top(req) -> int | None:
        """The prompt's top log-probs a completions ``echo`` with ``logprobs`` shows (None: none)."""
        return req.logprobs if isinstance(req, P.CompletionRequest) and req.echo and req.logprobs is not None else None

    def _echo(self, req, chat: bool, ids: list[int]) -> str:
        """The text ``echo`` puts before the answer: the prompt (completions; as tokenized, when it was
        truncated or given as ids), or the last message's text when it is the assistant's (chat, vLLM's)."""
        if not req.echo:
            return ""
        if chat:
            last = P.render_messages(req.messages[-1:])[0]
            return last["content"] if last["role"] == "assistant" else ""
        whole = isinstance(req.prompt, str) and req.truncate_prompt_tokens is None
        return req.prompt if whole else self.tokenizer.decode(ids)
