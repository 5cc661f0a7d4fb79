"""Request types of the engine: what a caller asks for and what it gets back (no torch, no Ray).

Contract:

* ``SamplingParams`` names its fields as vLLM and Ray Data LLM do (``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``logprobs``). ``stop`` holds stop
  *strings*: the engine speaks token ids, so it checks them through the detokenizer hook it was built
  with (``Engine(detokenize=...)``, the tokenizer stays at the edges); ``stop_fn`` is the lower-level
  hook (any predicate over the generated ids). ``SamplingParams.validate`` (and ``validate_request``,
  against a model's vocabulary and context, ``skipray.core.config.check_length``) raise ``ValueError``
  for settings no engine can serve.
* ``finish_reason`` decides when a request ends: ``"stop"`` (a stop token, EOS, a stop string or
  ``stop_fn``), ``"length"`` (``max_tokens`` reached); the engine adds ``"abort"`` and ``"error"``.
* ``Event`` is what ``Engine.step`` returns per request and token, and what ``Engine.stream`` yields (with
  ``index``, the prompt's place in the call); ``Completion`` is what ``Engine.generate`` returns per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from skipray.core.config import check_length

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
STOP_WINDOW_SPARE = 8  # tokens decoded beyond the longest stop string (tokens are >= 1 char; merges)


class TokenConstraint(Protocol):
    """What the engine asks of a per-request constraint (``skipray.structured.GrammarConstraint``)."""

    def fill_bitmask(self, bitmask: Any, index: int) -> None: ...  # row `index` of an int32 (n, ceil(vocab/32))
    # bitmask: bit b of word w set where token 32w + b is allowed next (llguidance's and xgrammar's layout)
    def accept(self, token_id: int) -> bool: ...  # False: the token breaks the constraint
    def finished(self) -> bool: ...  # complete: the request ends with "stop"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should shed load (HTTP 429/503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 64  # tokens to generate at most
    temperature: float = 0.0  # below skipray.core.sampling.MIN_TEMPERATURE: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # a seeded request samples the same tokens wherever it runs
    stop: Sequence[str] = ()  # stop strings (checked through the engine's detokenizer hook)
    stop_token_ids: Sequence[int] = ()
    stop_fn: Callable[[list[int]], bool] | None = None  # any predicate over the generated ids
    logprobs: int = 0  # return the top-N log-probs of each step's logits (0: none; vLLM's `logprobs`)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-prob at full depth and the top N's
    ignore_eos: bool = False  # vLLM's: EOS does not end the request (stop tokens and strings still do)
    # vLLM's logits controls (skipray.core.logits): off at their defaults
    repetition_penalty: float = 1.0  # > 0; tokens of the prompt or output: logit / p if > 0 else logit * p
    presence_penalty: float = 0.0  # [-2, 2]: logit -= presence * [count > 0] over the output
    frequency_penalty: float = 0.0  # [-2, 2]: logit -= frequency * count over the output
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p x the top token's probability (after temperature)
    min_tokens: int = 0  # EOS, stop tokens and stop strings do not end the request before this many tokens
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit, [-100, 100]
    bad_words_ids: Sequence[Sequence[int]] = ()  # token-id sequences never generated
    # structured output: a factory of one fresh TokenConstraint per request (skipray.structured builds them
    # from JSON schemas, regexes, choices and grammars at the tokenizer's side)
    structured: Callable[[], TokenConstraint] | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible settings."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a list of strings, not one string")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if any(not -100.0 <= float(v) <= 100.0 for v in (self.logit_bias or {}).values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if any(not w for w in self.bad_words_ids):
            raise ValueError("bad_words_ids must not hold an empty sequence")


@dataclass
class TopLogprobs:
    """Log-softmax of the logits a step really produced (before temperature/top-p, as vLLM returns them):
    the sampled token's log-prob and the ``n`` most likely token ids with theirs, best first."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    rank: int | None = None  # the token's rank among all (1: the most likely), where computed (prompt log-probs)


@dataclass
class Event:
    """One step's output for one request (``Engine.step``)."""

    request_id: str
    token_id: int | None  # None only for an abort or an error
    layers: int  # layers computed to produce this token
    finish_reason: str | None  # "stop", "length", "abort" or "error" on the request's last event
    logprobs: TopLogprobs | None = None  # when the request asked for log-probs
    error: BaseException | None = None  # why the request failed (finish_reason "error")
    # on a request's first event when it asked for prompt_logprobs: None for the first prompt token (nothing
    # predicts it), then each prompt token's log-prob and the top prompt_logprobs (full depth)
    prompt_logprobs: list[TopLogprobs | None] | None = None
    index: int | None = None  # the prompt's index in an ``Engine.generate`` / ``Engine.stream`` call


@dataclass
class Completion:
    """One prompt's result of ``Engine.generate``."""

    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TopLogprobs] = field(default_factory=list)  # one per token when params.logprobs > 0
    error: BaseException | None = None  # why it failed (finish_reason "error", ``raise_errors=False``)

    @property
    def avg_layers(self) -> float:
        return sum(self.layers_per_token) / max(len(self.layers_per_token), 1)


def finish_reason(
    generated: list[int],
    p: SamplingParams,
    eos_token_ids: Sequence[int],
    detokenize: Callable[[list[int]], str] | None = None,
) -> str | None:
    """``"stop"`` for a stop token, EOS (unless ``ignore_eos``), a stop string in the decoded tail or
    ``stop_fn``; ``"length"`` once
    ``max_tokens`` tokens exist; else ``None``. Raises whatever ``detokenize`` or ``stop_fn`` raise, and
    ``ValueError`` for stop strings without ``detokenize``."""
    if len(generated) < p.min_tokens:  # nothing but the length ends a request before min_tokens
        return "length" if len(generated) >= p.max_tokens else None
    if generated[-1] in p.stop_token_ids or (generated[-1] in eos_token_ids and not p.ignore_eos):
        return "stop"
    stops = [s for s in p.stop if s]
    if stops:
        if detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenizer (Engine(detokenize=...))")
        tail = detokenize(generated[-(max(map(len, stops)) + STOP_WINDOW_SPARE) :])
        if any(s in tail for s in stops):
            return "stop"
    if p.stop_fn is not None and p.stop_fn(generated):
        return "stop"
    if len(generated) >= p.max_tokens:
        return "length"
    return None


def validate_request(prompt: Sequence[int], p: SamplingParams, vocab_size: int, context: int) -> None:
    """Raise ``ValueError`` for a request no engine of this model can serve (``context``: tokens)."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt):
        raise ValueError(f"prompt has token ids outside [0, {vocab_size})")
    ids = [*(p.logit_bias or {}), *p.stop_token_ids, *(t for w in p.bad_words_ids for t in w)]
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"logit_bias, stop_token_ids and bad words take token ids in [0, {vocab_size})")
    p.validate()
    check_length(len(prompt), p.max_tokens, context)
