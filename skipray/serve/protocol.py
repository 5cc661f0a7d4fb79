"""OpenAI-style request and response models for the skipray server (pydantic 2, no Ray, no torch).

Contract: ``CompletionRequest`` / ``ChatRequest`` validate a request body (unknown top-level fields are
ignored, as OpenAI clients send extras; the ``skip`` extension is strict). Responses and stream
chunks follow OpenAI's ``text_completion`` / ``chat.completion`` / ``chat.completion.chunk`` shapes;
``usage`` carries the extension ``avg_layers`` (mean decoder layers computed per generated token).
``error_body`` is the OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator


class SkipOptions(BaseModel):
    """Extension: the skip schedule for this request (unset fields: the server's default schedule)."""

    model_config = ConfigDict(extra="forbid")
    full: StrictBool = False
    max_layers: StrictInt | None = Field(None, ge=1)
    min_layers: StrictInt | None = Field(None, ge=1)
    decay_tokens: StrictInt | None = Field(None, ge=0)
    warmup_layers: StrictInt | None = Field(None, ge=0)
    shape: Literal["linear", "power"] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: StrictInt | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: StrictBool = False
    n: StrictInt = Field(1, ge=1, le=1)
    skip: SkipOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    avg_layers: float  # extension: mean decoder layers computed per generated token


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, layers: list[int]) -> Usage:
    n = len(layers)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n,
                 avg_layers=round(sum(layers) / max(n, 1), 3))


def completion_response(rid: str, model: str, text: str, finish: str | None, use: Usage) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": use.model_dump(),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, use: Usage | None = None) -> dict:
    out = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use.model_dump()
    return out


def chat_response(rid: str, model: str, text: str, finish: str | None, use: Usage) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": use.model_dump(),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use: Usage | None = None) -> dict:
    out = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use.model_dump()
    return out


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
