"""The decode hot path: a lean layer loop for whole-batch cached inference passes on the CPU.

Contract: ``build_layer_kernels(model, products)`` -> each decoder layer's ``LayerKernels``, built once with
the model's inference weights (``skipray.core.weights``); ``layer_kernels(model, segs, states, cache)`` -> for
each layer of a pass its kernels (``None`` where the pass skips the layer), or ``None`` when the pass does
not qualify; ``run_layers(kernels, h, attend)`` -> the hidden state after those layers. The arithmetic is
the generic loop's (``skipray.core.model._run``): the same norms, the same products (base weights, or the
merged skip-adapter weights where every position uses the adapter) and attention through the caller's
``attend`` (the generic loop's ``skipray.core.attention.attend``: RoPE, cache write, mask,
``scaled_dot_product_attention``). So both loops give the same logits (tests compare them); this one is
shorter per layer: a dozen tensor ops (its gain is measured in docs/benchmarks/performance.md).

A pass qualifies when it has a cache, one segment, no autograd, every running layer on all its rows and
columns, an adapter mask that marks all positions or none, and a Llama-family model (Llama, SmolLM2,
Mistral, Qwen2; not Qwen3's q/k norms) with SiLU, in fp32 or bf16 on the CPU with packing on. Everything
else (training, chunked and mixed passes, rows at different depths, OPT) takes the generic loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from skipray.core.architectures import LlamaFamily, rms_norm
from skipray.core.kernels import Product, apply

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # (layer, q, k, v, scale) -> o


@dataclass
class LayerKernels:
    """What one layer runs: its norms and its products (``skipray.core.kernels.Product``), and the attention shape."""

    index: int
    attn_norm: nn.Module
    qkv: Product
    o: Product
    mlp_norm: nn.Module
    gate_up: Product
    down: Product
    heads: tuple[int, int, int]  # query heads, kv heads, head_dim
    scale: float


def build_layer_kernels(model, products: dict) -> list[LayerKernels] | None:
    """Per decoder layer its ``LayerKernels`` from ``products`` (linear-layer group -> ``Product``, as
    ``skipray.core.weights.InferenceWeights`` builds them), or ``None`` for a model the lean loop does not
    serve: outside the Llama family, Qwen3's q/k norms, an activation other than SiLU, unpacked products."""
    fam = model.family
    if not isinstance(fam, LlamaFamily) or fam.qk_norm or not fam.silu:
        return None
    out = []
    for l, layer in enumerate(model.layers):
        qkv, o, gate_up, down = (products[g] for g in fam.linear_groups(layer))  # q/k/v, o, gate/up, down
        if not all(p.packed for p in (qkv, o, gate_up, down)):
            return None
        heads = (model.num_heads, model.kv_heads, model.head_dim)
        out.append(
            LayerKernels(
                l,
                layer.input_layernorm,
                qkv,
                o,
                layer.post_attention_layernorm,
                gate_up,
                down,
                heads,
                layer.self_attn.scaling,
            )
        )
    return out


def layer_kernels(model, segs: list, states: list, cache) -> list[LayerKernels | None] | None:
    """``model``: a ``SkipModel``; ``segs``/``states``: the pass's segments and their ``_State`` (hidden state
    and adapter mask). -> per layer its kernels (``None``: skipped), or ``None`` when the pass does not
    qualify (module docstring)."""
    weights = model.active_weights()
    if weights is None or weights.layers is None or cache is None or len(segs) != 1:
        return None
    s, st = segs[0], states[0]
    if st.h.device.type != "cpu":
        return None
    b, t = s.tokens.shape
    layers = weights.layers
    if st.adapter is not None and weights.adapted:
        use, every = weights.flags(st.adapter)
        if use:
            if not every or weights.merged_layers is None:  # the low-rank path: the generic loop
                return None
            layers = weights.merged_layers
    out: list[LayerKernels | None] = []
    for l, run in enumerate(s.plan):
        if run is None:
            out.append(None)
            continue
        if hasattr(run, "mlp"):  # a SplitRun (sublayer skipping): the generic loop runs the blocks apart
            return None
        rows, cols = run[0], run[1]
        if (
            (cols is not None and cols < t)
            or not isinstance(rows, slice)
            or rows.step not in (None, 1)
            or (rows.start or 0) != 0
            or (rows.stop is not None and rows.stop < b)
        ):
            return None  # some rows or columns only: the generic loop
        out.append(layers[l])
    return out


def run_layers(kernels: list[LayerKernels | None], h: torch.Tensor, attend: Attend) -> torch.Tensor:
    """``h`` ``(b, t, d)`` through the layers of ``kernels`` (pre-norm attention and gated MLP blocks,
    each added to the residual stream); ``attend(layer, q, k, v, scale)`` with q, k, v as
    ``(b, heads, t, head_dim)`` -> the attention output in the same layout."""
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
