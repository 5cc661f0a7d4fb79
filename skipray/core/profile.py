"""How many cache rows a GPU holds for an engine: measure, then size (torch; CUDA only).

Contract: ``measure(model, config)`` runs one full-depth prompt pass of ``min(max_prefill_tokens,
max_model_len)`` tokens without a cache on the model's CUDA device and returns ``DeviceMemory(peak,
total)``: the device's peak allocation in that pass (the weights, and the activations and logits of the
largest pass the engine admits) and its total memory, in bytes. ``cache_rows(model, config,
cache_schedule, memory)`` is the rows of a cache sized for ``cache_schedule`` (``skipray.core.memory``'s
``layer_slots`` and ``cache_bytes_per_row``) that ``config.gpu_memory_utilization`` of the total holds
after that peak (``cache_rows_for_memory``, the formula ``python -m skipray.resources`` uses).
``fit_to_gpu(model, config, cache_schedule)`` is what the engine calls on a GPU before it allocates its
cache: both, then ``max_num_seqs`` lowered to the rows that fit (a warning), or ``ValueError`` when not one
does. Nothing here runs on a CPU.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from skipray.core.config import EngineConfig
from skipray.core.memory import cache_bytes_per_row, cache_rows_for_memory, layer_slots
from skipray.core.model import Segment, SkipModel, forward, full_plan
from skipray.core.schedule import SkipSchedule

logger = logging.getLogger(__name__)


class DeviceMemory(NamedTuple):
    peak: int  # bytes allocated at the peak of the profiled pass
    total: int  # the device's memory, bytes


def measure(model: SkipModel, config: EngineConfig) -> DeviceMemory:
    """The profiled pass (module contract). Raises ``ValueError`` for a model not on a CUDA device."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise ValueError(f"profiling measures a CUDA device, the model is on {dev}")
    n = max(1, min(config.max_prefill_tokens, config.max_model_len, model.max_positions))
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    tokens = torch.zeros(1, n, dtype=torch.long, device=dev)
    positions = torch.arange(n, device=dev)[None]
    real = torch.ones_like(tokens, dtype=torch.bool)
    with torch.inference_mode():
        forward(model, Segment(tokens, positions, full_plan(model.num_layers), real, logits_at=slice(n - 1, n)))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    _, total = torch.cuda.mem_get_info(dev)
    return DeviceMemory(peak, total)


def cache_rows(
    model: SkipModel, config: EngineConfig, cache_schedule: SkipSchedule | None, memory: DeviceMemory
) -> int:
    """Rows of the engine's cache that fit ``memory`` under ``config.gpu_memory_utilization`` (0 if none)."""
    n = config.max_model_len
    sched = cache_schedule or SkipSchedule.full(model.num_layers)
    lens = [min(n, k) for k in layer_slots(sched, config.prompt_limit, config.max_tokens or n)]
    dtype_bytes = next(model.parameters()).element_size()
    per_row = cache_bytes_per_row(lens, model.kv_heads, model.head_dim, dtype_bytes)
    return cache_rows_for_memory(memory.total, memory.peak, per_row, config.gpu_memory_utilization)


def fit_to_gpu(model: SkipModel, config: EngineConfig, cache_schedule: SkipSchedule) -> EngineConfig:
    """``config`` with ``max_num_seqs`` lowered to the rows that ``gpu_memory_utilization`` of the GPU holds
    after the weights and a profiled prompt pass (``skipray.core.profile``). Raises ``ValueError`` when not
    one row of ``max_model_len`` fits."""
    memory = measure(model, config)
    rows = cache_rows(model, config, cache_schedule, memory)
    gib = 1024**3
    if rows < 1:
        left = (memory.total * config.gpu_memory_utilization - memory.peak) / gib
        raise ValueError(
            f"not one cache row of {config.max_model_len} slots fits: {config.gpu_memory_utilization:g} of "
            f"{memory.total / gib:.1f} GiB leaves {left:.2f} GiB after the weights and a profiled prompt pass; "
            "lower max_model_len or raise gpu_memory_utilization"
        )
    logger.info(
        "GPU memory: %.2f GiB in use after a profiled prompt pass of %.1f GiB; %d cache rows fit %g of it",
        memory.peak / gib,
        memory.total / gib,
        rows,
        config.gpu_memory_utilization,
    )
    if rows < config.max_num_seqs:
        logger.warning("max_num_seqs %d lowered to %d: more rows do not fit the GPU", config.max_num_seqs, rows)
        return config.replace(max_num_seqs=rows)
    return config
