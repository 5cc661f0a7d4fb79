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
* ``min_p`` (applied by ``skipray.core.sampling.sample``, after temperature): tokens whose probability is
  below ``min_p`` times the top token's are dropped (Nguyen et al. 2024, arXiv 2407.01082).

Banning sets a logit to ``-inf``; a row whose every token is banned raises in the sampler for that row
alone. Log-probs reported to clients are those of the raw logits, before these controls (vLLM's default).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def process_row(
    row: torch.Tensor, p: SamplingParams, prompt: Sequence[int], output: Sequence[int], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """One row's ``(vocab,)`` logits (float32) with ``p``'s controls applied (module contract)."""
    row = row.clone()
    vocab, dev = row.shape[-1], row.device  # index tensors on the row's device (a CUDA row wants CUDA indices)
    if p.logit_bias:
        ids = torch.tensor([int(t) for t in p.logit_bias], dtype=torch.long, device=dev)
        bias = torch.tensor([float(v) for v in p.logit_bias.values()], dtype=row.dtype, device=dev)
        row.index_add_(0, ids, bias)
    banned = _banned_by_bad_words(p.bad_words_ids, output) if p.bad_words_ids else []
    if p.min_tokens and len(output) < p.min_tokens:
        banned += [*eos_token_ids, *p.stop_token_ids]
    banned = [t for t in banned if 0 <= t < vocab]
    if banned:
        row[torch.tensor(banned, dtype=torch.long, device=dev)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=dev)
        if len(seen):
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        out_ids = torch.tensor(list(output), dtype=torch.long, device=dev)
        # scatter_add, not bincount: a fixed output shape (bincount's depends on the data: a sync on CUDA)
        counts = torch.zeros(vocab, dtype=row.dtype, device=dev).scatter_add_(
            0, out_ids, torch.ones(len(output), dtype=row.dtype, device=dev)
        )
        row -= p.presence_penalty * (counts > 0).to(row.dtype) + p.frequency_penalty * counts
    return row


def process(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int] = (),
) -> torch.Tensor:
    """``logits`` ``(n, vocab)`` with each row's controls applied (module contract); the same tensor when
    no row asks for any."""
    rows = [i for i, p in enumerate(params) if needs_processing(p)]
    if not rows:
        return logits
    out = logits.float().clone()
    for i in rows:
        out[i] = process_row(out[i], params[i], prompts[i], outputs[i], eos_token_ids)
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Temperature-scaled ``(vocab,)`` logits with the tokens below ``min_p`` x the top probability at ``-inf``."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
