"""Structured output: JSON schemas, regexes, choices and grammars as per-request token constraints (llguidance).

Contract (the tokenizer's side of structured output; the engine only sees ``TokenConstraint`` s):

* ``grammar_for(spec)`` turns one request's spec into an llguidance grammar (a string), raising
  ``ValueError`` naming what is wrong: ``{"json": schema}`` (a JSON schema, a dict or its JSON text;
  ``{"type": "object"}`` for OpenAI's ``json_object``), ``{"regex": pattern}``, ``{"choice": [str, ...]}``
  (exactly one of the strings), ``{"grammar": lark}`` (a Lark grammar, llguidance's dialect). vLLM's
  names. JSON is generated without free whitespace, so a small model cannot wander in spaces.
* ``Constraints(tokenizer, vocab_size, eos_token_ids)`` holds the tokenizer's llguidance view (built once,
  ~1 s) and a cache of checked grammars; ``factory(grammar)`` checks a grammar against the tokenizer once
  (``ValueError`` with llguidance's message when it is invalid) and returns a factory of fresh
  ``GrammarConstraint`` s, one per request (``SamplingParams.structured``).
* ``GrammarConstraint`` fills its row of the sampler's token bitmask with the tokens the grammar allows next
  (``fill_bitmask``; the sampler copies the batch's bitmask to the device once and masks the rest),
  consumes the sampled token (``accept``; False for a token the grammar does not allow) and says when the
  grammar is complete (``finished``: the request then ends with "stop").

Why llguidance: it compiles JSON schemas, regexes and Lark grammars lazily (no per-schema precompute, so a
new schema costs microseconds to start), computes a token mask in tens of microseconds on the CPU for
vocabularies of 100k+ tokens, ships as one abi3 wheel with no GPU dependency, and is what vLLM and SGLang
use as a structured-output backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

KINDS = ("json", "regex", "choice", "grammar")
MAX_CACHED = 1024  # checked grammars kept per tokenizer


def grammar_for(spec: dict[str, Any]) -> str:
    """The llguidance grammar of one structured-output spec (module contract); ``ValueError`` otherwise."""
    import llguidance

    given = [k for k in KINDS if spec.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {list(KINDS)}, got {given or 'none'}")
    kind, value = given[0], spec[given[0]]
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            json.loads(text)
        except (TypeError, ValueError) as e:
            raise ValueError(f"json: the schema is not valid JSON ({e})") from None
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError("regex: a pattern string is required")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError("choice: a non-empty list of strings is required")
        lark = "start: " + " | ".join(json.dumps(c) for c in value)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    if not isinstance(value, str):
        raise ValueError("grammar: a Lark grammar string is required")
    return llguidance.LLMatcher.grammar_from_lark(value)


class GrammarConstraint:
    """One request's grammar state (module contract)."""

    def __init__(self, matcher) -> None:
        import llguidance.torch as lt

        self.matcher = matcher
        self._lt = lt

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Row ``index`` of ``bitmask`` (int32 ``(n, ceil(vocab / 32))``, on the CPU): bit ``b`` of word ``w`` set
        where token ``32 w + b`` is allowed next, clear elsewhere."""
        self._lt.fill_next_token_bitmask(self.matcher, bitmask, index)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.consume_token(int(token_id)))

    def finished(self) -> bool:
        return bool(self.matcher.is_stopped())


class Constraints:
    """A tokenizer's structured-output side (module contract)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int] = ()) -> None:
        import llguidance.hf

        eos = list(eos_token_ids) or [tokenizer.eos_token_id]
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self._checked: dict[str, str] = {}  # grammar -> its error ("" when valid), at most MAX_CACHED

    def checked(self, grammar: str) -> str:
        """``grammar`` after llguidance checked it against this tokenizer (``ValueError`` with its message)."""
        import llguidance

        err = self._checked.get(grammar)
        if err is None:
            err = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
            if len(self._checked) >= MAX_CACHED:
                self._checked.pop(next(iter(self._checked)))
            self._checked[grammar] = err
        if err:
            raise ValueError(f"invalid structured output: {err}")
        return grammar

    def factory(self, grammar: str) -> Callable[[], GrammarConstraint]:
        """A factory of fresh constraints for ``grammar`` (one per request): the grammar is compiled here
        once (the caller bounds its time), and each request gets a cheap copy of that matcher."""
        import llguidance

        template = llguidance.LLMatcher(self.lltok, self.checked(grammar))
        if template.is_error():
            raise ValueError(f"invalid structured output: {template.get_error()}")
        return lambda: GrammarConstraint(template.deep_copy())

    def for_spec(self, spec: dict[str, Any]) -> Callable[[], GrammarConstraint]:
        return self.factory(grammar_for(spec))
