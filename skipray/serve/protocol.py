"""OpenAI-style request models for the skipray server (pydantic 2; no Ray, no torch, no HTTP).

Contract:

* ``CompletionRequest`` / ``ChatRequest`` validate a request body; ``TokenizeCompletionRequest`` /
  ``TokenizeChatRequest`` / ``DetokenizeRequest`` are vLLM's ``/tokenize`` and ``/detokenize`` bodies.
* JSON ``null`` means "the default" for every optional field, at any depth, as OpenAI accepts it.
* ``check_unsupported(body, chat)`` raises ``RequestError`` (400, ``param`` = the field) for a field
  this server does not implement when its value would change the answer (``tools: [...]``,
  ``best_of: 2``, ...); the same fields with a value that changes nothing (``best_of: 1``) are
  accepted. Structured output is implemented: ``response_format`` (``text``, ``json_object``,
  ``json_schema``), vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``) and its
  older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``; ``structured_spec()``
  gives the one spec a request asks for (``skipray.structured``), or None. The penalties,
  ``logit_bias``, ``min_p``, ``min_tokens``, ``stop_token_ids``, ``bad_words`` and
  ``include_stop_str_in_output`` are implemented fields. Other
  unknown top-level fields (``user``, ``store``, ``metadata``, ``service_tier``, ...) are ignored:
  they do not change the output. The ``skip`` extension and ``stream_options`` are strict.
* ``ChatRequest.prompt_messages()`` gives the messages for the chat template: content given as
  parts (``[{"type": "text", "text": ...}]``) is joined with newlines, exactly equal to the string
  form; any other part type is a 400 that says the model takes text only; ``developer`` is
  ``system``; tool turns pass through (``render_messages``); the deprecated ``function`` messages are a 400.
* ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` are taken here as sent and validated by
  ``skipray.serve.tools`` (tool calling through structured output).
* ``RequestError`` is a client mistake found past schema validation, with OpenAI's error fields.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

MAX_LOGPROBS = 20  # top log-probs per token (OpenAI's top_logprobs bound; vLLM's default max_logprobs)
MAX_N = 16  # choices per request (each is an engine request: a cache row while it runs)
INT64 = 2**63

_never = lambda v: False  # noqa: E731 - any value but null changes the answer
# Fields this server does not implement, each with the values that change nothing (null always does).
NO_EFFECT_ONLY: dict[str, Any] = {
    "length_penalty": lambda v: v == 1,
    "best_of": lambda v: v == 1,
    "use_beam_search": lambda v: v is False,
    "skip_special_tokens": lambda v: v is True,
    "spaces_between_special_tokens": lambda v: v is True,
    "allowed_token_ids": _never,
    "logits_processors": _never,
    "suffix": lambda v: v == "",
}
CHAT_NO_EFFECT_ONLY: dict[str, Any] = {
    "functions": lambda v: v == [],  # the deprecated form of tools: send tools / tool_choice
    "function_call": lambda v: v in ("none", "auto"),
    "modalities": lambda v: v == ["text"],
    "audio": _never,
    "reasoning_effort": _never,
    "verbosity": _never,
    "web_search_options": _never,
    "chat_template": _never,
    "documents": _never,
}


class RequestError(ValueError):
    """A client mistake found past schema validation: HTTP ``status`` and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = "invalid_value",
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_


def check_unsupported(body: dict, chat: bool) -> None:
    """Raise ``RequestError`` naming the first field whose value needs a feature this server lacks."""
    table = {**NO_EFFECT_ONLY, **CHAT_NO_EFFECT_ONLY} if chat else NO_EFFECT_ONLY
    for name, harmless in table.items():
        v = body.get(name)
        if v is not None and not harmless(v):
            shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
            raise RequestError(
                f"{name}={shown} is not supported by this server (it would change the output and "
                f"skipray does not implement it); omit it or send null",
                name,
                "unsupported_parameter",
            )


class _Body(BaseModel):
    """A request object: unknown keys ignored, ``null`` for an optional field means its default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            required = {n for n, f in cls.model_fields.items() if f.is_required()}
            return {k: v for k, v in data.items() if v is not None or k in required}
        return data


class SkipOptions(_Body):
    """Extension: the skip schedule for this request (unset fields: the server's default schedule)."""

    model_config = ConfigDict(extra="forbid")
    full: StrictBool = False
    max_layers: StrictInt | None = Field(None, ge=1)
    min_layers: StrictInt | None = Field(None, ge=1)
    decay_tokens: StrictInt | None = Field(None, ge=0)
    warmup_layers: StrictInt | None = Field(None, ge=0)
    shape: Literal["linear", "power"] | None = None
    drop_order: list[StrictInt] | None = None  # layers in the order they stop running (default: the server's)


class StreamOptions(_Body):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False  # one last chunk with ``choices: []`` and ``usage``
    include_obfuscation: StrictBool = True  # accepted; changes nothing here (no obfuscation padding is sent)
    continuous_usage_stats: StrictBool = False  # vLLM's: usage (so far) in every chunk


class _Common(_Body):
    model: str
    n: StrictInt = Field(1, ge=1, le=MAX_N)  # choices: n engine requests over the same prompt
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)  # vLLM: keep the prompt's last k tokens
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM: the prompt's, at full depth
    echo: StrictBool = False  # completions: the prompt first; chat: the last message's text if the assistant's
    max_tokens: StrictInt | None = Field(None, gt=0)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)  # OpenAI's current name; wins over max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # < 1e-5: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=-1)  # vLLM extension; 0 or -1: off
    ignore_eos: StrictBool = False  # vLLM extension: generate through EOS up to the token limit (benchmarks)
    priority: StrictInt = Field(0, ge=-INT64, lt=INT64)  # vLLM extension: admission order, lower first
    seed: StrictInt | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] = Field(default_factory=list)
    # vLLM's logits controls (skipray.core.logits), OpenAI's penalties and logit_bias
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: StrictInt = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's) -> bias in [-100, 100]
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    bad_words: list[str] = Field(default_factory=list)
    include_stop_str_in_output: StrictBool = False
    # structured output (skipray.structured): vLLM's names
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    skip: SkipOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b}")
        return v

    def structured_spec(self) -> tuple[str, dict[str, Any]] | None:
        """(the field that asked, the ``skipray.structured`` spec) of the structured output asked for, or None;
        ``RequestError`` when several fields ask at once."""
        asked = []
        fmt = getattr(self, "response_format", None)
        if fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else {"type": "object"}
            asked.append(("response_format", {"json": schema}))
        if self.structured_outputs:
            asked.append(("structured_outputs", dict(self.structured_outputs)))
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                asked.append((f"guided_{kind}", {kind: value}))
        if len(asked) > 1:
            raise RequestError(f"ask for structured output once; got {[a for a, _ in asked]}", asked[1][0])
        return asked[0] if asked else None

    @property
    def length_field(self) -> tuple[str, int | None]:
        """The field that bounds the completion and its value (``max_completion_tokens`` wins)."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # log-probs of the top-N tokens

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted, not rendered (the chat template has no speaker names)
    tool_calls: list[Any] = Field(default_factory=list)
    tool_call_id: str | None = None
    function_call: Any = None


class JsonSchemaFormat(_Body):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema`` (with ``json_schema.schema``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


def one_ending(req):
    """A chat body ends the conversation one way: ``continue_final_message`` turns the default
    ``add_generation_prompt`` off; both true is a ``ValueError``. -> ``req``."""
    if req.continue_final_message and "add_generation_prompt" not in req.model_fields_set:
        req.add_generation_prompt = False
    if req.add_generation_prompt and req.continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    return req


TEMPLATE_RESERVED = frozenset(
    {
        "tokenize",
        "add_generation_prompt",
        "continue_final_message",
        "conversation",
        "messages",
        "chat_template",
        "return_dict",
        "tools",
        "documents",
    }
)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    # vLLM's chat extensions: how the chat template renders the conversation
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # tool calling (``skipray.serve.tools`` validates them)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _template(self) -> ChatRequest:
        one_ending(self)
        reserved = sorted(set(self.chat_template_kwargs) & TEMPLATE_RESERVED)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}")
        return self

    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def prompt_messages(self) -> list[dict[str, str]]:
        """``{"role", "content"}`` dicts for the chat template (see the module contract)."""
        return render_messages(self.messages)


def render_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Text-only messages for the chat template; ``RequestError`` for what the model cannot take. The
    turns of a tool conversation pass as chat templates take them: an assistant's ``tool_calls`` with
    their ``arguments`` parsed from the JSON string, a ``tool`` answer with its ``tool_call_id``."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "function" or m.function_call is not None:
            field = "role" if m.role == "function" else "function_call"
            raise RequestError(
                f"{where}: the deprecated function-calling form is not supported; use tools and tool messages",
                f"{where}.{field}",
                "unsupported_parameter",
            )
        if m.content is None and m.role != "assistant":
            raise RequestError(f"{where}.content is required", f"{where}.content")
        content = m.content or ""
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        f"{where}.content[{j}] has type {kind!r}: this model takes text only "
                        f"(content parts of type 'text')",
                        f"{where}.content[{j}]",
                        "unsupported_content",
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [_template_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls)]
        if m.role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _template_call(call: Any, where: str) -> dict[str, Any]:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise RequestError(f'{where} must be {{"type": "function", "function": {{"name", "arguments"}}}}', where)
    args = f.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise RequestError(f"{where}.function.arguments must be a JSON string", f"{where}.function") from None
    return {"type": "function", "id": call.get("id"), "function": {"name": f["name"], "arguments": args}}


class TokenizeCompletionRequest(_Body):
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        return one_ending(self)


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
