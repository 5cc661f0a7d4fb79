"""Sampling: a pure function from logits to a token id, with an explicit random generator.

``temperature < MIN_TEMPERATURE`` (1e-5, as vLLM) is greedy: argmax, no randomness; a temperature
that small cannot be divided by without overflowing the logits. Otherwise logits are divided by the
temperature, filtered by ``top_k`` (0: off) and nucleus ``top_p`` (1.0: off), and one token is drawn
with ``generator``. The same generator state gives the same token. Logits that are not finite (a
model fault) raise ``FloatingPointError`` instead of drawing from a meaningless distribution.
"""

from __future__ import annotations

import torch

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from a ``(vocab,)`` logits vector."""
    if temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError("the logits are not finite; cannot sample from them")
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def validate(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError`` for impossible sampling settings."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
