"""Continuous batching with per-row skip depth: the engine loop behind the online server.

Contract: pure torch over token ids (no Ray, no HTTP, no tokenizer). ``ContinuousEngine`` holds one
``SkipModel``, one ``KVCache`` of ``max_batch`` rows x ``max_len`` slots and a set of live requests.
``add_request`` / ``abort`` may be called from any thread; ``step`` is called by one loop thread and
does one iteration (without chunked prefill, the default):

1. apply aborts (their rows are dropped);
2. admit waiting requests (first come, first served) into free rows while their padded prompt tokens
   fit ``max_prefill_tokens`` (at least one request is admitted, so a long prompt is never starved;
   the budget bounds how long one admission pass stalls the rows that are decoding), and prefill them
   together at full depth in one pass, right-padded: request ``i`` fills slots ``0..p_i-1`` of its
   row and the padding slots after it are marked not ``valid``, so each row computes what it would
   alone; its first token comes from that pass;
3. one decode step for every live row, each row running its *own* step's layers. Rows are kept
   grouped by schedule, groups in the order they appeared, and within a group by admission: even
   groups oldest first, odd groups youngest first. An older row is further along, so it runs fewer
   layers (schedules are monotone), and the rows that run layer ``l`` are a suffix of an even group
   and a prefix of the odd group after it: with one or two schedules live, every layer runs on one
   contiguous slice ``plan[l] = (slice(a, b), None)`` (the cache is read in place). With more,
   a layer whose rows are not contiguous gets a ``LongTensor`` of rows (its K/V rows are gathered).
   Rows sit at different lengths, so the step writes one slot per row (``start`` is a tensor);
4. sample per row (``skipray.sampling.sample``, one ``torch.Generator`` per seeded request, exactly
   as ``Engine`` does), with the top-N log-probs of the step's logits when the request asks
   (``SamplingParams.logprobs``, ``engine.top_logprobs``), and retire finished rows (``"stop"`` /
   ``"length"``, the ``Engine`` rules). Rows move (``KVCache.move_rows``) only when the set of
   live requests changes, to keep the order above with the live rows in ``0..n-1``.

Offline requests (``add_request(offline=True)``: the batch job through the Serve app's handle methods)
are their own admission class: they wait in a queue of their own that ``max_waiting`` does not bound
(no ``QueueFull``), join only when no online request is waiting, and hold at most ``max_offline_rows``
rows at once (default: all but a quarter of ``max_batch``, so online arrivals find rows free).

Chunked prefill (``max_num_batched_tokens``, vLLM's name for the same per-iteration token budget):
each iteration is one forward pass that carries the decode step and prompt chunks; see
``skipray.chunked``. Rows being prefilled sit after the decoding rows (``prefilling``, cache rows
``len(live)..``) and move into the decoding order when their prompt is done.

The cache: ``cache_schedule`` (default full depth) and ``max_prompt_len`` (default ``max_len - 1``)
size it: layer ``l`` gets ``min(max_len, max_prompt_len + k_l)`` slots, ``k_l`` the steps of
``cache_schedule`` that run ``l`` (``skipray.memory.layer_slots``). Requests with longer prompts, or
whose own schedule would run some layer past its slots, are refused with ``ValueError``. This engine
serves per-request schedules, so the cache must be sized for the least-skipping schedule it accepts:
a server that accepts full-depth requests (the Serve app does) gets no saving from skipping.

Faults stay with their request: anything raised for one row (sampling, non-finite logits, the stop
check) ends that request alone with ``finish_reason="error"`` and ``Event.error``; a failing prefill
ends the requests it was admitting; a failing decode pass ends every live request. With chunked
prefill, a failing shared pass is rerun part by part (the decode step alone, each chunk alone; the
cache writes are idempotent), so a failing chunk ends only its request and a failing decode step
ends the decoding rows (``skipray.chunked``). ``step`` never raises for these and always returns the events it produced
before the failure, so every request gets its last event. Waiting requests are untouched by a failure.

With greedy sampling each request produces the tokens it would produce alone through
``Engine.generate``. A request never waits for another to finish: it waits only for a free row.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from skipray.engine import (SamplingParams, TopLogprobs, check_schedule, finish_reason, pad_prompts, top_logprobs,
                            validate_request)
from skipray.chunked import ChunkedPrefill
from skipray.memory import layer_slots
from skipray.model import Segment, SkipModel, forward, full_plan
from skipray.sampling import sample
from skipray.schedule import SkipSchedule

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should shed load (HTTP 429/503)."""


@dataclass
class Event:
    request_id: str
    token_id: int | None  # None only for an abort or an error
    layers: int  # layers computed to produce this token
    finish_reason: str | None  # "stop", "length", "abort" or "error" on the request's last event
    logprobs: TopLogprobs | None = None  # when the request asked for log-probs
    error: BaseException | None = None  # why the request failed (finish_reason "error")


@dataclass(eq=False)
class _Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    schedule: SkipSchedule
    generator: torch.Generator | None
    offline: bool = False  # the offline admission class (module docstring)
    seq: int = -1  # admission order
    prefilled: int = 0  # prompt tokens in the cache (chunked prefill)
    generated: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Generation step of the next decode pass: it consumes generated token ``step``."""
        return len(self.generated) - 1

    @property
    def slots(self) -> int:
        """An upper bound on the cache slots this request's row holds."""
        return len(self.prompt) + len(self.generated) if self.generated else self.prefilled


class ContinuousEngine(ChunkedPrefill):
    def __init__(
        self,
        model: SkipModel,
        schedule: SkipSchedule | None = None,
        max_batch: int = 16,
        max_len: int = 512,
        eos_token_ids: Sequence[int] = (),
        max_waiting: int = 64,
        max_prefill_tokens: int = 2048,
        max_num_batched_tokens: int | None = None,
        max_prompt_len: int | None = None,
        cache_schedule: SkipSchedule | None = None,
        max_offline_rows: int | None = None,
    ) -> None:
        """``max_prefill_tokens``: prompt tokens prefilled per iteration (padded, without chunking);
        ``max_num_batched_tokens``: turns chunked prefill on with this per-iteration token budget;
        ``max_prompt_len`` and ``cache_schedule`` size the cache; ``max_offline_rows``: rows offline
        requests may hold at once (module docstring). Raises
        ``ValueError`` for a budget below 1 (below ``max_batch`` for ``max_num_batched_tokens``), a
        ``max_prompt_len`` outside ``[1, max_len - 1]`` or a schedule of another depth."""
        self.model = model.eval()
        self.schedule = schedule or SkipSchedule.full(model.num_layers)
        check_schedule(self.schedule, model.num_layers)
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = next(model.parameters()).device
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        if max_num_batched_tokens is not None and max_num_batched_tokens < max_batch:
            raise ValueError(f"max_num_batched_tokens must be >= max_batch ({max_batch}), so every iteration can "
                             f"step every decoding row and still prefill, got {max_num_batched_tokens}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prompt_len = max_len - 1 if max_prompt_len is None else max_prompt_len
        if not 1 <= self.max_prompt_len <= max_len - 1:
            raise ValueError(f"max_prompt_len must be in [1, max_len - 1 = {max_len - 1}], got {max_prompt_len}")
        self.cache_schedule = cache_schedule or SkipSchedule.full(model.num_layers)
        check_schedule(self.cache_schedule, model.num_layers)
        lens = [min(max_len, n) for n in layer_slots(self.cache_schedule, self.max_prompt_len, max_len)]
        self.cache = model.new_cache(max_batch, max_len, lens)
        self.live: list[_Request] = []  # cache row i holds live[i]; grouped by schedule (module docstring)
        self.prefilling: list[_Request] = []  # chunked prefill: cache rows len(live).., in admission order
        self._groups: list[SkipSchedule] = []  # schedules of the live rows, in the order they appeared
        self._waiting: deque[_Request] = deque()
        self._offline: deque[_Request] = deque()  # offline requests waiting (their own class)
        self.max_offline_rows = max_batch - max(1, max_batch // 4) if max_offline_rows is None else max_offline_rows
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._seq = itertools.count()
        self.steps = 0  # decode iterations run (for tests and metrics)

    # -- thread-safe API -------------------------------------------------------------------------
    def validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request this engine can never serve."""
        validate_request(prompt, params, self.model.vocab_size, min(self.max_len, self.model.max_positions))
        if len(prompt) > self.max_prompt_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; this engine takes at most {self.max_prompt_len}")

    def _check_cache(self, prompt: Sequence[int], params: SamplingParams, schedule: SkipSchedule) -> None:
        """Raise ``ValueError`` when ``schedule`` would run a layer past its cache slots for this request."""
        need = layer_slots(schedule, len(prompt), params.max_new_tokens)
        for l, (n, have) in enumerate(zip(need, self.cache.layer_lens)):
            if n > have:
                raise ValueError(
                    f"this request's schedule needs {n} cache slots at layer {l}, which holds {have}: the cache is "
                    f"sized for {self.cache_schedule.describe()} and prompts of at most {self.max_prompt_len} tokens")

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        schedule: SkipSchedule | None = None,
        request_id: str | None = None,
        offline: bool = False,
    ) -> str:
        """Queue a request; it joins the batch at the next iteration with a free row. -> request id.
        ``offline``: the offline admission class (module docstring).

        Raises ``ValueError`` for invalid input and ``QueueFull`` when ``max_waiting`` online requests
        are waiting.
        """
        schedule = schedule or self.schedule
        check_schedule(schedule, self.model.num_layers)
        self.validate(prompt, params)
        self._check_cache(prompt, params, schedule)
        rid = request_id or f"req-{next(self._ids)}"
        try:
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        except (RuntimeError, OverflowError) as e:
            raise ValueError(f"invalid seed {params.seed}: {e}") from None
        req = _Request(rid, list(prompt), params, schedule, gen, offline)
        with self._lock:
            if offline:
                self._offline.append(req)
                return rid
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
            return bool(self.live or self.prefilling or self._waiting or self._offline or self._aborts)

    @property
    def num_waiting(self) -> int:
        """Online requests waiting."""
        return len(self._waiting)

    @property
    def num_offline_waiting(self) -> int:
        return len(self._offline)

    def _next_queue(self, offline_taken: int = 0) -> deque | None:
        """The queue the next admission comes from (call with the lock held): online first; offline when no
        online request waits and offline rows (live, prefilling, ``offline_taken`` being admitted) are
        below ``max_offline_rows``; None when neither may admit."""
        if self._waiting:
            return self._waiting
        if self._offline:
            held = sum(r.offline for r in self.live) + sum(r.offline for r in self.prefilling) + offline_taken
            if held < self.max_offline_rows:
                return self._offline
        return None

    def reset(self) -> list[str]:
        """Forget every live and waiting request (after a failure the caller could not contain).
        -> their request ids."""
        with self._lock:
            gone = [r.rid for r in self.live + self.prefilling] + [r.rid for r in self._waiting + self._offline]
            self._waiting.clear()
            self._offline.clear()
            self._aborts.clear()
        self.live, self.prefilling, self._groups = [], [], []
        return gone

    # -- the loop body ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One iteration: aborts, admissions (prefill), one decode step for all live rows, retirement."""
        events: list[Event] = []
        admit: list[_Request] = []
        try:
            self._apply_aborts(events)
            if self.max_num_batched_tokens is not None:
                self._chunked_iteration(events)
            else:
                admit = self._take_admissions()
                if admit:
                    self._admit(admit, events)
                if self.live:
                    logits, layers = self._decode()
                    self._finish(self._emit(self.live, logits, layers, events))
                    self.steps += 1
        except Exception as e:  # the batch pass itself failed: it ends every request it held
            logger.exception("engine step failed; ending %d live requests", len(self.live) + len(self.prefilling))
            ended = {ev.request_id for ev in events if ev.finish_reason is not None}
            failed = {id(r): r for r in self.live + self.prefilling + admit if r.rid not in ended}
            events += [Event(r.rid, None, 0, "error", error=e) for r in failed.values()]
            self.live, self.prefilling, self._groups = [], [], []
        return events

    # -- phases -----------------------------------------------------------------------------------
    def _apply_aborts(self, events: list[Event]) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if aborts:
                events += [Event(r.rid, None, 0, "abort") for r in self._waiting + self._offline if r.rid in aborts]
                self._waiting = deque(r for r in self._waiting if r.rid not in aborts)
                self._offline = deque(r for r in self._offline if r.rid not in aborts)
        if aborts:
            gone = [r for r in self.live + self.prefilling if r.rid in aborts]
            events += [Event(r.rid, None, 0, "abort") for r in gone]
            self._finish(gone)

    def _take_admissions(self) -> list[_Request]:
        with self._lock:
            admit, width = [], 0  # width: the longest prompt admitted, the padded pass's width
            while len(self.live) + len(admit) < self.max_batch:
                queue = self._next_queue(sum(r.offline for r in admit))
                if queue is None:
                    break
                w = max(width, len(queue[0].prompt))
                if admit and (len(admit) + 1) * w > self.max_prefill_tokens:
                    break  # the rest wait for the next iteration
                admit.append(queue.popleft())
                width = w
        return admit

    def _admit(self, admit: list[_Request], events: list[Event]) -> None:
        """Place the newcomers in the row order, then one full-depth pass for all of them."""
        for r in admit:
            r.seq = next(self._seq)
        self._arrange(self.live + admit)
        pos = {id(r): i for i, r in enumerate(self.live)}
        admit.sort(key=lambda r: pos[id(r)])
        rows = [pos[id(r)] for r in admit]
        try:
            logits = self._prefill([r.prompt for r in admit], rows)
        except Exception as e:  # the newcomers' pass failed: it ends them, not the rows decoding
            logger.exception("prefill of %d requests failed", len(admit))
            events += [Event(r.rid, None, 0, "error", error=e) for r in admit]
            self._finish(admit)
            return
        self._finish(self._emit(admit, logits, [self.model.num_layers] * len(admit), events))

    def _prefill(self, prompts: list[list[int]], rows: list[int]) -> torch.Tensor:
        """Right-padded prompts into cache ``rows``; -> last-prompt-token logits ``(k, vocab)``."""
        tokens, real = (t.to(self.device) for t in pad_prompts(prompts, side="right"))
        k, width = tokens.shape
        cache_rows = _rows(rows, self.device)
        positions = torch.arange(width, device=self.device)[None].expand(k, width)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.cache.reset_rows(cache_rows)
        logits = forward(self.model, tokens, positions, full_plan(self.model.num_layers), real,
                         cache=self.cache, cache_rows=cache_rows, start=0, logits_at=last)
        return logits[:, 0].float()

    def row_plan(self) -> tuple[list, list[int]]:
        """The decode plan for the live rows and the layer count of each row."""
        n, L = len(self.live), self.model.num_layers
        active = [set(r.schedule.active_layers(r.step)) for r in self.live]
        plan = []
        for l in range(L):
            rows = [i for i in range(n) if l in active[i]]
            plan.append((_rows(rows, self.device), None) if rows else None)
        return plan, [len(a) for a in active]

    def _decode_segment(self) -> tuple[Segment, list[int]]:
        """The decode step of the live rows (cache rows ``0..n-1``) and the layer count of each row."""
        n = len(self.live)
        plan, layers = self.row_plan()
        tokens = torch.tensor([[r.generated[-1]] for r in self.live], device=self.device)
        slots = torch.tensor([len(r.prompt) + r.step for r in self.live], device=self.device)
        # the skip adapter applies to the generated tokens of rows whose schedule skips at this step
        adapter = torch.tensor([[r.schedule.skips(r.step)] for r in self.live], device=self.device)
        seg = Segment(tokens, slots[:, None], plan, torch.ones_like(tokens, dtype=torch.bool),
                      slice(0, n), slots, None, adapter)
        return seg, layers

    def _decode(self) -> tuple[torch.Tensor, list[int]]:
        seg, layers = self._decode_segment()
        logits = forward(self.model, seg.tokens, seg.positions, seg.plan, seg.real, cache=self.cache,
                         cache_rows=seg.cache_rows, start=seg.start, adapter=seg.adapter)
        return logits[:, 0].float(), layers

    def _fail(self, reqs: list[_Request], err: BaseException, events: list[Event]) -> list[_Request]:
        """End ``reqs`` with an error event each; -> ``reqs``."""
        events += [Event(r.rid, None, 0, "error", error=err) for r in reqs]
        return list(reqs)

    def _emit(self, reqs: list[_Request], logits: torch.Tensor, layers: list[int],
              events: list[Event]) -> list[_Request]:
        """Sample one token per request (row ``i`` of ``logits``); -> the requests that finished."""
        finite = torch.isfinite(logits).all(-1).tolist()
        picked: list[int | BaseException] = []
        for i, req in enumerate(reqs):
            p = req.params
            try:
                if not finite[i]:
                    raise FloatingPointError("the model produced non-finite logits for this request")
                picked.append(sample(logits[i], p.temperature, p.top_k, p.top_p, req.generator))
            except Exception as e:  # this request's failure, not its batch-mates'
                picked.append(e)
        want = [i for i, req in enumerate(reqs) if req.params.logprobs and isinstance(picked[i], int)]
        lps: dict[int, TopLogprobs | None] = {}
        if want:
            try:
                got = top_logprobs(logits[want], [picked[i] for i in want], [reqs[i].params.logprobs for i in want])
                lps = dict(zip(want, got))
            except Exception as e:
                picked = [e if i in want else t for i, t in enumerate(picked)]
        done = []
        for i, req in enumerate(reqs):
            tok, reason, err = picked[i], None, None
            if isinstance(tok, int):
                req.generated.append(tok)
                req.layers.append(layers[i])
                try:
                    reason = finish_reason(req.generated, req.params, self.eos_token_ids)
                except Exception as e:  # e.g. the stop-string check's tokenizer
                    reason, err = "error", e
            else:
                tok, reason, err = None, "error", tok
            if err is not None:
                logger.warning("request %s failed: %r", req.rid, err)
            events.append(Event(req.rid, tok, layers[i] if tok is not None else 0, reason, lps.get(i), err))
            if reason is not None:
                done.append(req)
        return done

    def _finish(self, reqs: list[_Request]) -> None:
        """Retire requests and re-arrange the survivors."""
        if reqs:
            gone = {id(r) for r in reqs}
            self._arrange([r for r in self.live if id(r) not in gone], [r for r in self.prefilling if id(r) not in gone])

    def _arrange(self, reqs: list[_Request], prefilling: Sequence[_Request] = ()) -> None:
        """Make ``reqs`` the live (decoding) rows in the module docstring's order and ``prefilling`` the
        rows after them, moving the cache rows that change."""
        kept = {r.schedule for r in reqs}
        self._groups = [s for s in self._groups if s in kept]
        self._groups += list(dict.fromkeys(r.schedule for r in sorted(reqs, key=lambda r: r.seq)
                                           if r.schedule not in self._groups))
        by_group: dict[SkipSchedule, list[_Request]] = {s: [] for s in self._groups}
        for r in sorted(reqs, key=lambda r: r.seq):
            by_group[r.schedule].append(r)
        order = [r for g, s in enumerate(self._groups) for r in (by_group[s] if g % 2 == 0 else by_group[s][::-1])]
        rows = order + list(prefilling)
        old = {id(r): i for i, r in enumerate(self.live + self.prefilling)}
        moves = [(old[id(r)], i) for i, r in enumerate(rows) if id(r) in old and old[id(r)] != i]
        if moves:
            src = torch.tensor([s for s, _ in moves], device=self.device)
            dst = torch.tensor([d for _, d in moves], device=self.device)
            self.cache.move_rows(src, dst, upto=max(rows[d].slots for _, d in moves))
        self.live, self.prefilling = order, list(prefilling)


def _rows(rows: list[int], device) -> slice | torch.Tensor:
    """Rows as a slice when they are contiguous (the cache is then read in place), else an index tensor."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)
