"""Inference weights, built once: what a pass without gradients runs for the decoder's linear layers and the
lm_head.

Contract: ``InferenceWeights(model, merge=..., pack=...)`` reads a ``SkipModel``'s modules once and holds, per
group of linear layers that read one input (``family.linear_groups(layer)``: Llama's q/k/v, o, gate/up, down;
OPT's q/k/v, out_proj, fc1, fc2), one ``skipray.core.kernels.Product``: on a CPU that can (``can_pack``) the
group's weights fused and prepacked for oneDNN, elsewhere the modules' own tensors (no copy). A group whose
layers carry a skip adapter (a peft LoRA, unmerged and enabled) also holds it: merged into a second product
when ``merge`` (one more copy of the group's weights; every position of the pass uses the adapter), and
always as low-rank factors, added on the positions an adapter mask marks. ``weights(modules, x, adapter)``
-> one output per module, as ``skipray.core.lora.masked_lora`` gives them (tests compare them);
``weights.head(x)``: the lm_head. With ``merge`` off every row runs base plus low-rank whatever its
batch-mates, so its arithmetic does not depend on them (bit-identical tokens alone and batched in bf16).

Nothing is checked on a pass: the weights are what the modules held at build time. After the model's
weights change (training, another adapter, peft's merge, a dtype or device move) build them again
(``SkipModel.build_inference_weights``; an engine's ``Engine.refresh_weights``). A module replaced since
(another decoder layer) raises ``KeyError`` naming the rebuild.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from skipray.core.fastpath import build_layer_kernels
from skipray.core.kernels import Product, apply, can_pack, product
from skipray.core.lora import lora_update

Update = list[tuple[torch.Tensor, torch.Tensor]]  # per active adapter (A (r, d_in), B * scaling (d_out, r))


class Group(NamedTuple):
    """One group of linear layers' inference weights."""

    base: Product
    merged: Product | None  # base plus each layer's adapter update (merge on, some layer adapted)
    updates: tuple[Update, ...] | None  # per layer its low-rank updates; None: no layer has an adapter


class MaskFlags(NamedTuple):
    """``flags``'s answer for the last adapter mask seen."""

    adapter: torch.Tensor
    use: bool  # some position uses the adapter
    every: bool  # every position does


class InferenceWeights:
    def __init__(self, model: nn.Module, merge: bool, pack: bool = True) -> None:
        """Build ``model``'s (a ``SkipModel``) inference weights in its dtype and device: packed where
        ``pack`` and the device can (``can_pack``), the adapter merged where ``merge``. Reads every
        decoder layer's linear layers and the lm_head once."""
        p = next(model.parameters())
        self.dtype, self.device, self.merge = p.dtype, p.device, merge
        self.packed = pack and can_pack(p.device, p.dtype)
        self.groups: dict[tuple[nn.Module, ...], Group] = {}
        for layer in model.layers:
            for modules in model.family.linear_groups(layer):
                self.groups[modules] = self._group(modules)
        self.adapted = any(g.updates is not None for g in self.groups.values())  # some layer has a skip adapter
        head = model.hf.lm_head
        self.head_product = product([head.weight], [head.bias], self.packed, copy=False)
        self.layers = build_layer_kernels(model, {g: w.base for g, w in self.groups.items()})
        self.merged_layers = None
        if self.layers is not None and self.adapted and self.merge:
            self.merged_layers = build_layer_kernels(
                model, {g: w.merged if w.merged is not None else w.base for g, w in self.groups.items()}
            )
        self._last: MaskFlags | None = None

    def _group(self, modules: tuple[nn.Module, ...]) -> Group:
        parts = [lora_update(m) for m in modules]
        bases = [b for b, _ in parts]
        base = product([b.weight for b in bases], [b.bias for b in bases], self.packed, copy=False)
        if not any(u for _, u in parts):
            return Group(base, None, None)
        merged = None
        if self.merge:
            with torch.inference_mode(False), torch.no_grad():
                ws = [b.weight.detach().clone() for b in bases]
                for w, (_, u) in zip(ws, parts):
                    for a, bb, scaling in u:
                        w += (bb @ a).to(w.dtype) * scaling
            merged = product(ws, [b.bias for b in bases], self.packed)
        with torch.inference_mode(False), torch.no_grad():
            updates = tuple([(a.clone(), bb * scaling) for a, bb, scaling in u] for _, u in parts)
        return Group(base, merged, updates)

    @property
    def nbytes(self) -> int:
        """Bytes held besides the model's own parameters: packed copies, merged weights, low-rank factors."""
        total = self.head_product.nbytes
        for g in self.groups.values():
            total += g.base.nbytes + (g.merged.nbytes if g.merged is not None else 0)
            for u in g.updates or ():
                total += sum(t.numel() * t.element_size() for pair in u for t in pair)
        return total

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The lm_head on ``x`` ``(..., d)`` -> logits ``(..., vocab)``."""
        return apply(x, self.head_product)

    def __call__(
        self, modules: tuple[nn.Module, ...], x: torch.Tensor, adapter: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``[m(x) for m in modules]`` with each layer's adapter update where ``adapter`` (bool ``x.shape[:-1]``)
        marks (module docstring); where fused, views of one result. Raises ``KeyError`` for modules that
        were not in the model when the weights were built."""
        g = self.groups.get(modules)
        if g is None:
            raise KeyError("these layers are not in the inference weights: the model changed; rebuild them")
        if adapter is None or g.updates is None:
            return _outputs(apply(x, g.base))
        use, every = self.flags(adapter)
        if not use:
            return _outputs(apply(x, g.base))
        if every and g.merged is not None:
            return _outputs(apply(x, g.merged))
        ys = _outputs(apply(x, g.base))  # some positions use the adapter (or merge is off): the base, plus
        mask = adapter[..., None].to(ys[0].dtype)  # the low-rank update on those positions
        for y, update in zip(ys, g.updates):
            for a, b in update:
                y.addcmul_(F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype), mask)
        return ys

    def remember(self, adapter: torch.Tensor, use: bool, every: bool) -> None:
        """Take the (any, all) flags of ``adapter`` from the caller, who knows them without reading the
        device (the engine's decode step)."""
        self._last = MaskFlags(adapter, use, use and every)

    def flags(self, adapter: torch.Tensor) -> tuple[bool, bool]:
        """(any, all) of the adapter mask, remembered for the last mask seen: a pass hands every linear
        layer of a layer (and, on whole batches, of every layer) the same mask tensor, and each check is a
        device read. Masks are never changed in place."""
        last = self._last
        if last is None or last.adapter is not adapter:
            use = bool(adapter.any())
            last = self._last = MaskFlags(adapter, use, use and bool(adapter.all()))
        return last.use, last.every


def _outputs(y: torch.Tensor | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(y) if isinstance(y, tuple) else [y]
