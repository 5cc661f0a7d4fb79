"""One decoder layer's pass over the segments of a forward (torch; the layer loop of ``skipray.core.model``).

Contract: ``layer_pass(model, l, layer, segs, states, entries, cache, prefix, part)`` runs layer ``l`` on each
segment ``segs[i]`` where ``entries[i]`` (a ``LayerRun``, a plain ``(rows, cols)`` pair, or ``None``: not run)
says, updating ``states[i].h`` (the residual stream, ``(b, t, d)``) in place of those rows and columns. The
linear layers run once on the tokens of every segment concatenated (``join``; ``part`` splits the result back);
attention runs per segment (``skipray.core.attention.attend``: its own rows, slots and mask). ``part``:
``"both"`` (the whole layer), ``"attn"`` (the attention block only: it writes the cache) or ``"mlp"`` (the MLP
block only: it never touches the cache), so sublayer skipping runs a layer as an attention pass over some rows
and an MLP pass over others. A segment's skip adapter mask applies to the rows it marks. Raises ``ValueError``
for column-limited entries with a cache (columns are for training).
"""

from __future__ import annotations

import torch

from skipray.core.attention import attend


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """``(b_i, t_i, d)`` parts -> one ``(1, sum b_i t_i, d)`` token row (one part: itself)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.reshape(1, p.shape[0] * p.shape[1], p.shape[-1]) for p in parts], 1)


def part(x: torch.Tensor, sizes: list[tuple[int, int]], j: int) -> torch.Tensor:
    """Part ``j`` of a joined ``(1, N, d)`` tensor as ``(b_j, t_j, d)`` (one part: ``x`` itself)."""
    if len(sizes) == 1:
        return x
    off = sum(b * t for b, t in sizes[:j])
    b, t = sizes[j]
    return x[0, off : off + b * t].view(b, t, x.shape[-1])


def heads_part(x: torch.Tensor, sizes: list[tuple[int, int]], j: int) -> torch.Tensor:
    """Part ``j`` of a joined ``(1, heads, N, d)`` tensor as ``(b_j, heads, t_j, d)``."""
    if len(sizes) == 1:
        return x
    off = sum(b * t for b, t in sizes[:j])
    b, t = sizes[j]
    return x[0, :, off : off + b * t].reshape(x.shape[1], b, t, x.shape[-1]).transpose(0, 1)


def layer_pass(model, l: int, layer, segs, states, entries, cache, prefix, part_: str = "both") -> None:
    """Layer ``l`` (``layer``, a module of ``model``, a ``SkipModel``) on the segments' rows ``entries`` say
    (module contract)."""
    runs = []  # (segment, rows, cols, whole, entry); whole: all rows and columns of the segment
    for i, (s, run) in enumerate(zip(segs, entries)):
        if run is None:
            continue
        rows, cols = run[0], run[1]
        t = s.tokens.shape[1]
        cols = t if cols is None else min(cols, t)
        if cols <= 0:
            continue
        if cache is not None and cols != t:
            raise ValueError("column-limited layers are for training; the cache path takes whole columns")
        runs.append((i, rows, cols, isinstance(rows, slice) and rows == slice(None) and cols == t, run))
    if not runs:
        return
    dev = states[runs[0][0]].h.device
    xs = [states[i].h if whole else states[i].h[rows, :cols] for i, rows, cols, whole, _ in runs]
    sizes = [(x.shape[0], x.shape[1]) for x in xs]
    ams = [
        None if states[i].adapter is None else states[i].adapter if whole else states[i].adapter[rows, :cols]
        for i, rows, cols, whole, _ in runs
    ]
    if all(a is None for a in ams):
        am = None
    elif len(ams) == 1:
        am = ams[0]  # the same tensor for every layer on all rows: the inference weights read its flags once
        flags = getattr(runs[0][4], "adapter_flags", None)
        if flags is not None and not runs[0][3] and model.inference_weights is not None:
            model.inference_weights.remember(am, *flags)  # a slice of the mask whose flags the host knows
    else:
        am = join(
            [
                (a if a is not None else torch.zeros(sz, dtype=torch.bool, device=dev))[..., None]
                for a, sz in zip(ams, sizes)
            ]
        )[..., 0]
    x = join(xs)
    if part_ != "mlp":
        q, k, v, scale = model.qkv(layer, model.attn_norm(layer, x), am)
        outs = []
        for j, (i, rows, cols, whole, _) in enumerate(runs):
            qj, kj, vj = (heads_part(y, sizes, j) for y in (q, k, v))
            o = attend(l, segs[i], states[i], rows, cols, whole, qj, kj, vj, scale, cache, prefix)
            outs.append(o.transpose(1, 2).reshape(sizes[j][0], cols, -1))
        x = x + model.attn_out(layer, join(outs), am)
    if part_ != "attn":
        x = x + model.mlp(layer, x, am)
    for j, (i, rows, cols, whole, _) in enumerate(runs):
        st, out = states[i], part(x, sizes, j)
        if whole:
            st.h = out  # the whole batch ran the layer: no copy
            continue
        if torch.is_grad_enabled():
            st.h = st.h.clone()  # keep autograd's saved views of the old h intact
        st.h[rows, :cols] = out
