"""Sampling: from logits to token ids, with an explicit random generator per request.

``temperature < MIN_TEMPERATURE`` (1e-5, as vLLM) is greedy: argmax, no randomness; a temperature
that small cannot be divided by without overflowing the logits. Otherwise logits are divided by the
temperature, filtered by ``min_p`` (0: off), ``top_k`` (0: off) and nucleus ``top_p`` (1.0: off), and one token is drawn
with ``generator``. The same generator state gives the same token. Logits that are not finite (a
model fault) raise ``FloatingPointError`` instead of drawing from a meaningless distribution.

``sample_rows`` is the engine's batched sampler: one token per row of a ``(n, vocab)`` logits tensor,
each row with its own ``SamplingParams`` and generator, after the logits controls of ``skipray.core.logits``
(penalties, bans, biases; rows that ask for none are untouched); greedy rows share one ``argmax``; what fails for
one row (non-finite logits, a bad generator) is that row's exception, never its batch-mates'.
``top_logprobs`` gives the top-N log-softmax entries a request asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skipray.core.logits import min_p_filter, process
from skipray.core.requests import SamplingParams, TopLogprobs

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> int:
    """Pick one token id from a ``(vocab,)`` logits vector (``min_p``: ``skipray.core.logits.min_p_filter``,
    after temperature)."""
    if temperature < MIN_TEMPERATURE:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if min_p > 0:
        logits = min_p_filter(logits, min_p)
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


def top_logprobs(
    logits: torch.Tensor, chosen: Sequence[int], n: Sequence[int], keep_top: int | None = None
) -> list[TopLogprobs | None]:
    """Per row of ``logits`` (B, V): ``TopLogprobs`` with ``n[row]`` entries, or ``None`` where ``n[row] == 0``;
    ``keep_top``: keep that many top entries instead (0: the chosen token's log-prob alone)."""
    if not any(n):
        return [None] * len(chosen)
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, max(n), dim=-1)
    picked = lp[torch.arange(len(chosen)), torch.tensor(chosen)]
    # one read of the device: [picked, top values..., top ids...] per row (ids are exact in float64)
    rows = torch.cat([picked[:, None], vals, ids.to(vals.dtype)], dim=1).double().tolist()
    m = vals.shape[1]
    out = []
    for r, k in zip(rows, n):
        keep = k if keep_top is None else keep_top
        out.append(TopLogprobs(r[0], [int(x) for x in r[1 + m : 1 + m + keep]], r[1 : 1 + keep]) if k else None)
    return out


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    eos_token_ids: Sequence[int] = (),
    constraints: Sequence | None = None,
) -> tuple[list[int | BaseException], list[TopLogprobs | None]]:
    """One token per row of ``logits`` ``(n, vocab)`` with row ``i``'s ``params[i]`` and ``generators[i]``;
    ``prompts`` / ``outputs`` (each row's token ids so far) feed the logits controls of
    ``skipray.core.logits`` (penalties, bans, biases), applied first; ``constraints[i]`` (structured output,
    ``skipray.core.requests.TokenConstraint``) then masks row ``i`` to the tokens its grammar allows.

    -> (token id or the exception that row raised, per row; its ``TopLogprobs`` (of the raw logits) when
    ``params[i].logprobs``, else ``None``). Greedy rows take one batched ``argmax`` (the same ids ``sample``
    gives them)."""
    raw = logits
    if prompts is not None and outputs is not None:
        logits = process(logits, params, prompts, outputs, eos_token_ids)
    masked: dict[int, BaseException] = {}
    if constraints is not None and any(c is not None for c in constraints):
        logits = logits.float().clone() if logits is raw else logits
        for i, c in enumerate(constraints):
            if c is not None:
                try:
                    c.mask_logits(logits[i : i + 1])  # the grammar's allowed tokens (structured output)
                except Exception as e:  # noqa: BLE001 - this row's failure
                    masked[i] = e
    # What the host needs from the device, read in one go (one sync): each row's argmax when a row is greedy,
    # whether the model's logits are finite (a NaN or inf makes the sum NaN or inf: one reduction instead of
    # isfinite's four full passes; finite fp32 logits would need ~1e34 each to overflow), and, when controls
    # or grammars changed the logits, whether a row has any token left.
    checks = [torch.isfinite(raw.sum(-1))]
    if logits is not raw:
        checks.append(torch.isfinite(logits.max(-1).values))
    any_greedy = any(p.temperature < MIN_TEMPERATURE for p in params)
    if any_greedy:
        checks.append(logits.argmax(-1))
    read = torch.stack([c.to(torch.long) for c in checks]).tolist()
    finite = [bool(x) for x in read[0]]
    if logits is not raw:  # a row whose controls ban every token: its own input error, not the engine's
        for i, ok in enumerate(read[1]):
            if not ok and i not in masked:
                masked[i] = ValueError(
                    "every token is banned for this request (bad words, min_tokens or its structured output leave none)"
                )
    picked: list[int | BaseException] = [0] * len(params)
    if any_greedy:
        for i, p in enumerate(params):
            if p.temperature < MIN_TEMPERATURE and finite[i]:
                picked[i] = read[-1][i]
    for i, p in enumerate(params):
        if i in masked:
            picked[i] = masked[i]
        elif not finite[i]:
            picked[i] = FloatingPointError("the model produced non-finite logits for this request")
        elif p.temperature >= MIN_TEMPERATURE:
            try:
                picked[i] = sample(logits[i], p.temperature, p.top_k, p.top_p, generators[i], p.min_p)
            except Exception as e:  # this row's failure, not its batch-mates'
                picked[i] = e
    lps: list[TopLogprobs | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs and isinstance(picked[i], int)]
    if want:
        try:
            got = top_logprobs(raw[want], [picked[i] for i in want], [params[i].logprobs for i in want])
            for i, g in zip(want, got):
                lps[i] = g
        except Exception as e:
            for i in want:
                picked[i] = e
    return picked, lps
