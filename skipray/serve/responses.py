"""OpenAI-shaped responses and stream chunks of the skipray server (plain dicts; no Ray, no torch).

Contract: every object of one request carries the same ``Meta`` (``id``, ``created``, ``model``,
``system_fingerprint``: the model name and the skipray version), streamed chunks included.
``completion_response`` / ``completion_chunk`` follow OpenAI's ``text_completion`` object,
``chat_response`` / ``chat_chunk`` its ``chat.completion`` / ``chat.completion.chunk`` objects;
``usage_chunk`` is the last chunk of a stream that asked for ``stream_options.include_usage``
(``choices: []``). ``usage`` carries the extension ``avg_layers`` (mean decoder layers computed per
generated token). Log-probs come in as ``TokenLogprob`` s (one per generated token) and go out in
the chat shape (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``, ``bytes`` each token's
own bytes, also for a token that holds part of a UTF-8 character) or the legacy completions shape
(``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


@dataclass
class TokenLogprob:
    """One generated token: its text, bytes and log-prob, and the ``top`` most likely tokens with theirs
    (text, bytes, log-prob)."""

    token: str
    logprob: float
    top: list[tuple[str, float, bytes]]
    token_bytes: bytes = b""


@dataclass(frozen=True)
class Meta:
    """What every object of one request's reply shares."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    @classmethod
    def new(cls, prefix: str, model: str, fingerprint: str) -> Meta:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model, fingerprint)


def usage(prompt_tokens: int, layers: list[int]) -> dict:
    n = len(layers)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n,
        "total_tokens": prompt_tokens + n,
        "avg_layers": round(sum(layers) / max(n, 1), 3),
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token_bytes),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in e.top],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """``text_offset`` counts characters from ``offset`` (where the first of ``entries`` starts)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries],
        "text_offset": offsets,
    }


def _envelope(meta: Meta, obj: str, choices: list) -> dict:
    return {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.system_fingerprint,
        "choices": choices,
    }


def prompt_logprobs(entries: list, ids: list[int], names: dict[int, str]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs`` of a choice: ``None`` for the first prompt token, then per token a dict
    from token id (a string, as JSON keys are) to ``{"logprob", "rank", "decoded_token"}`` holding the prompt's
    own token and the top ones. ``entries``: the engine's ``TopLogprobs`` per prompt token (first None);
    ``names``: token id -> its text."""
    out: list[dict | None] = []
    for tok, e in zip(ids, entries):
        if e is None:
            out.append(None)
            continue
        d = {
            str(t): {"logprob": lp, "rank": r + 1, "decoded_token": names[t]}
            for r, (t, lp) in enumerate(zip(e.top_ids, e.top_logprobs))
        }
        d[str(tok)] = {"logprob": e.logprob, "rank": e.rank, "decoded_token": names[tok]}
        out.append(d)
    return out


def echo_logprobs(entries: list, ids: list[int], names: dict[int, str], completion: dict) -> dict:
    """Completions' ``echo`` with ``logprobs``: the prompt's tokens (first without a log-prob) before the
    completion's own ``completion_logprobs``, offsets counted from the start of the echoed text."""
    offsets, at = [], 0
    for t in ids:
        offsets.append(at)
        at += len(names[t])
    return {
        "tokens": [names[t] for t in ids] + completion["tokens"],
        "token_logprobs": [None if e is None else e.logprob for e in entries] + completion["token_logprobs"],
        "top_logprobs": [
            None if e is None else {names[t]: lp for t, lp in zip(e.top_ids, e.top_logprobs)} for e in entries
        ]
        + completion["top_logprobs"],
        "text_offset": offsets + completion["text_offset"],
    }


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_response(meta: Meta, choices: list[dict], use: dict) -> dict:
    """``choices``: ``completion_choice`` s, one per ``n``."""
    out = _envelope(meta, "text_completion", choices)
    out["usage"] = use
    return out


def completion_chunk(
    meta: Meta, text: str, finish: str | None, logprobs: dict | None = None, with_usage: bool = False, index: int = 0
) -> dict:
    out = _envelope(meta, "text_completion", [completion_choice(index, text, finish, logprobs)])
    if with_usage:
        out["usage"] = None
    return out


def chat_choice(index: int, message: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    """One choice of a chat reply; ``message``: the assistant message (``content``, and ``tool_calls``)."""
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_response(meta: Meta, choices: list[dict], use: dict) -> dict:
    """``choices``: ``chat_choice`` s, one per ``n``."""
    out = _envelope(meta, "chat.completion", choices)
    out["usage"] = use
    return out


def chat_chunk(
    meta: Meta, delta: dict, finish: str | None, logprobs: dict | None = None, with_usage: bool = False, index: int = 0
) -> dict:
    out = _envelope(
        meta, "chat.completion.chunk", [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    )
    if with_usage:
        out["usage"] = None
    return out


def tool_delta(message: dict) -> dict:
    """The one delta that streams a whole assistant message: its text, or its ``tool_calls`` with their
    ``index`` (OpenAI's streamed tool-call shape)."""
    if not message.get("tool_calls"):
        return {"content": message.get("content") or ""}
    delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
    if message.get("content"):
        delta["content"] = message["content"]
    return delta


def usage_chunk(meta: Meta, chat: bool, use: dict) -> dict:
    out = _envelope(meta, "chat.completion.chunk" if chat else "text_completion", [])
    out["usage"] = use
    return out
