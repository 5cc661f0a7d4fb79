"""The decode hot path: a lean layer loop for whole-batch cached inference passes on the CPU.

Contract: ``layer_kernels(model, segs, states, cache)`` -> for each layer a ``LayerKernels`` (``None`` where
the pass skips the layer), or ``None`` when the pass does not qualify; ``run_layers(kernels, h, attend)``
-> the hidden state after those layers. The arithmetic is the generic loop's (``skipray.core.model._run``):
the same norms, the same prepacked products (``PackedLinears.packed``, made and checked for staleness as
there) of the same modules (``AdapterLinears.resolve``: base weights, or merged skip-adapter weights where
every position uses the adapter), and attention through the caller's ``attend`` (the generic loop's
``_attend``: RoPE, cache write, mask, ``scaled_dot_product_attention``). So both loops give the same logits
(tests compare them); this one is shorter per layer: one resolution per layer and pass, then a dozen tensor
ops (its gain is measured in docs/benchmarks/performance.md).

A pass qualifies when it has a cache, one segment, no autograd, every running layer on all its rows and
columns, an adapter mask that marks all positions or none, and a Llama-family model (Llama, SmolLM2,
Mistral, Qwen2; not Qwen3's q/k norms) with SiLU, in fp32 or bf16 on the CPU with packing on. Everything
else (training, chunked and mixed passes, rows at different depths, OPT) takes the generic loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from skipray.core.architectures import LlamaFamily, rms_norm
from skipray.core.kernels import Pack, Packed, PackedLinears, fresh, linked
from skipray.core.lora import Dependencies

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # (layer, q, k, v, scale) -> o


@dataclass
class LayerKernels:
    """What one layer runs: its norms and its products (``PackedLinears.packed``), and the attention shape."""

    index: int
    attn_norm: nn.Module
    qkv: Packed
    o: Packed
    mlp_norm: nn.Module
    gate_up: Packed
    down: Packed
    heads: tuple[int, int, int]  # query heads, kv heads, head_dim
    scale: float


class ResolvedLayer(NamedTuple):
    """A layer's kernels as ``SkipModel.fast_layers`` holds them, with what they were resolved from
    (``_still_valid`` checks it on every pass)."""

    kernels: LayerKernels
    dtype: torch.dtype  # of the pass they were resolved for
    links: list[tuple]  # (parent._modules, name, child) of the layer and its submodules
    entries: list[tuple[tuple[nn.Module, ...], Pack | Packed | None]]  # modules run -> PackedLinears' entry
    stamps: list[list[tuple]]  # what each pack was made from
    lora: Dependencies  # what the adapter resolution depends on


def layer_kernels(model, segs: list, states: list, cache) -> list[LayerKernels | None] | None:
    """``model``: a ``SkipModel``; ``segs``/``states``: the pass's segments and their ``_State`` (hidden state
    and adapter mask). -> per layer its kernels (``None``: skipped), or ``None`` when the pass does not
    qualify (module docstring)."""
    fam = model.family
    if cache is None or len(segs) != 1 or torch.is_grad_enabled() or not isinstance(fam, LlamaFamily):
        return None
    if fam.qk_norm or not fam.silu or not model.packed_linears.enabled:
        model.fast_layers.clear()  # packing off (or failed on this CPU): hold no packs
        return None
    s, st = segs[0], states[0]
    x = st.h
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    b, t = s.tokens.shape
    use, every = model.adapter_linears.flags(st.adapter)
    if use and not (every and model.adapter_linears.merge):  # the low-rank path: the general loop
        return None
    out: list[LayerKernels | None] = []
    for l, run in enumerate(s.plan):
        if run is None:
            out.append(None)
            continue
        rows, cols = run[0], run[1]
        if (
            (cols is not None and cols < t)
            or not isinstance(rows, slice)
            or rows.step not in (None, 1)
            or (rows.start or 0) != 0
            or (rows.stop is not None and rows.stop < b)
        ):
            return None  # some rows or columns only: the generic loop
        key = (l, use)  # one entry per layer and adapter use: a dtype change replaces it
        hit = model.fast_layers.get(key)
        if hit is None or hit.dtype != x.dtype or not _still_valid(model, hit):
            hit = _resolve_layer(model, l, use, x)
            if hit is None:
                return None
            model.fast_layers[key] = hit
        out.append(hit.kernels)
    return out


def _resolve_layer(model, l: int, use: bool, x: torch.Tensor) -> ResolvedLayer | None:
    """Layer ``l``'s kernels and what they depend on (``None``: a product cannot run packed)."""
    layer = model.layers[l]
    attn, mlp = layer.self_attn, layer.mlp
    groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))
    runs = [model.adapter_linears.resolve(g, use) for g in groups]
    packs = [model.packed_linears.packed(r, x) for r in runs]
    if any(p is None for p in packs):
        return None
    links = [(model.layers._modules, str(l), layer)] + [
        (parent._modules, name, parent._modules[name])
        for parent, names in (
            (layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
        )
        for name in names
    ]
    entries = [(r, model.packed_linears.entry(r)) for r in runs]  # the packs are still PackedLinears' own
    kernels = LayerKernels(
        l,
        layer.input_layernorm,
        *packs[:2],
        layer.post_attention_layernorm,
        *packs[2:],
        (model.num_heads, model.kv_heads, model.head_dim),
        attn.scaling,
    )
    lora = model.adapter_linears.depends(list(groups), use)
    return ResolvedLayer(kernels, x.dtype, links, entries, [p.stamp for p in packs], lora)


def _still_valid(model, r: ResolvedLayer) -> bool:
    """Whether a layer's kernels still hold: the same layer and submodules, packs that ``PackedLinears``
    still holds, made from the tensors the modules hold now, and the same peft flags and adapter tensors.
    A few plain reads per module, against a dozen ``nn.Module.__getattr__`` calls and checks to resolve
    anew."""
    return (
        linked(r.links)
        and all(model.packed_linears.entry(run) is e for run, e in r.entries)
        and all(fresh(s) for s in r.stamps)
        and model.adapter_linears.fresh(r.lora)
    )


def run_layers(kernels: list[LayerKernels | None], h: torch.Tensor, attend: Attend) -> torch.Tensor:
    """``h`` ``(b, t, d)`` through the layers of ``kernels`` (pre-norm attention and gated MLP blocks,
    each added to the residual stream); ``attend(layer, q, k, v, scale)`` with q, k, v as
    ``(b, heads, t, head_dim)`` -> the attention output in the same layout."""
    apply = PackedLinears.apply
    b, t = h.shape[:2]
    for k in kernels:
        if k is None:
            continue
        nq, nkv, hd = k.heads
        q, key, v = apply(rms_norm(k.attn_norm, h), k.qkv)
        o = attend(
            k.index,
            q.view(b, t, nq, hd).transpose(1, 2),
            key.view(b, t, nkv, hd).transpose(1, 2),
            v.view(b, t, nkv, hd).transpose(1, 2),
            k.scale,
        )
        h = h + apply(o.transpose(1, 2).reshape(b, t, nq * hd), k.o)
        gate, up = apply(rms_norm(k.mlp_norm, h), k.gate_up)
        h = h + apply(F.silu(gate) * up, k.down)
    return h
