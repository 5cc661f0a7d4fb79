"""Logits processors of the sampler: vLLM's per-request sampling controls over a batch of logits (torch only).

Contract: ``process(logits, params, prompts, outputs, eos_token_ids)`` returns the ``(n, vocab)`` logits
with each row's controls applied, in vLLM's order; rows that ask for none are untouched (the common case
costs one Python check per row). The controls, per row (``SamplingParams`` fields, vLLM's names):

* ``logit_bias`` ``{token id: bias}``: added to the logits (OpenAI's, clipped by the server to [-100, 100]).
* ``bad_words_ids``: token-id sequences that must not be generated: the last token of a sequence is
  banned when the tokens generated so far end with the rest of it (a one-token word is always banned).
* ``min_tokens``: EOS and ``stop_token_ids`` are banned until that many tokens were generated.
* ``repetition_penalty`` (> 0, 1 = off): every token of the prompt or the output has a positive logit
  divided by it and a negative one multiplied (CTRL, Keskar et al. 2019, arXiv 1909.05858, section 4.1;
  as Hugging Face and vLLM apply it).
* ``presence_penalty`` / ``frequency_penalty``: ``logit -= presence * [count > 0] + frequency * count``
  over the tokens of the output (OpenAI's formula, as vLLM).
* ``min_p`` (``min_p_filter``, applied by the sampler after temperature): tokens whose probability is
  below ``min_p`` times the top token's are dropped (Nguyen et al. 2024, arXiv 2407.01082).

Banning sets a logit to ``-inf``; a row whose every token is banned raises in the sampler for that row
alone. Log-probs reported to clients are those of the raw logits, before these controls (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from skipray.core.requests import SamplingParams


def needs_processing(p: SamplingParams) -> bool:
    """Whether a row asks for any control this module applies (``min_p`` is the sampler's)."""
    return bool(
        p.logit_bias
        or p.bad_words_ids
        or p.min_tokens
        or p.repetition_penalty != 1.0
        or p.presence_penalty
        or p.frequency_penalty
    )


def _banned_by_bad_words(bad: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    out = []
    for word in bad:
        head = list(word[:-1])
        if not head or (len(output) >= len(head) and list(output[len(output) - len(head) :]) == head):
            out.append(word[-1])
    return out


def process(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int] = (),
    to_device: Callable[[Sequence, torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``logits`` ``(n, vocab)`` with each row's controls applied (module contract); the same tensor when no row
    asks for any. Batched: the host lists every (row, token) pair each control touches, ``to_device`` (default
    ``torch.as_tensor`` on the logits' device; the engine's pinned staging) copies the lists once per control, and
    each control is one indexed op over all rows. Raises nothing for valid ``SamplingParams``."""
    rows = [i for i, p in enumerate(params) if needs_processing(p)]
    if not rows:
        return logits
    dev, n, vocab = logits.device, logits.shape[0], logits.shape[-1]
    if to_device is None:

        def to_device(values: Sequence, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype, device=dev)

    out = logits.float().clone()
    bias: list[list] = [[], [], []]  # rows, tokens, values
    banned: list[list] = [[], []]
    seen: list[list] = [[], [], []]  # rows, tokens, penalty
    counted: list[list] = [[], []]  # rows, tokens of the outputs (with repeats)
    presence, frequency = [0.0] * n, [0.0] * n
    for i in rows:
        p, output = params[i], outputs[i]
        for t, v in (p.logit_bias or {}).items():
            bias[0].append(i), bias[1].append(int(t)), bias[2].append(float(v))
        ban = _banned_by_bad_words(p.bad_words_ids, output) if p.bad_words_ids else []
        if p.min_tokens and len(output) < p.min_tokens:
            ban += [*eos_token_ids, *p.stop_token_ids]
        ban = sorted({t for t in ban if 0 <= t < vocab})
        banned[0] += [i] * len(ban)
        banned[1] += ban
        if p.repetition_penalty != 1.0:
            toks = sorted(set(prompts[i]) | set(output))
            seen[0] += [i] * len(toks)
            seen[1] += toks
            seen[2] += [p.repetition_penalty] * len(toks)
        if (p.presence_penalty or p.frequency_penalty) and output:
            counted[0] += [i] * len(output)
            counted[1] += list(output)
            presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
    if bias[0]:
        out.index_put_(
            (to_device(bias[0], torch.long), to_device(bias[1], torch.long)),
            to_device(bias[2], torch.float32),
            accumulate=True,
        )
    if banned[0]:
        out.index_put_(
            (to_device(banned[0], torch.long), to_device(banned[1], torch.long)),
            torch.full((), float("-inf"), device=dev),
        )
    if seen[0]:
        at = (to_device(seen[0], torch.long), to_device(seen[1], torch.long))
        vals, pen = out[at], to_device(seen[2], torch.float32)
        out[at] = torch.where(vals > 0, vals / pen, vals * pen)
    if counted[0]:
        at = (to_device(counted[0], torch.long), to_device(counted[1], torch.long))
        # index_put_ with accumulate, not bincount: a fixed output shape (bincount's depends on the data: a sync)
        counts = torch.zeros_like(out).index_put_(at, torch.ones((), device=dev), accumulate=True)
        out -= (
            to_device(presence, torch.float32)[:, None] * (counts > 0)
            + to_device(frequency, torch.float32)[:, None] * counts
        )
    return out


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Temperature-scaled ``(..., vocab)`` logits with the tokens below ``min_p`` (a float, or per row ``(n, 1)``)
    x the top probability at ``-inf`` (Nguyen et al. 2024, arXiv 2407.01082)."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
