"""KV-cache memory under skip schedules: per-layer cache lengths, bytes per row, largest batch for a budget.

Contract (pure Python, no torch; ``python -m skipray.resources --gpu-gib G`` prints the report):

* ``layer_slots(schedule, prompt_len, new_tokens)``: the slots layer ``l`` can ever fill for a row with
  a ``prompt_len``-token prompt (padding included) and ``new_tokens`` generated tokens: the prompt (at
  full depth) plus ``k_l = schedule.steps_running(l, new_tokens)``, the steps that run ``l``. Skipped
  layers never write past that (schedules are monotone), so ``skipray.core.cache.KVCache(layer_lens=...)``
  with these lengths holds every write, and ``skipray.core.model.training_plan`` runs layer ``l`` on exactly
  these columns. The engine writes at most ``prompt_len + new_tokens - 1`` slots per row; the one spare
  slot keeps full depth at ``prompt + new tokens``, the length ``KVCache`` always had.
* ``cache_bytes_per_row(...)`` is exactly what one row of such a ``KVCache`` holds: the K and V buffers
  of every layer plus its bookkeeping (``filled``: one int64 per layer; ``valid``: one bool per slot of
  the longest layer). ``rows * cache_bytes_per_row(...) == KVCache(...).nbytes`` (tested).
* ``cache_rows_for_memory(total, used, per_row, utilization)`` is the one sizing rule for a device's
  memory (vLLM's ``gpu_memory_utilization``): the rows that ``utilization * total - used`` holds.
* ``memory_report(...)`` lists, per schedule: average layers per token, cache bytes per row, the ratio
  to full depth, and the largest batch whose cache fits ``budget_bytes`` (after ``weights_bytes``).
* Which schedule sizes a cache: ``Engine.generate`` / ``stream`` know each call's schedules, prompt
  lengths and token budgets, so the cache grows to fit them. A server that accepts per-request schedules must size for
  the least-skipping schedule it accepts; when it accepts full-depth requests (skipray's Serve app
  does: ``"skip": {"full": true}``), that is full depth and skipping saves no cache memory there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from skipray.core.schedule import SkipSchedule

GIB = 1024**3


def layer_slots(schedule: SkipSchedule, prompt_len: int, new_tokens: int) -> list[int]:
    """Cache slots each layer needs for a ``prompt_len`` prompt and ``new_tokens`` generated tokens.

    Raises ``ValueError`` for a negative length."""
    if prompt_len < 0 or new_tokens < 0:
        raise ValueError(f"lengths must be >= 0, got prompt_len={prompt_len} new_tokens={new_tokens}")
    return [prompt_len + schedule.steps_running(l, new_tokens) for l in range(schedule.num_layers)]


def cache_bytes_per_row(layer_lens: Sequence[int], kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes one ``KVCache`` row takes with ``layer_lens`` slots per layer (K and V + bookkeeping)."""
    kv = 2 * sum(layer_lens) * kv_heads * head_dim * dtype_bytes
    return kv + 8 * len(layer_lens) + max(layer_lens, default=0)


def largest_batch(budget_bytes: int, per_row: int) -> int:
    """Rows of ``per_row`` bytes that fit ``budget_bytes`` (0 when not even one fits)."""
    return max(int(budget_bytes // per_row), 0) if per_row > 0 else 0


def cache_rows_for_memory(total_bytes: int, used_bytes: int, per_row: int, utilization: float = 0.9) -> int:
    """Cache rows a device holds under vLLM's ``gpu_memory_utilization``: this engine may use ``utilization``
    of the device's ``total_bytes``; what its weights and a profiled step's peak (``used_bytes``, the
    device's peak allocation after loading and one full-depth prompt pass) leave of that goes to the cache,
    ``per_row`` bytes a row (``cache_bytes_per_row``). The engine on a GPU and
    ``python -m skipray.resources`` size with this one formula. Raises ``ValueError`` for ``utilization``
    outside (0, 1]."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    return largest_batch(int(total_bytes * utilization) - used_bytes, per_row)


@dataclass(frozen=True)
class MemoryRow:
    name: str
    description: str
    avg_layers: float
    bytes_per_row: int
    vs_full: float  # bytes_per_row / full depth's
    max_batch: int | None  # for the budget, when one was given


def preset_schedules(num_layers: int) -> dict[str, SkipSchedule]:
    """Full depth and the benchmark's ~2x and ~3x schedules (``bench/bench_engine.py``), scaled to
    ``num_layers`` (exactly those for the 30-layer default model; needs ``num_layers >= 23``)."""
    L = num_layers
    r = lambda x: max(1, round(x * L / 30))  # noqa: E731
    return {
        "full": SkipSchedule.full(L),
        "~2x": SkipSchedule(L, r(16), r(6), 64, warmup_layers=r(4)),
        "~3x": SkipSchedule(L, r(10), r(4), 32, warmup_layers=2),
    }


def memory_report(
    schedules: Mapping[str, SkipSchedule],
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    prompt_len: int,
    new_tokens: int,
    budget_bytes: int | None = None,
    weights_bytes: int = 0,
    reserve: float = 0.0,
) -> list[MemoryRow]:
    """One ``MemoryRow`` per schedule; ``vs_full`` against full depth of the same model and lengths.
    The cache budget is ``(1 - reserve) * budget_bytes - weights_bytes`` (``reserve``: activations,
    logits, runtime, as in ``skipray.resources.max_batch``; ``budget_bytes=None``: no batch column)."""
    if not schedules:
        return []
    L = next(iter(schedules.values())).num_layers
    full = cache_bytes_per_row(
        layer_slots(SkipSchedule.full(L), prompt_len, new_tokens), kv_heads, head_dim, dtype_bytes
    )
    rows = []
    for name, s in schedules.items():
        per = cache_bytes_per_row(layer_slots(s, prompt_len, new_tokens), kv_heads, head_dim, dtype_bytes)
        fit = None if budget_bytes is None else largest_batch(int(budget_bytes * (1 - reserve)) - weights_bytes, per)
        rows.append(MemoryRow(name, s.describe(), s.average_layers(new_tokens), per, per / full, fit))
    return rows


def format_report(rows: Sequence[MemoryRow], title: str = "", budget_gib: float | None = None) -> str:
    """A markdown table of ``memory_report`` rows."""
    fit = f" | max batch in {budget_gib:g} GiB" if budget_gib is not None else ""
    out = [title] if title else []
    out += [
        f"| schedule | avg layers / token | KV cache per row | vs full depth{fit} |",
        "|---|---:|---:|---:" + ("|---:|" if budget_gib is not None else "|"),
    ]
    for r in rows:
        b = f" | {r.max_batch}" if budget_gib is not None else ""
        out.append(
            f"| {r.name}: {r.description} | {r.avg_layers:.2f} | {r.bytes_per_row / 1024:.1f} KiB | "
            f"{r.vs_full:.2f}x{b} |"
        )
    return "\n".join(out)
