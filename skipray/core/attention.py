"""Attention of one segment's rows in a pass: RoPE, the KV-cache write and read, the mask, and the kernel.

Contract: ``attend(l, seg, state, rows, cols, whole, q, k, v, scale, cache, prefix)`` -> layer ``l``'s
attention output ``(b, heads, cols, head_dim)`` for rows ``rows`` and columns ``:cols`` of a segment
(``skipray.core.model.Segment``; ``state`` its per-pass ``_State``: rotary tables, causal and diagonal
masks, the pass's slot span): with a cache, ``k``/``v`` are written at the rows' slots and attention reads
the slots those rows hold (``KVCache.write`` raises ``IndexError`` past a layer's slots); without one,
causal attention over the columns, after ``prefix``'s prompt when given. ``attention(q, k, v, mask,
scale)`` is ``scaled_dot_product_attention`` with grouped-query heads; ``expand_kv`` repeats K/V heads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from skipray.core.architectures import apply_rope
from skipray.core.cache import KVCache


def compose_rows(outer: slice | torch.Tensor, inner: slice | torch.Tensor, n: int, dev) -> slice | torch.Tensor:
    """Cache rows of forward rows ``inner`` when forward row ``i`` is cache row ``outer[i]``."""
    if isinstance(outer, slice) and isinstance(inner, slice) and outer.step is None and inner.step is None:
        o0, (i0, i1, _) = outer.start or 0, inner.indices(n)
        return slice(o0 + i0, o0 + i1)
    outer_t = torch.arange(n, device=dev) + (outer.start or 0) if isinstance(outer, slice) else outer
    return outer_t[inner]


class KeptMask(NamedTuple):
    """A pass's mask for some rows (``cached_mask``)."""

    rows: slice | torch.Tensor  # kept alive, so its id (in the key) stays unique during the pass
    mask: torch.Tensor


def cached_mask(
    st, cache: KVCache, rows: slice | torch.Tensor, cache_rows: slice | torch.Tensor, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """The ``(b, 1, t, n)`` additive attention mask (0 or -inf, in ``dtype``) of a cached pass's ``rows``
    over their first ``n`` slots: slots that hold real tokens (``valid``) up to each query's slot, and the
    query's own slot. Every layer that runs these rows in this pass gets the same mask (a layer that runs
    a row has just written it through the query slots, and ran at every earlier slot since schedules only
    ever drop layers), so it is made once per pass per ``(rows, n)``, not once per layer."""
    key = (rows.start, rows.stop, rows.step, n) if isinstance(rows, slice) else (id(rows), n)
    hit = st.masks.get(key)
    if hit is None:
        m = (cache.valid[cache_rows, :n][:, None, :] & st.causal[rows][..., :n]) | st.diag[rows][..., :n]
        additive = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
        hit = st.masks[key] = KeptMask(rows, additive[:, None])
    return hit.mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` (grouped-query when ``k`` has fewer heads than ``q``: ``enable_gqa``
    on a CPU, K/V expanded on a GPU so that a fused kernel runs with the mask). bf16 on the CPU runs it in
    fp32: faster there than this torch's bf16 CPU kernel (docs/benchmarks/performance.md), and more exact."""
    gqa = k.shape[1] != q.shape[1]
    if gqa and q.device.type != "cpu":  # a GPU: K/V expanded to the query heads, so the fused
        k, v = expand_kv(k, v, q.shape[1])  # memory-efficient kernel takes the mask (with enable_gqa it
        gqa = False  # falls back to the unfused math kernel)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        o = F.scaled_dot_product_attention(
            q.float(),
            k.float(),
            v.float(),
            attn_mask=mask.float() if mask.is_floating_point() else mask,
            scale=scale,
            enable_gqa=gqa,
        )
        return o.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped K/V ``(b, kv_heads, s, d)`` repeated to ``heads`` query heads (query head ``h`` reads K/V head
    ``h // (heads // kv_heads)``, as ``enable_gqa`` does)."""
    group = heads // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def attend(
    l: int,
    s,
    st,
    rows,
    cols: int,
    whole: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    cache: KVCache | None,
    prefix: KVCache | None,
) -> torch.Tensor:
    """Layer ``l``'s attention for rows ``rows`` and columns ``:cols`` of segment ``s`` (``whole``: all of
    them): RoPE, then with a cache the write of ``k``/``v`` and attention over the rows' slots, without one
    causal attention over the columns (after ``prefix``'s prompt). -> ``(b, heads, cols, head_dim)``."""
    dev = q.device
    if st.rope is not None:
        cos, sin = st.rope if whole else (st.rope[0][rows, :, :cols], st.rope[1][rows, :, :cols])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    b = s.tokens.shape[0]
    if cache is not None:
        cr = compose_rows(s.cache_rows, rows, b, dev)
        start = s.start if isinstance(s.start, int) else s.start[rows]
        end = getattr(s.plan[l], "end", None)  # these rows' last slot + 1 when the host knows it
        end = st.end if end is None and whole else end  # else the pass's end (None: read from the slots)
        cache.write(l, cr, start, k, v, end=end)
        k, v = cache.buffers(l, cr, st.end)  # a layer's cache may be shorter than the pass's span
        cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # see attention
        mask = cached_mask(st, cache, rows, cr, k.shape[2], torch.float32 if cpu_bf16 else q.dtype)
    else:
        idx = torch.arange(cols, device=dev)
        causal_t = idx[None, :, None] >= idx[None, None, :]
        mask = (s.real[rows, None, :cols] & causal_t) | torch.eye(cols, dtype=torch.bool, device=dev)
        if prefix is not None:
            pk, pv, readable = prefix.keys(l, compose_rows(slice(None), rows, b, dev), st.prefix_len)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            mask = torch.cat([readable[:, None, :].expand(-1, cols, -1), mask], -1)
        mask = mask[:, None]
    return attention(q, k, v, mask, scale)
