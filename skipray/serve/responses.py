"""OpenAI-shaped responses and stream chunks of the skipray server (plain dicts; no Ray, no torch).

Contract: ``completion_response`` / ``completion_chunk`` follow OpenAI's ``text_completion`` object,
``chat_response`` / ``chat_chunk`` its ``chat.completion`` / ``chat.completion.chunk`` objects;
``usage_chunk`` is the last chunk of a stream that asked for ``stream_options.include_usage``
(``choices: []``). ``usage`` carries the extension ``avg_layers`` (mean decoder layers computed per
generated token). Log-probs come in as ``TokenLogprob`` s (one per generated token) and go out in
the chat shape (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``) or the legacy
completions shape (``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """One generated token: its text, its log-prob and the ``top`` most likely tokens with theirs."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, layers: list[int]) -> dict:
    n = len(layers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n,
            "avg_layers": round(sum(layers) / max(n, 1), 3)}


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _utf8(e.token),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _utf8(t)} for t, lp in e.top]}
        for e in entries
    ], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """``text_offset`` counts characters from ``offset`` (where the first of ``entries`` starts)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _envelope(rid: str, obj: str, model: str, choices: list) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}


def completion_response(rid: str, model: str, text: str, finish: str | None, use: dict,
                        logprobs: dict | None = None) -> dict:
    out = _envelope(rid, "text_completion", model,
                    [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}])
    out["usage"] = use
    return out


def completion_chunk(rid: str, model: str, text: str, finish: str | None, logprobs: dict | None = None,
                     with_usage: bool = False) -> dict:
    out = _envelope(rid, "text_completion", model,
                    [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}])
    if with_usage:
        out["usage"] = None
    return out


def chat_response(rid: str, model: str, text: str, finish: str | None, use: dict,
                  logprobs: dict | None = None) -> dict:
    out = _envelope(rid, "chat.completion", model, [{
        "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
        "finish_reason": finish}])
    out["usage"] = use
    return out


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, logprobs: dict | None = None,
               with_usage: bool = False) -> dict:
    out = _envelope(rid, "chat.completion.chunk", model,
                    [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, model: str, chat: bool, use: dict) -> dict:
    out = _envelope(rid, "chat.completion.chunk" if chat else "text_completion", model, [])
    out["usage"] = use
    return out
