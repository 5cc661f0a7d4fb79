"""What the server checks before it does any work for a request: API keys and size limits (no Ray, no torch).

Contract:

* ``ServeLimits`` holds the limits (each a Serve config key; defaults below). ``read_body`` reads a
  request body in chunks and stops at ``max_body_bytes`` (413, ``request_too_large``) before reading
  the rest; ``parse_json`` parses it and refuses nesting deeper than ``max_json_depth`` (400,
  ``json_too_deep``; the parser's own recursion limit is caught too, never a 500); ``check_sizes``
  bounds the prompt's characters (before tokenizing), the number of messages, each stop string and the
  length of a token-id prompt. Every refusal is ``protocol.RequestError`` with OpenAI's fields.
  Structured-output specs fall under the body and depth bounds, and checking one against the tokenizer
  is bounded by ``max_grammar_seconds`` (the server's, in a pool of its own: a 400 beyond it).
* ``ApiKeys`` checks ``Authorization: Bearer <key>`` against the configured keys in constant time
  (``hmac.compare_digest`` against every key, no early exit); keys are never logged or echoed.
  ``api_keys_from(args)`` gathers them from the Serve args (``api_keys``: a list) and the
  ``SKIPRAY_API_KEY`` environment variable (one key, or several separated by commas), as vLLM's
  ``--api-key`` and ``VLLM_API_KEY`` do. With no key the server is open.
* ``PROTECTED`` lists the path prefixes that need a key: ``/v1/``, ``/tokenize``, ``/detokenize``;
  ``/health``, ``/version`` and ``/openapi.json`` stay open.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from skipray.serve.protocol import RequestError

PROTECTED = ("/v1/", "/tokenize", "/detokenize")
API_KEY_ENV = "SKIPRAY_API_KEY"


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits, checked before any work (module contract)."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 64
    max_prompt_chars_per_token: int = 32  # prompt characters allowed per token of context, before tokenizing
    max_messages: int = 512
    max_stop_chars: int = 256
    max_grammar_seconds: int = 5  # checking a request's structured output (JSON schema, regex, grammar)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeLimits:
        """The limits given in the Serve args (``limits: {max_body_bytes: ..., ...}``), defaults otherwise."""
        given = dict(args.get("limits") or {})
        unknown = sorted(set(given) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown limits {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        bad = [k for k, v in given.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"limits {bad} must be positive integers")
        return cls(**given)


async def read_body(request, limits: ServeLimits) -> bytes:
    """The body of a Starlette ``request``, read in chunks; 413 as soon as it passes ``max_body_bytes``."""
    too_big = RequestError(
        f"the request body is larger than {limits.max_body_bytes} bytes", None, "request_too_large", status=413
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (stops counting past ``limit``)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def parse_json(raw: bytes, limits: ServeLimits) -> Any:
    """Parse a request body; ``RequestError`` for invalid JSON or nesting deeper than ``max_json_depth``."""
    too_deep = RequestError(
        f"the JSON body is nested more than {limits.max_json_depth} levels deep", None, "json_too_deep"
    )
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("request body is not valid JSON", code="invalid_json") from None
    if _depth(body, limits.max_json_depth) > limits.max_json_depth:
        raise too_deep
    return body


def _chars(value: Any) -> int:
    """Characters of text in a prompt or message content (strings, lists of strings or of text parts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return _chars(value.get("text")) + _chars(value.get("content"))
    return 0


def check_sizes(body: Any, chat: bool, limits: ServeLimits, context: int) -> None:
    """Bound what tokenizing would cost before it runs (module contract); ``context``: tokens."""
    if not isinstance(body, dict):
        return
    max_chars = limits.max_prompt_chars_per_token * context
    if chat:
        msgs = body.get("messages")
        if isinstance(msgs, list) and len(msgs) > limits.max_messages:
            raise RequestError(f"at most {limits.max_messages} messages per request", "messages")
        if _chars(msgs) > max_chars:
            raise RequestError(
                f"the messages hold more than {max_chars} characters, more than this model's "
                f"context of {context} tokens can take",
                "messages",
                "context_length_exceeded",
            )
    else:
        prompt = body.get("prompt")
        ids = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list) else prompt
        if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids) and len(ids) > context:
            raise RequestError(
                f"the prompt has {len(ids)} token ids; this model's context is {context} tokens",
                "prompt",
                "context_length_exceeded",
            )
        if _chars(prompt) > max_chars:
            raise RequestError(
                f"the prompt has more than {max_chars} characters, more than this model's context "
                f"of {context} tokens can take",
                "prompt",
                "context_length_exceeded",
            )
    stop = body.get("stop")
    for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise RequestError(f"stop strings may have at most {limits.max_stop_chars} characters", "stop")


def api_keys_from(args: dict[str, Any]) -> list[str]:
    """The API keys of the Serve ``args`` and of ``SKIPRAY_API_KEY`` (module contract)."""
    keys = [str(k) for k in (args.get("api_keys") or [])]
    keys += [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",")]
    return sorted({k for k in keys if k})


class ApiKeys:
    """The keys a request may present; empty: no check (module contract)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the keys (constant time over all keys)."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(given, k)
        return ok

    def __repr__(self) -> str:  # never the keys themselves
        return f"ApiKeys({len(self._keys)} keys)"
