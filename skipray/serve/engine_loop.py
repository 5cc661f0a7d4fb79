"""The engine loop of one server replica: a background thread drives a ``skipray.core.engine.Engine``; asyncio
request handlers submit requests and await their events. No Ray, no HTTP.

Contract:

* ``EngineLoop(engine)`` starts the thread. ``generate(prompt, params, schedule)`` is an async
  generator of the request's ``skipray.core.requests.Event`` s, the last one with a ``finish_reason``. It raises
  ``QueueFull`` or ``ValueError`` at submission (shed load / client mistake), ``RequestFailed`` when
  the engine ended this request with an error (``finish_reason="error"``: a fault of this request
  alone, its batch-mates go on), ``EngineFailed`` when the loop itself failed, and ``LoopStopped``
  when the loop thread is gone. Closing the generator early (the client went away) aborts the
  request and frees its row. An ``offline`` request's events reach its generator together, once it
  finished (nothing streams them; this spares the replica's event loop a wake-up per token).
* Faults never leave a request waiting: the engine contains faults of a row or of a batch pass
  (``Engine.step``); anything the engine could not contain fails every pending request at
  once (``EngineFailed``), is logged with its traceback, and the loop serves new requests from a
  reset engine. If the thread dies anyway, every pending request fails and ``alive`` is false (the
  replica's health check reports it).
* Health (``problem(max_failed_steps, stall_s)``): the reason the replica cannot serve, or None. It is
  unhealthy when the loop thread is gone, while it drains for shutdown (``drain()``: new requests get
  ``LoopStopped``), when ``max_failed_steps`` steps in a row failed (a step fails when it raises, or when
  every event it produced ended its request with an error that is not the request's own input error, a
  ``ValueError``: clients cannot make a replica unhealthy), or when work waits and no step has
  succeeded for ``stall_s`` seconds (counted from when the work arrived). It reads counters the loop
  thread keeps and never waits for a step.
* Metrics (``skipray.metrics.EngineMetrics``) are recorded per step when given; a metrics failure
  is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("skipray.serve")


class RequestFailed(RuntimeError):
    """The engine ended this request with an error; ``cause`` is what was raised for it."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(f"generation failed: {cause!r}")
        self.cause = cause


class EngineFailed(RuntimeError):
    """The engine loop failed as a whole; every pending request got this."""


class LoopStopped(RuntimeError):
    """The engine loop thread is not running."""


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    held: list | None = None  # offline requests: their events, handed over together at the end


class EngineLoop:
    def __init__(self, engine, metrics=None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._sinks: dict[str, _Sink] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.draining = False
        self.failed_steps = 0  # steps in a row that failed
        self.last_ok = time.monotonic()  # when a step last succeeded
        self.busy_since: float | None = None  # when the loop last went from idle to having work
        self._thread = threading.Thread(target=self._run, name="skipray-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread after its current step."""
        self._stop = True
        self._wake.set()

    def drain(self) -> None:
        """Refuse new requests (``LoopStopped``); running ones go on."""
        self.draining = True

    def problem(self, max_failed_steps: int, stall_s: float) -> str | None:
        """Why this loop cannot serve, or None (module contract)."""
        if not self.alive:
            return "the engine loop is not running"
        if self.draining:
            return "draining for shutdown"
        if self.failed_steps >= max_failed_steps:
            return f"the last {self.failed_steps} engine steps failed"
        busy = self.busy_since
        if busy is not None and time.monotonic() - max(self.last_ok, busy) > stall_s:
            return f"requests wait and no engine step has succeeded for over {stall_s:g} s"
        return None

    async def generate(
        self, prompt: list[int], params, schedule=None, offline: bool = False, priority: int = 0
    ) -> AsyncIterator[Any]:
        """Submit a request and yield its engine events (see the module contract); ``offline``: the
        engine's offline admission class, ``priority``: its online admission order (``skipray.core.scheduler``)."""
        if not self.alive:
            raise LoopStopped("the engine loop is not running")
        if self.draining:
            raise LoopStopped("the replica is shutting down; retry on another")
        rid = uuid.uuid4().hex
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), [] if offline else None)
        with self._lock:
            self._sinks[rid] = sink
        done = False
        try:
            self.engine.add_request(prompt, params, schedule, request_id=rid, offline=offline, priority=priority)
            self._wake.set()
            while True:
                item = await sink.queue.get()
                for ev in item if isinstance(item, list) else [item]:
                    if isinstance(ev, BaseException):
                        done = True
                        raise ev
                    if ev.finish_reason == "error":
                        done = True
                        raise RequestFailed(ev.error)
                    yield ev
                    if ev.finish_reason is not None:
                        done = True
                        return
        finally:
            with self._lock:
                self._sinks.pop(rid, None)
            if not done:
                self.engine.abort(rid)
                self._wake.set()

    # -- the thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._wake.clear()
                if not self.engine.has_work():
                    self.busy_since = None
                    self._wake.wait(0.05)
                    continue
                if self.busy_since is None:
                    self.busy_since = time.monotonic()
                try:
                    events = self.engine.step()
                except Exception as e:  # not contained by the engine: fail everything pending, go on
                    logger.exception("engine loop step failed; failing every pending request")
                    self.failed_steps += 1
                    self.engine.reset()
                    self._fail_all(EngineFailed(f"the engine failed: {e!r}"))
                    continue
                if events and all(
                    ev.finish_reason == "error" and not isinstance(ev.error, ValueError) for ev in events
                ):
                    self.failed_steps += 1
                else:  # a step that made progress (tokens, or a prompt chunk with no event yet)
                    self.failed_steps, self.last_ok = 0, time.monotonic()
                self._record(events)
                for ev in events:
                    self._deliver(ev.request_id, ev)
        except BaseException as e:
            logger.exception("engine loop thread died")
            self._fail_all(EngineFailed(f"the engine loop died: {e!r}"))
            raise
        self._fail_all(LoopStopped("the engine loop stopped"))

    def _deliver(self, rid: str, item: Any) -> None:
        with self._lock:
            sink = self._sinks.get(rid)
        if sink is None:
            return
        if sink.held is not None and not isinstance(item, BaseException):
            sink.held.append(item)  # offline: no per-token wake-up of the replica's event loop
            if item.finish_reason is None:
                return
            item, sink.held = sink.held, []
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
        except RuntimeError:  # that request's event loop is closed: nobody is waiting for it
            pass

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            rids = list(self._sinks)
        for rid in rids:
            self.engine.abort(rid)  # in case it was queued after the reset: nobody waits for it now
            self._deliver(rid, error)

    def _record(self, events: list) -> None:
        if self.metrics is None:
            return
        try:
            toks = [e for e in events if e.token_id is not None]
            if toks:
                self.metrics.record_layers([e.layers for e in toks], self.engine.model.num_layers)
                self.metrics.record_occupancy(len({e.request_id for e in toks}), self.engine.config.max_num_seqs)
        except Exception:
            logger.exception("recording engine metrics failed")
