"""Decode steps in static shapes, and their CUDA graphs (torch only).

A decode pass's shapes change every step: the batch grows and shrinks, and attention reads one more cache slot
each time. ``static_decode`` pads the step to a *batch size* from ``batch_sizes(max_num_seqs)`` (1, 2, 4, 8, then
multiples of 8: vLLM's capture sizes) and attention to a *slot bucket* (the cache end rounded up to
``SLOT_BUCKET`` slots), so that every step inside one bucket has the same shapes: ``torch.compile`` then builds one
graph per bucket and a GPU can capture and replay the pass as one CUDA graph (one launch instead of thousands).

Contract:

* ``static_decode(tokens, slots, adapter, layer_rows, rows_in_use, layer_lens, max_rows, to_device)`` -> a
  ``StaticDecode`` (its ``Segment`` over cache rows ``0..B-1`` and the shape ``key``), or ``None`` when the step
  cannot take static shapes: rows at different depths (a layer that runs on some rows only), sublayer skipping
  (attention and MLP of a layer on different rows), more rows than the
  largest batch size or the cache, or rows past the decoding ones in use (a prompt being prefilled there). Padding
  rows ``n..B-1`` are free cache rows: they decode token 0 at slot 0 (which a new request's prompt overwrites
  before anything reads it) and their logits are dropped. Raises ``IndexError`` when a row's slot lies past a
  layer's cache (as ``KVCache.write`` would).
* ``DecodeGraphs(model, cache)``: ``run(static)`` -> the logits ``(B, 1, vocab)`` of a static decode segment,
  replaying the CUDA graph captured for its ``key`` (captured on first use, after a warm-up pass; every graph
  shares one memory pool and writes its logits into one buffer, valid until the next ``run``). At most
  ``MAX_GRAPHS`` graphs are captured; beyond them, and for a shape whose capture failed (logged once; e.g. an op
  that syncs), the pass runs eagerly. The graphs hold the cache's and the weights' addresses: ``clear()`` them
  when either is replaced (``ModelRunner.ensure_cache``, ``Engine.refresh_weights``). CUDA only.

The padded pass gives the live rows the logits the unpadded pass gives them (each row's attention reads only its
own cache row, masked by its own slot), up to the summation order of matmuls over a different batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from skipray.core.model import LayerRun, Segment, forward_segments

logger = logging.getLogger(__name__)

SLOT_BUCKET = 128  # attention reads the cache in multiples of this many slots on a static pass
MAX_GRAPHS = 64  # captured decode shapes per engine; each holds its own activations in the shared pool


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The static batch sizes up to ``max_num_seqs``: 1, 2, 4, 8, 16, 24, 32, ... and ``max_num_seqs`` itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


@dataclass
class StaticDecode:
    """One decode step in static shapes: ``segment`` over rows ``0..B-1`` (the first ``n`` live), and ``key``
    (everything a graph of it depends on besides the inputs' values)."""

    segment: Segment
    n: int
    key: tuple


def static_decode(
    tokens: Sequence[int],
    slots: Sequence[int],
    adapter: Sequence[bool],
    layer_rows: Sequence[Sequence[int]],
    rows_in_use: int,
    layer_lens: Sequence[int],
    max_rows: int,
    to_device: Callable[[Sequence, torch.dtype], torch.Tensor],
) -> StaticDecode | None:
    """The decode step of rows ``0..n-1`` (``tokens``, ``slots``, ``adapter`` per row; ``layer_rows[l]``: the rows
    that run layer ``l``) in static shapes, or ``None`` where it cannot be (module contract)."""
    n = len(tokens)
    if n == 0 or rows_in_use != n or any(isinstance(r, tuple) or (r and len(r) != n) for r in layer_rows):
        return None
    size = next((s for s in batch_sizes(max_rows) if s >= n), None)
    if size is None:
        return None
    end = max(slots) + 1
    for l, r in enumerate(layer_rows):
        if r and end > layer_lens[l]:
            raise IndexError(
                f"layer {l} holds {layer_lens[l]} slots per row but a write reaches slot {end - 1}: this cache "
                f"was sized for a schedule that never runs layer {l} there (see skipray.core.memory.layer_slots)"
            )
    bucket = -(-end // SLOT_BUCKET) * SLOT_BUCKET
    pad = size - n
    am = list(adapter) + [bool(adapter[0])] * pad  # padding rows follow row 0, so the flags stay the batch's
    flags = (any(am), all(am))
    plan = [
        LayerRun(slice(None), None, flags, min(bucket, layer_lens[l])) if r else None for l, r in enumerate(layer_rows)
    ]
    tok = to_device(list(tokens) + [0] * pad, torch.long)[:, None]
    start = to_device(list(slots) + [0] * pad, torch.long)
    seg = Segment(
        tok,
        start[:, None],
        plan,
        torch.ones_like(tok, dtype=torch.bool),
        cache_rows=slice(0, size),
        start=start,
        adapter=to_device(am, torch.bool)[:, None],
        adapter_flags=flags,
        end=bucket,
    )
    key = (size, bucket, flags, tuple(bool(r) for r in layer_rows))
    return StaticDecode(seg, n, key)


class DecodeGraphs:
    """CUDA graphs of static decode passes, one per shape key (module contract)."""

    def __init__(self, model, cache) -> None:
        self.model, self.cache = model, cache
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph, its input segment)
        self.failed: set[tuple] = set()  # keys whose capture raised: run eagerly
        self.pool = None
        self.logits: torch.Tensor | None = None  # (rows, 1, vocab): every graph writes its logits here

    def clear(self) -> None:
        """Forget every graph (the cache or the weights they read were replaced)."""
        self.graphs.clear()
        self.failed.clear()
        self.pool = self.logits = None

    def run(self, static: StaticDecode) -> torch.Tensor:
        """The logits ``(B, 1, vocab)`` of ``static.segment``: its inputs copied into the graph's, one replay (or an
        eager pass: module contract)."""
        key = static.key
        hit = self.graphs.get(key)
        if hit is None and key not in self.failed and len(self.graphs) < MAX_GRAPHS:
            try:
                with torch.cuda.device(static.segment.tokens.device):
                    hit = self.graphs[key] = self._capture(static.segment)
            except Exception as e:  # noqa: BLE001 - this shape runs eagerly from now on
                self.failed.add(key)
                logger.warning("CUDA graph capture failed for decode shape %s (%r); running it eagerly", key, e)
        if hit is None:
            return forward_segments(self.model, [static.segment], self.cache)[0]
        graph, seg = hit
        seg.tokens.copy_(static.segment.tokens, non_blocking=True)
        seg.start.copy_(static.segment.start, non_blocking=True)
        seg.adapter.copy_(static.segment.adapter, non_blocking=True)
        graph.replay()
        return self.logits[: seg.tokens.shape[0]]

    def _capture(self, seg: Segment) -> tuple:
        """Capture the pass over ``seg``'s own input tensors (a warm-up pass first, on a side stream, as CUDA graph
        capture requires; the cache writes are idempotent, so the warm-up and the capture change nothing)."""
        seg = Segment(
            seg.tokens.clone(),
            seg.start[:, None].clone(),
            seg.plan,
            seg.real.clone(),
            cache_rows=seg.cache_rows,
            start=seg.start.clone(),
            adapter=seg.adapter.clone(),
            adapter_flags=seg.adapter_flags,
            end=seg.end,
        )
        seg.positions = seg.start[:, None]  # a view: the positions follow the slots copied in
        b = seg.tokens.shape[0]

        if self.logits is None:  # outside the pool, on the current stream: one buffer for every graph's logits
            shape = (self.cache.max_batch, 1, self.model.vocab_size)
            self.logits = torch.empty(shape, dtype=self.cache.k[0].dtype, device=seg.tokens.device)

        def step() -> None:
            self.logits[:b].copy_(forward_segments(self.model, [seg], self.cache)[0])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        return graph, seg
