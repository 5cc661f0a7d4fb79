"""The scheduler: which requests hold which cache rows, and which rows run which layer (plain Python).

Contract (no torch; ``skipray.core.engine.Engine`` drives it and applies its decisions to the cache;
``Scheduler(config)`` reads its limits from the engine's ``skipray.core.config.EngineConfig``):

* Queues: ``add`` puts a ``Request`` in the online queue (bounded by ``max_waiting``: ``QueueFull``
  beyond it) or, with ``offline=True``, in the offline queue (unbounded). Online requests are admitted
  by ``priority`` (vLLM's: lower first, default 0), first come, first served within one priority (no
  preemption: a running request keeps its row); offline ones only when no online request waits, holding at most
  ``max_offline_rows`` rows at once (default: all but a quarter of ``max_num_seqs``), so online arrivals
  find rows free. ``abort`` may be called from any thread; ``take_aborts`` applies the aborts.
* Admission: ``take_admissions`` (prefill in one right-padded pass) takes requests into free rows (of
  ``max_num_seqs``) while their padded prompt tokens fit ``max_prefill_tokens`` (at least one, so a long
  prompt is never starved). ``plan_chunks`` (chunked prefill, ``max_num_batched_tokens``) hands out prompt chunks
  within the per-iteration token budget: partly prefilled prompts first, then newcomers.
* Rows: ``live`` (decoding) requests sit in cache rows ``0..n-1``, ``prefilling`` ones after them.
  Live rows are grouped by schedule, groups in the order they appeared, and within a group by
  admission: even groups oldest first, odd groups youngest first. An older row is further along, so
  it runs fewer layers (schedules are monotone), and the rows running layer ``l`` are a suffix of an
  even group and a prefix of the odd group after it: with one or two schedules live, every layer
  runs on one contiguous range of rows. ``arrange`` / ``retire`` keep that order and return the
  ``RowMoves`` the cache must make: ``moves`` (``Move(src, dst)`` each) and ``upto``, the slots to copy.
* Plan: ``layer_rows()`` -> for each layer the live rows that run it at their own step, and for
  each live row the number of layers it runs.
* One iteration: ``schedule()`` -> a ``StepPlan`` (aborts applied, admissions placed in the rows after the
  decoding ones, this step's decode rows and prompt chunks, the row moves the cache must make first);
  the engine runs it and hands back what finished and what completed its prompt to ``settle``, which
  returns the row moves that promote finished prompts to decoding rows and drop finished requests.
  Without a token budget (``max_num_batched_tokens`` unset) a chunk is a whole prompt, admitted under
  ``max_prefill_tokens``; with one, prompts are cut into chunks that fill the budget. ``fail_running``
  forgets every running request (a pass that failed beyond one request).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from skipray.core.config import EngineConfig
from skipray.core.requests import QueueFull, SamplingParams
from skipray.core.schedule import SkipSchedule


class Move(NamedTuple):
    """One cache row copied to another."""

    src: int
    dst: int


class RowMoves(NamedTuple):
    """The row moves that keep every request in its row (``Scheduler.arrange``), for ``ModelRunner.move_rows``."""

    moves: list[Move]
    upto: int  # slots to copy per moved row: the most any destination's request holds


class Chunk(NamedTuple):
    """A prompt chunk of chunked prefill: ``tokens`` prompt tokens of ``request`` from slot ``start``."""

    request: Request
    start: int
    tokens: int


@dataclass
class StepPlan:
    """One iteration's work (``Scheduler.schedule``), in the order the engine applies it."""

    aborted: list[Request]  # requests dropped by ``abort`` (waiting or running): each gets an "abort" event
    moves: list[RowMoves]  # cache row moves, applied in order before the pass
    new_rows: tuple[int, int] | None  # (first row, count) of the newcomers, reset before their prompt
    decode: list[Request]  # the decoding rows 0..n-1: one token each at its own step
    layer_rows: list  # per layer the decode rows that run it (``layer_rows``; a pair with sublayers)
    layers: list[int | float]  # per decode row the layers it runs (layer equivalents with sublayers)
    chunks: list[Chunk]  # prompt parts to prefill, in rows after the decode rows
    chunk_rows: list[int]  # each chunk's cache row
    one_pass: bool  # chunks and the decode step share one pass (a token budget); else prompts pass first
    rows_in_use: int = 0  # cache rows 0.. that hold requests (decoding and prefilling); the rest are free


@dataclass(eq=False)
class Request:
    """One request's state. ``generator`` is the sampler's random generator (opaque here)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    schedule: SkipSchedule
    generator: Any = None
    offline: bool = False  # the offline admission class
    priority: int = 0  # online admission order: lower first (vLLM's request priority)
    seq: int = -1  # admission order
    prefilled: int = 0  # prompt tokens in the cache (chunked prefill)
    generated: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    constraint: Any = None  # this request's TokenConstraint (structured output), opaque here

    @property
    def step(self) -> int:
        """Generation step of the next decode pass: it consumes generated token ``step``."""
        return len(self.generated) - 1

    @property
    def slots(self) -> int:
        """An upper bound on the cache slots this request's row holds."""
        return len(self.prompt) + len(self.generated) if self.generated else self.prefilled


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        """The queues and rows of an engine with ``config`` (its limits: ``EngineConfig``, which validates them)."""
        self.config = config
        self.live: list[Request] = []  # cache row i holds live[i] (module docstring's order)
        self.prefilling: list[Request] = []  # chunked prefill: cache rows len(live).., in admission order
        self.groups: list[SkipSchedule] = []  # schedules of the live rows, in the order they appeared
        self.waiting: deque[Request] = deque()
        self.offline_waiting: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._seq = itertools.count()

    # -- queues (any thread) -----------------------------------------------------------------------
    def add(self, req: Request, bounded: bool = True) -> None:
        """Queue ``req``; raises ``QueueFull`` when ``bounded`` and ``max_waiting`` online requests wait."""
        with self._lock:
            if req.offline:
                self.offline_waiting.append(req)
                return
            if bounded and len(self.waiting) >= self.config.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            at = len(self.waiting)  # behind every request of the same or a lower priority value
            while at > 0 and self.waiting[at - 1].priority > req.priority:
                at -= 1
            self.waiting.insert(at, req)

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; ``take_aborts`` drops it at the next iteration (unknown ids: nothing)."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        """Whether any request waits, runs or has an abort pending."""
        with self._lock:
            return bool(self.live or self.prefilling or self.waiting or self.offline_waiting or self._aborts)

    @property
    def running(self) -> list[Request]:
        """Requests holding a row: decoding, then being prefilled (row order)."""
        return self.live + self.prefilling

    def fail_running(self) -> list[Request]:
        """Forget every request holding a row (the pass that held them failed); -> them."""
        gone = self.running
        self.live, self.prefilling, self.groups = [], [], []
        return gone

    def reset(self) -> list[Request]:
        """Forget every request; -> them."""
        with self._lock:
            gone = list(self.waiting) + list(self.offline_waiting)
            self.waiting.clear()
            self.offline_waiting.clear()
            self._aborts.clear()
        return self.fail_running() + gone

    # -- one iteration (the loop thread) -----------------------------------------------------------
    def take_aborts(self) -> tuple[list[Request], list[Request]]:
        """Apply the aborts: -> (waiting requests dropped, running requests to retire)."""
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            waiting = [r for r in list(self.waiting) + list(self.offline_waiting) if r.request_id in aborts]
            if waiting:
                self.waiting = deque(r for r in self.waiting if r.request_id not in aborts)
                self.offline_waiting = deque(r for r in self.offline_waiting if r.request_id not in aborts)
        return waiting, [r for r in self.running if r.request_id in aborts]

    def schedule(self) -> StepPlan:
        """This iteration's ``StepPlan``: aborts applied, newcomers admitted (whole prompts within
        ``max_prefill_tokens``, or chunks within ``max_num_batched_tokens``) into the rows after the
        decoding ones, and the decoding rows' layers."""
        waiting, running = self.take_aborts()
        moves = [self.retire(running)]
        one_pass = self.config.max_num_batched_tokens is not None
        if one_pass:
            chunks, new = self.plan_chunks()
        else:
            new = self.take_admissions()
            chunks = [Chunk(r, 0, len(r.prompt)) for r in new]
        new_rows = None
        if new:
            moves.append(self.arrange(self.live, self.prefilling + new))
            new_rows = (len(self.live) + len(self.prefilling) - len(new), len(new))
        layer_rows, layers = self.layer_rows()
        rows = [self.row(c.request) for c in chunks]
        return StepPlan(
            waiting + running,
            moves,
            new_rows,
            list(self.live),
            layer_rows,
            layers,
            chunks,
            rows,
            one_pass,
            len(self.live) + len(self.prefilling),
        )

    def settle(self, ready: Sequence[Request], gone: Sequence[Request]) -> RowMoves:
        """After a step: ``ready`` requests (prompt complete, first token made) become decoding rows,
        ``gone`` ones (finished or failed) leave; -> the row moves that keep the order (``arrange``)."""
        out = {id(r) for r in gone}
        if not ready and not out:
            return RowMoves([], 0)
        return self.arrange(
            [r for r in self.live + list(ready) if id(r) not in out],
            [r for r in self.prefilling if id(r) not in out and r.prefilled < len(r.prompt)],
        )

    def _next_queue(self, offline_taken: int = 0) -> deque | None:
        """The queue the next admission comes from (lock held): online first; offline while offline rows
        (live, prefilling and ``offline_taken`` being admitted) are below ``max_offline_rows``."""
        if self.waiting:
            return self.waiting
        if self.offline_waiting:
            held = sum(r.offline for r in self.running) + offline_taken
            if held < self.config.offline_limit:
                return self.offline_waiting
        return None

    def take_admissions(self) -> list[Request]:
        """Requests to prefill now, in one right-padded pass within ``max_prefill_tokens`` (module docstring)."""
        with self._lock:
            admit: list[Request] = []
            width = 0  # the longest prompt admitted: the padded pass's width
            while len(self.live) + len(self.prefilling) + len(admit) < self.config.max_num_seqs:
                queue = self._next_queue(sum(r.offline for r in admit))
                if queue is None:
                    break
                w = max(width, len(queue[0].prompt))
                if admit and (len(admit) + 1) * w > self.config.max_prefill_tokens:
                    break  # the rest wait for the next iteration
                admit.append(queue.popleft())
                width = w
        for r in admit:
            r.seq = next(self._seq)
        return admit

    def plan_chunks(self) -> tuple[list[Chunk], list[Request]]:
        """This iteration's prompt ``Chunk`` s within the budget, partly
        prefilled requests first; -> (chunks, newcomers). The newcomers join ``prefilling`` (rows after
        the existing ones); the caller resets their rows and applies the returned moves first."""
        cfg = self.config
        left = min(cfg.max_num_batched_tokens - len(self.live), cfg.max_prefill_tokens)
        chunks: list[Chunk] = []
        for r in self.prefilling:
            if left <= 0:
                break
            n = min(len(r.prompt) - r.prefilled, left)
            chunks.append(Chunk(r, r.prefilled, n))
            left -= n
        new: list[Request] = []
        with self._lock:
            while left > 0 and len(self.live) + len(self.prefilling) + len(new) < cfg.max_num_seqs:
                queue = self._next_queue(sum(r.offline for r in new))
                if queue is None:
                    break
                r = queue.popleft()
                n = min(len(r.prompt), left)
                new.append(r)
                chunks.append(Chunk(r, 0, n))
                left -= n
        for r in new:
            r.seq = next(self._seq)
        return chunks, new

    def row(self, req: Request) -> int:
        """The cache row ``req`` holds."""
        for i, r in enumerate(self.running):
            if r is req:
                return i
        raise KeyError(req.request_id)

    def arrange(self, live: Sequence[Request], prefilling: Sequence[Request] = ()) -> RowMoves:
        """Make ``live`` the decoding rows in the module docstring's order and ``prefilling`` the rows
        after them. -> the row moves that keep every request's cache with it."""
        kept = {r.schedule for r in live}
        self.groups = [s for s in self.groups if s in kept]
        by_seq = sorted(live, key=lambda r: r.seq)
        self.groups += list(dict.fromkeys(r.schedule for r in by_seq if r.schedule not in self.groups))
        by_group: dict[SkipSchedule, list[Request]] = {s: [] for s in self.groups}
        for r in by_seq:
            by_group[r.schedule].append(r)
        order = [r for g, s in enumerate(self.groups) for r in (by_group[s] if g % 2 == 0 else by_group[s][::-1])]
        rows = order + list(prefilling)
        old = {id(r): i for i, r in enumerate(self.running)}
        moves = [Move(old[id(r)], i) for i, r in enumerate(rows) if id(r) in old and old[id(r)] != i]
        upto = max((rows[m.dst].slots for m in moves), default=0)
        self.live, self.prefilling = order, list(prefilling)
        return RowMoves(moves, upto)

    def retire(self, reqs: Sequence[Request]) -> RowMoves:
        """Drop finished requests from the rows; -> the moves that keep the order (``arrange``)."""
        if not reqs:
            return RowMoves([], 0)
        gone = {id(r) for r in reqs}
        return self.arrange(
            [r for r in self.live if id(r) not in gone], [r for r in self.prefilling if id(r) not in gone]
        )

    def layer_rows(self) -> tuple[list, list[int | float]]:
        """-> (for each layer, the live rows that run it at their own step, or with sublayer skipping a pair
        (rows that run its attention, rows that run its MLP) where the two differ; per live row the layers it
        runs, FLOP-weighted layer equivalents with sublayers)."""
        runs = [r.schedule.runs(r.step) for r in self.live]
        attn = [set(a) for a, _ in runs]
        mlp = [a if m is a else set(m) for a, (_, m) in zip(attn, runs)]
        num_layers = self.live[0].schedule.num_layers if self.live else 0
        rows: list = []
        for l in range(num_layers):
            a = [i for i, on in enumerate(attn) if l in on]
            m = [i for i, on in enumerate(mlp) if l in on]
            rows.append(a if a == m else (a, m))
        return rows, [r.schedule.num_active(r.step) for r in self.live]
