"""Sampling: from logits to token ids on the logits' device, with an explicit random generator per request.

``temperature < MIN_TEMPERATURE`` (1e-5, as vLLM) is greedy: argmax, no randomness; a temperature
that small cannot be divided by without overflowing the logits. Otherwise logits are divided by the
temperature, filtered by ``min_p`` (0: off), ``top_k`` (0: off) and nucleus ``top_p`` (1.0: off), and one token is
drawn by the exponential race: ``argmax(probs / q)``, ``q ~ Exp(1)`` i.i.d. per token, which picks token ``i`` with
probability ``probs[i]`` (the Gumbel-max trick in another form; vLLM's sampler draws the same way). A request's ``q``
comes from its own ``generator`` (on the logits' device) and depends on nothing else, so the same generator state
gives the same token alone or in any batch; rows without one share the global generator. Logits that are not finite
(a model fault) make that row's ``FloatingPointError`` instead of a draw from a meaningless distribution.

``sample_rows`` is the engine's batched sampler: one token per row of a ``(n, vocab)`` logits tensor, each row with
its own ``SamplingParams`` and generator, after the logits controls of ``skipray.core.logits`` (penalties, bans,
biases) and the rows' grammars (structured output, their bitmasks filled on the host and copied once). Everything
runs batched on the device, and the host reads the result once: the tokens, the rows' finiteness checks and the
log-probs asked for, in one copy (one host sync per step). What fails for one row (non-finite logits, a bad
generator, a grammar that allows nothing) is that row's exception, never its batch-mates'.
``top_logprobs`` gives the top-N log-softmax entries a request asked for; ``sample`` is one row alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from skipray.core.logits import min_p_filter, process
from skipray.core.requests import SamplingParams, TopLogprobs

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (vLLM's _SAMPLING_EPS)

# host values (a sequence or a CPU tensor) -> a tensor of that dtype on the logits' device
ToDevice = Callable[[Sequence | torch.Tensor, torch.dtype], torch.Tensor]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_p: float = 0.0,
) -> int:
    """One token id from a ``(vocab,)`` logits vector (module contract; the draw ``sample_rows`` makes for the row).
    Raises ``FloatingPointError`` for logits that are not finite."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    picked, _ = sample_rows(logits[None], [params], [generator])
    if isinstance(picked[0], BaseException):
        raise picked[0]
    return picked[0]


def filter_logits(x: torch.Tensor, params: Sequence[SamplingParams], to_device: ToDevice) -> torch.Tensor:
    """Temperature-scaled ``(n, vocab)`` float32 logits with each row's ``min_p``, ``top_k`` and ``top_p`` applied
    (in that order; the top token always stays); branches on the host's values only (no read of the device).
    ``top_p``: Holtzman et al. 2020 (nucleus, arXiv 1904.09751)."""
    vocab = x.shape[-1]
    if any(p.min_p > 0 for p in params):
        x = min_p_filter(x, to_device([p.min_p for p in params], torch.float32)[:, None])
    want_k = any(0 < p.top_k < vocab for p in params)
    want_p = any(p.top_p < 1.0 for p in params)
    if not (want_k or want_p):
        return x
    s, order = torch.sort(x, dim=-1, descending=True)
    if want_k:
        k = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
        s = s.masked_fill(torch.arange(vocab, device=x.device)[None] >= k[:, None], float("-inf"))
    if want_p:
        probs = torch.softmax(s, dim=-1)
        top_p = to_device([p.top_p for p in params], torch.float32)[:, None]
        s = s.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))  # the mass before it reaches top_p
    return torch.empty_like(x).scatter_(1, order, s)


def _draw(
    x: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence, to_device: ToDevice
) -> tuple[torch.Tensor, torch.Tensor, dict[int, BaseException]]:
    """-> (drawn token per row ``(m,)``, whether each row's distribution is finite ``(m,)``, a failing
    generator's exception per row) for the sampled rows' logits ``x`` ``(m, vocab)``."""
    temperature = to_device([p.temperature for p in params], torch.float32)
    probs = torch.softmax(filter_logits(x.float() / temperature[:, None], params, to_device), dim=-1)
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()
    errors: dict[int, BaseException] = {}
    for j, g in enumerate(generators):
        if g is not None:
            try:
                q[j].exponential_(generator=g)
            except Exception as e:  # noqa: BLE001 - this row's generator, not its batch-mates'
                errors[j] = e
    return probs.div(q).argmax(-1), torch.isfinite(probs.sum(-1)), errors


def _logprob_table(logits: torch.Tensor, chosen: torch.Tensor, m: int) -> torch.Tensor:
    """``(w, 1 + 2m)`` float64 per row: the chosen token's log-prob, the top ``m`` log-probs, their ids (exact)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, m, dim=-1)
    return torch.cat([lp.gather(1, chosen[:, None]), vals, ids.to(vals.dtype)], dim=1).double()


def _unpack_logprobs(rows: list[list[float]], n: Sequence[int], keep_top: int | None) -> list[TopLogprobs | None]:
    m = (len(rows[0]) - 1) // 2 if rows else 0
    out = []
    for r, k in zip(rows, n):
        keep = k if keep_top is None else keep_top
        out.append(TopLogprobs(r[0], [int(x) for x in r[1 + m : 1 + m + keep]], r[1 : 1 + keep]) if k else None)
    return out


def top_logprobs(
    logits: torch.Tensor, chosen: Sequence[int], n: Sequence[int], keep_top: int | None = None
) -> list[TopLogprobs | None]:
    """Per row of ``logits`` (B, V): ``TopLogprobs`` with ``n[row]`` entries, or ``None`` where ``n[row] == 0``;
    ``keep_top``: keep that many top entries instead (0: the chosen token's log-prob alone). One read of the device."""
    if not any(n):
        return [None] * len(chosen)
    table = _logprob_table(logits, torch.as_tensor(list(chosen), device=logits.device), max(n))
    return _unpack_logprobs(table.tolist(), n, keep_top)


def _mask_grammars(logits: torch.Tensor, constraints: Sequence, to_device: ToDevice) -> dict[int, BaseException]:
    """Rows with a constraint keep only the tokens their grammar allows next (one bitmask for all of them, filled
    on the host and copied to the device once); -> the exception of each row whose constraint failed."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    words = (logits.shape[-1] + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)  # all allowed until a grammar says otherwise
    failed: dict[int, BaseException] = {}
    for j, i in enumerate(rows):
        try:
            constraints[i].fill_bitmask(bitmask, j)
        except Exception as e:  # noqa: BLE001 - this row's failure
            failed[i] = e
    bits = to_device(bitmask, torch.int32)
    allowed = (bits[:, :, None] >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
    index = to_device(rows, torch.long)
    sub = logits.index_select(0, index).masked_fill(allowed.view(len(rows), -1)[:, : logits.shape[-1]] == 0, -torch.inf)
    logits.index_copy_(0, index, sub)
    return failed


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    eos_token_ids: Sequence[int] = (),
    constraints: Sequence | None = None,
    to_device: ToDevice | None = None,
) -> tuple[list[int | BaseException], list[TopLogprobs | None]]:
    """One token per row of ``logits`` ``(n, vocab)`` with row ``i``'s ``params[i]`` and ``generators[i]``
    (a ``torch.Generator`` on the logits' device, or ``None``: the global one); ``prompts`` / ``outputs`` (each
    row's token ids so far) feed the logits controls of ``skipray.core.logits``, applied first; ``constraints[i]``
    (structured output, ``skipray.core.requests.TokenConstraint``) then masks row ``i`` to the tokens its grammar
    allows. ``to_device(values, dtype)`` makes the small per-row tensors (default: ``torch.tensor`` on the logits'
    device; the engine passes its pinned staging buffers, so the copies do not sync).

    -> (token id or the exception that row raised, per row; its ``TopLogprobs`` (of the raw logits) when
    ``params[i].logprobs``, else ``None``). Reads the device once (module contract)."""
    n, dev = len(params), logits.device
    if to_device is None:

        def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype, device=dev)

    raw = logits
    if prompts is not None and outputs is not None:
        logits = process(logits, params, prompts, outputs, eos_token_ids, to_device)
    masked: dict[int, BaseException] = {}
    if constraints is not None and any(c is not None for c in constraints):
        logits = logits.float().clone() if logits is raw else logits
        masked = _mask_grammars(logits, constraints, to_device)
    # What the host needs, read in one go (one sync): whether the model's logits are finite (a NaN or inf makes
    # the sum NaN or inf: one reduction instead of isfinite's four full passes), whether controls or grammars left
    # a row any token, whether a sampled row's distribution is finite, each row's token, and the log-probs asked for.
    checks = [torch.isfinite(raw.sum(-1))]
    if logits is not raw:
        checks.append(torch.isfinite(logits.max(-1).values))
    tokens = logits.argmax(-1)  # the greedy rows' tokens (and a placeholder for the sampled rows')
    sampled = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    gen_errors: dict[int, BaseException] = {}
    if sampled:
        index = to_device(sampled, torch.long)
        drawn, ok, errs = _draw(
            logits.index_select(0, index), [params[i] for i in sampled], [generators[i] for i in sampled], to_device
        )
        tokens = tokens.index_copy(0, index, drawn)
        checks.append(torch.ones(n, dtype=torch.bool, device=dev).index_copy(0, index, ok))
        gen_errors = {sampled[j]: e for j, e in errs.items()}
    parts = [torch.stack([c.to(torch.long) for c in checks]).double().view(-1), tokens.double()]
    want = [i for i, p in enumerate(params) if p.logprobs]
    m = max((params[i].logprobs for i in want), default=0)
    if want:
        w = to_device(want, torch.long)
        parts.append(_logprob_table(raw.index_select(0, w), tokens.index_select(0, w), m).view(-1))
    read = torch.cat(parts).tolist()  # the step's one read of the device
    k = len(checks)
    flags = [read[j * n : (j + 1) * n] for j in range(k)]
    ids = [int(t) for t in read[k * n : (k + 1) * n]]
    picked: list[int | BaseException] = []
    for i in range(n):
        if i in masked:
            picked.append(masked[i])
        elif not flags[0][i]:
            picked.append(FloatingPointError("the model's logits are not finite for this request"))
        elif logits is not raw and not flags[1][i]:  # a row whose controls ban every token: its own input error
            picked.append(
                ValueError(
                    "every token is banned for this request (bad words, min_tokens or its structured output leave none)"
                )
            )
        elif i in gen_errors:
            picked.append(gen_errors[i])
        elif sampled and not flags[-1][i]:
            picked.append(FloatingPointError("the logits are not finite after temperature; cannot sample from them"))
        else:
            picked.append(ids[i])
    lps: list[TopLogprobs | None] = [None] * n
    if want:
        table = read[(k + 1) * n :]
        rows = [table[j * (1 + 2 * m) : (j + 1) * (1 + 2 * m)] for j in range(len(want))]
        for i, lp in zip(want, _unpack_logprobs(rows, [params[i].logprobs for i in want], None)):
            lps[i] = lp if isinstance(picked[i], int) else None
    return picked, lps
