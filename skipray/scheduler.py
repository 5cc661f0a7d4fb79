"""Continuous batching with per-row skip depth: the engine loop behind the online server.

Contract: pure torch over token ids (no Ray, no HTTP, no tokenizer). ``ContinuousEngine`` holds one
``SkipModel``, one ``KVCache`` of ``max_batch`` rows x ``max_len`` slots and a set of live requests.
``add_request`` / ``abort`` may be called from any thread; ``step`` is called by one loop thread and
does one iteration:

1. apply aborts (their rows are dropped and compacted away);
2. admit waiting requests (first come, first served) into free rows, appended after the live rows,
   while their padded prompt tokens fit ``max_prefill_tokens`` (at least one request is admitted, so
   a long prompt is never starved; the budget bounds how long one admission pass stalls the rows that
   are decoding), and prefill them together at full depth in one pass, right-padded: request ``i``
   fills slots ``0..p_i-1`` of its row and the padding slots after it are marked not ``valid``, so
   each row computes what it would alone; its first token comes from that pass;
3. one decode step for every live row, each row running its *own* step's layers: live rows are kept
   in admission order (oldest first = largest step = fewest layers), so for a shared schedule the
   rows that run layer ``l`` are a contiguous suffix and ``plan[l] = (slice(first, n), None)``;
   rows with different schedules fall back to ``LongTensor`` row indices. Rows sit at different
   lengths, so the step writes one slot per row (``start`` is a tensor);
4. sample per row (``skipray.sampling.sample``, one ``torch.Generator`` per seeded request, exactly
   as ``Engine`` does) and retire finished rows (``"stop"``/``"length"``, the ``Engine`` rules),
   compacting the cache with ``move_rows`` so the survivors stay ``0..n-1`` in admission order.

``step`` returns the ``Event`` s of that iteration. With greedy sampling each request produces the
tokens it would produce alone through ``Engine.generate``. A request never waits for another to
finish: it waits only for a free row, and is admitted at the next iteration when one exists.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from skipray.engine import SamplingParams, check_schedule, finish_reason, pad_prompts, validate_request
from skipray.model import SkipModel, forward, full_plan
from skipray.sampling import sample
from skipray.schedule import SkipSchedule


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should shed load (HTTP 429/503)."""


@dataclass
class Event:
    request_id: str
    token_id: int | None  # None only for an abort
    layers: int  # layers computed to produce this token
    finish_reason: str | None  # "stop", "length" or "abort" on the request's last event


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    schedule: SkipSchedule
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Generation step of the next decode pass: it consumes generated token ``step``."""
        return len(self.generated) - 1


class ContinuousEngine:
    def __init__(
        self,
        model: SkipModel,
        schedule: SkipSchedule | None = None,
        max_batch: int = 16,
        max_len: int = 512,
        eos_token_ids: Sequence[int] = (),
        max_waiting: int = 64,
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.model = model.eval()
        self.schedule = schedule or SkipSchedule.full(model.num_layers)
        check_schedule(self.schedule, model.num_layers)
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = next(model.parameters()).device
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = model.new_cache(max_batch, max_len)
        self.live: list[_Request] = []  # cache row i holds live[i]; admission order
        self._waiting: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.steps = 0  # decode iterations run (for tests and metrics)

    # -- thread-safe API -------------------------------------------------------------------------
    def validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request this engine can never serve."""
        validate_request(prompt, params, self.model.vocab_size, min(self.max_len, self.model.max_positions))

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        schedule: SkipSchedule | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; it joins the batch at the next iteration with a free row. -> request id.

        Raises ``ValueError`` for invalid input and ``QueueFull`` when ``max_waiting`` are waiting.
        """
        schedule = schedule or self.schedule
        check_schedule(schedule, self.model.num_layers)
        self.validate(prompt, params)
        rid = request_id or f"req-{next(self._ids)}"
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = _Request(rid, list(prompt), params, schedule, gen)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or live); its row is freed at the start of the next ``step``."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.live or self._waiting or self._aborts)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the loop body ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One iteration: aborts, admissions (prefill), one decode step for all live rows, retirement."""
        events: list[Event] = []
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if aborts:
                kept = deque(r for r in self._waiting if r.rid not in aborts)
                events += [Event(r.rid, None, 0, "abort") for r in self._waiting if r.rid in aborts]
                self._waiting = kept
        if aborts:
            dropped = [i for i, r in enumerate(self.live) if r.rid in aborts]
            events += [Event(self.live[i].rid, None, 0, "abort") for i in dropped]
            self._retire(dropped)
        with self._lock:
            admit, width = [], 0  # width: the longest prompt admitted, the padded pass's width
            while self._waiting and len(self.live) + len(admit) < self.max_batch:
                w = max(width, len(self._waiting[0].prompt))
                if admit and (len(admit) + 1) * w > self.max_prefill_tokens:
                    break  # the rest wait for the next iteration
                admit.append(self._waiting.popleft())
                width = w

        if admit:  # one full-depth pass for all newcomers, in the next free rows
            first = len(self.live)
            self.live += admit
            logits = self._prefill([r.prompt for r in admit], first)
            finished = []
            for i, req in enumerate(admit):
                events.append(self._emit(req, logits[i], self.model.num_layers))
                if events[-1].finish_reason is not None:
                    finished.append(first + i)
            self._retire(finished)

        if self.live:
            logits, layers = self._decode()
            finished = []
            for i, req in enumerate(self.live):
                events.append(self._emit(req, logits[i], layers[i]))
                if events[-1].finish_reason is not None:
                    finished.append(i)
            self._retire(finished)
            self.steps += 1
        return events

    # -- phases -----------------------------------------------------------------------------------
    def _prefill(self, prompts: list[list[int]], first_row: int) -> torch.Tensor:
        """Right-padded prompts into cache rows ``first_row..``; -> last-prompt-token logits ``(k, vocab)``."""
        tokens, real = (t.to(self.device) for t in pad_prompts(prompts, side="right"))
        k, width = tokens.shape
        rows = slice(first_row, first_row + k)
        positions = torch.arange(width, device=self.device)[None].expand(k, width)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.cache.reset_rows(rows)
        logits = forward(self.model, tokens, positions, full_plan(self.model.num_layers), real,
                         cache=self.cache, cache_rows=rows, start=0, logits_at=last)
        return logits[:, 0].float()

    def row_plan(self) -> tuple[list, list[int]]:
        """The decode plan for the live rows and the layer count of each row."""
        n, L = len(self.live), self.model.num_layers
        active = [set(r.schedule.active_layers(r.step)) for r in self.live]
        plan = []
        for l in range(L):
            rows = [i for i in range(n) if l in active[i]]
            if not rows:
                plan.append(None)
            elif rows[-1] - rows[0] + 1 == len(rows):  # contiguous (always, for one shared schedule)
                plan.append((slice(rows[0], rows[-1] + 1), None))
            else:
                plan.append((torch.tensor(rows, device=self.device), None))
        return plan, [len(a) for a in active]

    def _decode(self) -> tuple[torch.Tensor, list[int]]:
        n = len(self.live)
        plan, layers = self.row_plan()
        tokens = torch.tensor([[r.generated[-1]] for r in self.live], device=self.device)
        slots = torch.tensor([len(r.prompt) + r.step for r in self.live], device=self.device)
        logits = forward(
            self.model, tokens, slots[:, None], plan, torch.ones_like(tokens, dtype=torch.bool),
            cache=self.cache, cache_rows=slice(0, n), start=slots,
        )
        return logits[:, 0].float(), layers

    def _emit(self, req: _Request, logits: torch.Tensor, layers: int) -> Event:
        p = req.params
        tok = sample(logits, p.temperature, p.top_k, p.top_p, req.generator)
        req.generated.append(tok)
        req.layers.append(layers)
        return Event(req.rid, tok, layers, finish_reason(req.generated, p, self.eos_token_ids))

    def _retire(self, rows: list[int]) -> None:
        """Drop live rows and compact the survivors to ``0..n-1``, keeping admission order."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self.live)) if i not in gone]
        if keep and keep != list(range(len(keep))):
            src = torch.tensor(keep, device=self.device)
            upto = max(len(self.live[i].prompt) + len(self.live[i].generated) for i in keep)
            self.cache.move_rows(src, torch.arange(len(keep), device=self.device), upto=upto)
        self.live = [self.live[i] for i in keep]
