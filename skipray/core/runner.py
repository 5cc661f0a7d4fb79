"""The model runner: forward passes over KV-cache rows, for the engine (torch, no scheduling decisions).

Contract: ``ModelRunner(model, config, cache_schedule)`` builds and owns the ``KVCache``: ``config.max_num_seqs``
rows (``skipray.core.config.EngineConfig``); layer ``l`` holds ``min(max_model_len, prompt_limit + k_l)`` slots,
``k_l`` the steps of ``cache_schedule`` (default full depth) that run ``l`` within ``max_tokens`` (default
``max_model_len``) new tokens (``skipray.core.memory.layer_slots``). Every pass is
``skipray.core.model.forward_segments`` over ``Segment`` s whose rows are cache rows:

* ``prefill(prompts, rows)``: right-padded prompts at full depth into cache ``rows`` (prompt ``i``
  fills slots ``0..p_i-1`` of its row; the padding slots are not ``valid``, so each row computes what
  it would alone); -> the logits of each prompt's last token ``(k, vocab)``, float32;
* ``decode_segment(tokens, slots, layer_rows, adapter)``: one token per live row (cache rows
  ``0..n-1``) at its own slot, layer ``l`` on ``layer_rows[l]`` (a slice when contiguous, read in
  place; else an index tensor, gathered), the skip adapter on the rows marked;
* ``chunk_segment(tokens, row, start, last)``: prompt tokens at slots ``start..`` of one row, at full
  depth, no adapter; logits of the last token when ``last``;
* ``run(segments)`` one pass -> each segment's logits; ``run_isolated`` reruns the parts of a failing
  pass one by one (cache writes are idempotent), so a failure lands on its own part;
* ``execute(plan)`` runs a scheduler ``StepPlan``: its row moves and row resets, then the decode step of its
  decode rows (with ``config.enforce_eager`` False, a decode-only step in static shapes, replayed as a CUDA graph
  on CUDA: ``skipray.core.graphs``) and its prompt chunks, in one pass (``plan.one_pass``: a token budget) or as
  a right-padded pass of whole prompts (``prefill``) followed by the decode pass; -> a ``StepOutput`` (each
  part's logits, or the exception its pass raised);
* ``move_rows(row_moves)`` (the scheduler's ``RowMoves``), ``reset_rows``, ``ensure_cache`` (grow to fit
  rows and per-layer slots).

``pad_prompts`` pads token-id prompts to one tensor, left or right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

from skipray.core.config import EngineConfig
from skipray.core.graphs import DecodeGraphs, static_decode
from skipray.core.memory import layer_slots
from skipray.core.model import LayerRun, Segment, SkipModel, SplitRun, forward, forward_segments, full_plan
from skipray.core.sampling import ToDevice
from skipray.core.schedule import SkipSchedule
from skipray.core.scheduler import RowMoves, StepPlan
from skipray.core.staging import HostStaging

logger = logging.getLogger(__name__)


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, real)`` of shape (B, P), P the longest prompt: ``side="left"`` right-aligns the prompts
    (the training layout), ``"right"`` left-aligns them (each row's own length is its next slot).
    ``real`` marks tokens, not padding. Raises ``ValueError`` for another ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    real = torch.zeros(B, P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        cols = slice(P - len(p), P) if side == "left" else slice(0, len(p))
        tokens[b, cols] = torch.tensor(p, dtype=torch.long)
        real[b, cols] = True
    return tokens, real


class StepOutput(NamedTuple):
    """What ``ModelRunner.execute`` made of a ``StepPlan``: float32 logits, or the exception of the part's pass."""

    decode: torch.Tensor | BaseException | None  # (n, vocab) for the decode rows; None: no decode rows
    chunks: list[torch.Tensor | BaseException | None]  # per chunk (1, vocab) when it ends its prompt, else None


def as_rows(rows: Sequence[int], to_device: ToDevice) -> slice | torch.Tensor:
    """Row indices as a slice when contiguous (the cache is then read in place), else an index tensor."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return to_device(rows, torch.long)


class ModelRunner:
    def __init__(self, model: SkipModel, config: EngineConfig, cache_schedule: SkipSchedule | None = None) -> None:
        """The passes of ``model`` over a new cache sized by ``config`` and ``cache_schedule`` (module contract)."""
        self.model, self.config = model, config
        self.device = next(model.parameters()).device
        self.staging = HostStaging(self.device)  # the step's small inputs, through pinned memory on CUDA
        self.to_device = self.staging.to_device
        n = config.max_model_len
        lens = layer_slots(
            cache_schedule or SkipSchedule.full(model.num_layers), config.prompt_limit, config.max_tokens or n
        )
        self.cache = model.new_cache(config.max_num_seqs, n, [min(n, k) for k in lens])
        cuda_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.graphs = DecodeGraphs(model, self.cache) if cuda_graphs else None  # per static decode shape

    def ensure_cache(self, rows: int, layer_lens: Sequence[int]) -> None:
        """Reallocate the cache (empty) when ``rows`` rows of ``layer_lens[l]`` slots do not fit it; the old
        cache is released before the new one is allocated (and reallocated if that fails)."""
        c = self.cache
        if not c.fits(rows, layer_lens):
            lens = [max(a, b) for a, b in zip(c.layer_lens, layer_lens)]
            shape = (max(rows, c.max_batch), max(lens), lens)
            old_shape = (c.max_batch, c.max_len, c.layer_lens)
            self.cache = c = None  # the old cache goes first: growth never holds two caches at once
            if self.graphs is not None:
                self.graphs.clear()  # they replay the old cache's addresses
            try:
                self.cache = self.model.new_cache(*shape)
            except BaseException:  # e.g. out of memory: keep serving with a cache of the old size
                self.cache = self.model.new_cache(*old_shape)
                raise
            finally:
                if self.graphs is not None:
                    self.graphs.cache = self.cache

    def reset_rows(self, first: int, n: int) -> None:
        """Forget cache rows ``first .. first + n - 1`` (before a new request's prompt goes there)."""
        self.cache.reset_rows(slice(first, first + n))

    def move_rows(self, row_moves: RowMoves) -> None:
        """Copy cache row ``src`` to ``dst`` for each move, slots ``[0, upto)``."""
        if row_moves.moves:
            src = self.to_device([m.src for m in row_moves.moves], torch.long)
            dst = self.to_device([m.dst for m in row_moves.moves], torch.long)
            self.cache.move_rows(src, dst, upto=row_moves.upto)

    def run(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """One forward pass over ``segments``; -> each segment's logits ``(b, t', vocab)``."""
        return forward_segments(self.model, segments, self.cache)

    def run_isolated(self, segments: Sequence[Segment]) -> list[torch.Tensor | BaseException]:
        """``run``; when the shared pass fails, each segment alone, so a failure lands on its own part."""
        try:
            return self.run(segments)
        except Exception as e:
            if len(segments) == 1:
                return [e]
            logger.warning("shared pass of %d parts failed (%r); running them one by one", len(segments), e)
        outs: list[torch.Tensor | BaseException] = []
        for seg in segments:
            try:
                outs.append(self.run([seg])[0])
            except Exception as e:
                outs.append(e)
        return outs

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run ``plan`` (module docstring): row moves and resets first, then its passes."""
        self.staging.new_step()
        for moves in plan.moves:
            self.move_rows(moves)
        if plan.new_rows is not None:
            self.reset_rows(*plan.new_rows)
        if plan.decode and not plan.chunks and not self.config.enforce_eager:
            live = plan.decode
            try:
                static = static_decode(
                    [r.generated[-1] for r in live],
                    [len(r.prompt) + r.step for r in live],
                    [r.schedule.skips(r.step) for r in live],
                    plan.layer_rows,
                    plan.rows_in_use,
                    self.cache.layer_lens,
                    self.cache.max_batch,
                    self.to_device,
                )
                if static is not None:
                    out = self.graphs.run(static) if self.graphs is not None else self.run([static.segment])[0]
                    return StepOutput(_last_token(out[: static.n]), [])  # a graph's: valid until the next step
            except Exception as e:  # noqa: BLE001 - the decode rows' failure, as the eager pass's would be
                return StepOutput(e, [])
        decode = None
        if plan.decode:
            live = plan.decode
            decode = self.decode_segment(
                [r.generated[-1] for r in live],
                [len(r.prompt) + r.step for r in live],
                plan.layer_rows,
                [r.schedule.skips(r.step) for r in live],  # the adapter where the step skips
            )
        if plan.one_pass:
            segments = [decode] if decode is not None else []
            for c, row in zip(plan.chunks, plan.chunk_rows):
                prompt, end = c.request.prompt, c.start + c.tokens
                segments.append(self.chunk_segment(prompt[c.start : end], row, c.start, end == len(prompt)))
            outs = self.run_isolated(segments) if segments else []
            dec = outs.pop(0) if decode is not None else None
            ends = [o if isinstance(o, BaseException) else _last_token(o) if o.shape[1] else None for o in outs]
            return StepOutput(_last_token(dec), ends)
        ends: list = []
        if plan.chunks:  # whole prompts: one right-padded pass
            try:
                ends = list(self.prefill([c.request.prompt for c in plan.chunks], plan.chunk_rows).split(1))
            except Exception as e:  # noqa: BLE001 - the newcomers' failure (the engine logs it), not the decode rows'
                ends = [e] * len(plan.chunks)
        dec = self.run_isolated([decode])[0] if decode is not None else None
        return StepOutput(_last_token(dec), ends)

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> torch.Tensor:
        """Right-padded ``prompts`` at full depth into cache ``rows`` (default ``0..k-1``), which are
        reset first; -> last-prompt-token logits ``(k, vocab)``, float32."""
        tokens, real = pad_prompts(prompts, side="right")
        tokens, real = self.to_device(tokens, torch.long), self.to_device(real, torch.bool)
        k, width = tokens.shape
        cache_rows = as_rows(list(range(k)) if rows is None else rows, self.to_device)
        positions = torch.arange(width, device=self.device)[None].expand(k, width)
        last = self.to_device([len(p) - 1 for p in prompts], torch.long)
        self.cache.reset_rows(cache_rows)
        seg = Segment(
            tokens, positions, full_plan(self.model.num_layers), real, cache_rows=cache_rows, start=0, logits_at=last
        )
        return self.run([seg])[0][:, 0].float()

    def decode_segment(
        self, tokens: Sequence[int], slots: Sequence[int], layer_rows: Sequence[Sequence[int]], adapter: Sequence[bool]
    ) -> Segment:
        """One token per live row ``i`` (cache row ``i``) at slot ``slots[i]`` (its position too), layer
        ``l`` on rows ``layer_rows[l]`` (a pair: its attention on the first rows, its MLP on the second), the skip
        adapter where ``adapter[i]``."""
        n = len(tokens)
        tok = self.to_device(tokens, torch.long)[:, None]
        start = self.to_device(slots, torch.long)
        made: dict[tuple[int, ...], LayerRun] = {}  # layers on the same rows share one (and its attention mask)

        def run_on(r: Sequence[int]) -> LayerRun | None:
            if r and tuple(r) not in made:
                on = [adapter[i] for i in r]
                end = max(slots[i] for i in r) + 1  # the host knows the rows' last slot: no read-back per layer
                made[tuple(r)] = LayerRun(as_rows(r, self.to_device), None, (any(on), all(on)), end)
            return made[tuple(r)] if r else None

        plan = [SplitRun(run_on(r[0]), run_on(r[1])) if isinstance(r, tuple) else run_on(r) for r in layer_rows]
        am = self.to_device(adapter, torch.bool)[:, None]
        same = all(x == slots[0] for x in slots)  # one shared slot (a static batch, batch 1): plain slices
        return Segment(
            tok,
            start[:, None],
            plan,
            torch.ones_like(tok, dtype=torch.bool),
            cache_rows=slice(0, n),
            start=int(slots[0]) if same else start,
            adapter=am,
            adapter_flags=(any(adapter), all(adapter)),
            end=max(slots) + 1,
        )

    def chunk_segment(self, tokens: Sequence[int], row: int, start: int, last: bool) -> Segment:
        """Prompt ``tokens`` at slots ``start..`` of cache ``row``, full depth; the last token's logits
        when ``last`` (else none)."""
        n = len(tokens)
        tok = self.to_device([list(tokens)], torch.long)
        positions = torch.arange(start, start + n, device=self.device)[None]
        return Segment(
            tok,
            positions,
            full_plan(self.model.num_layers),
            torch.ones_like(tok, dtype=torch.bool),
            cache_rows=slice(row, row + 1),
            start=start,
            logits_at=slice(n - 1, n) if last else slice(0, 0),
        )

    def prompt_logprobs(self, prompt: Sequence[int], top: int) -> list:
        """vLLM's prompt log-probs of one prompt at full depth, without the cache: ``[None]`` for its first
        token, then per token its log-prob and the ``top`` most likely tokens' (``TopLogprobs``)."""
        from skipray.core.sampling import top_logprobs

        tokens = torch.tensor([list(prompt)], device=self.device)
        n = tokens.shape[1]
        if n < 2:
            return [None] * n
        seg = Segment(
            tokens,
            torch.arange(n, device=self.device)[None],
            full_plan(self.model.num_layers),
            torch.ones_like(tokens, dtype=torch.bool),
            logits_at=slice(0, n - 1),
        )
        logits = forward(self.model, seg)[0].float()
        out = top_logprobs(logits, list(prompt[1:]), [max(top, 1)] * (n - 1), keep_top=top)
        actual = logits.gather(1, tokens[0, 1:, None])
        ranks = (logits > actual).sum(1).add(1).tolist()  # 1 + the tokens more likely than the prompt's own
        for entry, rank in zip(out, ranks):
            entry.rank = rank
        return [None, *out]


def _last_token(out: torch.Tensor | BaseException | None) -> torch.Tensor | BaseException | None:
    """A pass's ``(b, 1, vocab)`` logits as float32 ``(b, vocab)``; exceptions and ``None`` as they are."""
    return out[:, 0].float() if isinstance(out, torch.Tensor) else out
