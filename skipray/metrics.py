"""Engine metrics with vLLM's names and units, through ``ray.util.metrics`` on Ray's Prometheus endpoint.

Contract:

* ``EngineMetrics(component, model_name)`` is cheap to create and import-safe: nothing touches Ray until a
  ``record_*`` call, and every call is a no-op while Ray is not initialised in this process (plain CLI
  use, unit tests) or when ``SKIPRAY_METRICS=0``. Ray is never imported by this module unless something
  else imported it first. A recording failure is the caller's to log, never fatal.
* Names are vLLM's with ``vllm:`` replaced by ``skipray_`` (Ray 2.60 no longer exports a name with a
  colon), in vLLM's units (seconds, tokens, a 0-1 fraction). Ray exports ``skipray_x`` as
  ``ray_skipray_x`` and counters with ``_total``, exactly as it exports vLLM's ``vllm:x`` under Ray Serve
  LLM as ``ray_vllm_x``: dashboards and alerts written for those need only ``vllm`` swapped for
  ``skipray``. ``skipray_generation_tokens`` is scraped as ``ray_skipray_generation_tokens_total``.
* Every series is labelled ``model_name`` (the served name) and ``component`` (``serve`` / ``batch``);
  ``skipray_request_success`` also ``finished_reason`` (``stop``, ``length``, ``abort``, ``error``, ...).

vLLM's series (``SERIES``): ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``, ``request_queue_time_seconds`` (arrival to the start of the engine step
that produced the request's first token; with chunked prefill that includes the earlier chunks),
``request_prompt_tokens``, ``request_generation_tokens`` (histograms); ``prompt_tokens``,
``generation_tokens``, ``request_success`` (counters); ``num_requests_running``, ``num_requests_waiting``,
``kv_cache_usage_perc`` (the share of the cache's slots holding a live request's tokens) (gauges).
skipray's own: ``layers_computed`` / ``layers_skipped`` (decoder layers run / skipped for generated
tokens; the skip ratio is ``skipped / (computed + skipped)``, layers per token ``computed /
generation_tokens``), ``decode_steps`` (counters), ``request_theoretical_speedup`` (histogram: each
request's FLOP ratio of full depth over the layers it ran, ``skipray.core.schedule.flop_speedup``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

TAG_KEYS = ("model_name", "component")
TIME_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000]
SPEEDUP_BUCKETS = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 2.0, 2.25, 2.5, 3.0, 4.0]

# name -> (kind, description, histogram boundaries or extra tag keys)
SERIES: dict[str, tuple[str, str, Any]] = {
    "skipray_time_to_first_token_seconds": ("histogram", "Time to first token in seconds.", TIME_BUCKETS),
    "skipray_inter_token_latency_seconds": ("histogram", "Time between a request's tokens in seconds.", ITL_BUCKETS),
    "skipray_e2e_request_latency_seconds": ("histogram", "End-to-end request latency in seconds.", E2E_BUCKETS),
    "skipray_request_queue_time_seconds": ("histogram", "Time a request waited before its prefill.", TIME_BUCKETS),
    "skipray_request_prompt_tokens": ("histogram", "Prompt tokens per finished request.", TOKEN_BUCKETS),
    "skipray_request_generation_tokens": ("histogram", "Generated tokens per finished request.", TOKEN_BUCKETS),
    "skipray_request_theoretical_speedup": ("histogram", "FLOP ratio full depth / run, per request.", SPEEDUP_BUCKETS),
    "skipray_prompt_tokens": ("counter", "Prompt tokens of finished requests.", ()),
    "skipray_generation_tokens": ("counter", "Tokens generated.", ()),
    "skipray_request_success": ("counter", "Finished requests by finish reason.", ("finished_reason",)),
    "skipray_layers_computed": ("counter", "Decoder layers run for generated tokens (per layer, per token).", ()),
    "skipray_layers_skipped": ("counter", "Decoder layers the skip schedule skipped for generated tokens.", ()),
    "skipray_decode_steps": ("counter", "Engine steps (one token for every live row).", ()),
    "skipray_num_requests_running": ("gauge", "Requests in the engine's batch.", ()),
    "skipray_num_requests_waiting": ("gauge", "Requests waiting for a row.", ()),
    "skipray_kv_cache_usage_perc": ("gauge", "Share of KV-cache slots holding live requests' tokens (0-1).", ()),
}
METRIC_NAMES = tuple(SERIES)

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def ray_active() -> bool:
    """True when Ray is initialised in this process (without importing Ray)."""
    if os.environ.get("SKIPRAY_METRICS", "1") == "0":
        return False
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _registry() -> dict[str, Any]:
    global _metrics
    with _lock:
        if _metrics is None:
            from ray.util.metrics import Counter, Gauge, Histogram

            m: dict[str, Any] = {}
            for name, (kind, desc, extra) in SERIES.items():
                if kind == "histogram":
                    m[name] = Histogram(name, description=desc, boundaries=extra, tag_keys=TAG_KEYS)
                else:
                    cls = Counter if kind == "counter" else Gauge
                    m[name] = cls(name, description=desc, tag_keys=TAG_KEYS + tuple(extra))
            _metrics = m
        return _metrics


class EngineMetrics:
    """Recorder for one component of one served model; see the module docstring for the series."""

    def __init__(self, component: str, model_name: str = "skipray") -> None:
        self.component, self.model_name = component, model_name
        self._tags = {"model_name": model_name, "component": component}
        self._arrival: dict[str, float] = {}  # request id -> arrival (perf_counter seconds)
        self._last: dict[str, float] = {}  # request id -> when its last token came

    @property
    def enabled(self) -> bool:
        return ray_active()

    def _m(self) -> dict[str, Any] | None:
        return _registry() if ray_active() else None

    def record_arrival(self, request_id: str, t: float | None = None) -> None:
        """A request entered the engine's queue at ``t`` (``time.perf_counter()``, default now)."""
        if self.enabled:
            self._arrival[request_id] = time.perf_counter() if t is None else t

    def record_step(
        self,
        tokens: Sequence[tuple[str, int, bool]],
        num_layers: int,
        running: int,
        waiting: int,
        cache_usage: float,
        step_start: float,
        now: float | None = None,
    ) -> None:
        """One engine step that began at ``step_start`` and ended ``now`` (``perf_counter`` seconds):
        ``tokens`` holds ``(request id, layers run, finished)`` per generated token; the gauges are the
        engine's state after the step."""
        m = self._m()
        if m is None:
            return
        now = time.perf_counter() if now is None else now
        t = self._tags
        m["skipray_num_requests_running"].set(running, tags=t)
        m["skipray_num_requests_waiting"].set(waiting, tags=t)
        m["skipray_kv_cache_usage_perc"].set(cache_usage, tags=t)
        if not tokens:
            return
        m["skipray_decode_steps"].inc(1, tags=t)
        m["skipray_generation_tokens"].inc(len(tokens), tags=t)
        self.record_layers([n for _, n, _ in tokens], num_layers)
        for rid, _, finished in tokens:
            last = self._last.get(rid)
            if last is not None:
                m["skipray_inter_token_latency_seconds"].observe(max(now - last, 0.0), tags=t)
            else:
                arrived = self._arrival.pop(rid, None)
                if arrived is not None:
                    m["skipray_request_queue_time_seconds"].observe(max(step_start - arrived, 0.0), tags=t)
            if finished:
                self._last.pop(rid, None)
                self._arrival.pop(rid, None)
            else:
                self._last[rid] = now

    def forget(self, request_id: str) -> None:
        """Drop what is kept for a request that ended without a last token (aborted, failed)."""
        self._arrival.pop(request_id, None)
        self._last.pop(request_id, None)

    def record_layers(self, layers_per_token: Iterable[int], num_layers: int) -> None:
        """Layers computed/skipped for generated tokens (e.g. ``Completion.layers_per_token``)."""
        m = self._m()
        if m is None:
            return
        layers = list(layers_per_token)
        run = sum(layers)
        if layers:
            m["skipray_layers_computed"].inc(run, tags=self._tags)
        skipped = num_layers * len(layers) - run
        if skipped > 0:
            m["skipray_layers_skipped"].inc(skipped, tags=self._tags)

    def record_request(
        self,
        latency_s: float,
        prompt_tokens: int,
        generated_tokens: int,
        finish_reason: str | None,
        ttft_s: float | None = None,
        speedup: float | None = None,
    ) -> None:
        """One finished request (or batch row): its end-to-end latency, token counts, finish reason, time
        to first token and theoretical speedup where known."""
        m = self._m()
        if m is None:
            return
        t = self._tags
        m["skipray_request_success"].inc(1, tags={**t, "finished_reason": str(finish_reason)})
        if prompt_tokens > 0:
            m["skipray_prompt_tokens"].inc(prompt_tokens, tags=t)
        m["skipray_request_prompt_tokens"].observe(prompt_tokens, tags=t)
        m["skipray_request_generation_tokens"].observe(generated_tokens, tags=t)
        m["skipray_e2e_request_latency_seconds"].observe(max(latency_s, 0.0), tags=t)
        if ttft_s is not None:
            m["skipray_time_to_first_token_seconds"].observe(max(ttft_s, 0.0), tags=t)
        if speedup is not None:
            m["skipray_request_theoretical_speedup"].observe(speedup, tags=t)

    def record_batch(
        self,
        completions: Sequence[Any],
        num_layers: int,
        max_rows: int,
        latency_s: float,
        steps: int | None = None,
        cost: Any = None,
    ) -> None:
        """A whole ``Engine.generate`` call: one request per completion (``prompt_len``, ``token_ids``,
        ``layers_per_token``, ``finish_reason``), its tokens and layers, the engine ``steps`` it took
        (default: its longest row's tokens), and the rows it used of ``max_rows`` as the running gauge and
        cache use. ``cost``: a ``CostModel`` for each row's theoretical speedup."""
        m = self._m()
        if m is None or not completions:
            return
        from skipray.core.schedule import flop_speedup

        for c in completions:
            speed = flop_speedup(c.layers_per_token, cost, c.prompt_len, num_layers) if cost else None
            self.record_request(latency_s, c.prompt_len, len(c.token_ids), c.finish_reason, speedup=speed)
            self.record_layers(c.layers_per_token, num_layers)
        t = self._tags
        m["skipray_generation_tokens"].inc(sum(len(c.token_ids) for c in completions), tags=t)
        m["skipray_decode_steps"].inc(
            steps if steps is not None else max(len(c.token_ids) for c in completions), tags=t
        )
        m["skipray_num_requests_running"].set(min(len(completions), max_rows), tags=t)
        m["skipray_num_requests_waiting"].set(0, tags=t)
