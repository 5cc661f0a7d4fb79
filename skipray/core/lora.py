"""The skip adapter's linear layers: a peft LoRA applied only where an adapter mask marks.

Contract: ``AdapterLinears(packed_linears)(modules, x, adapter)`` returns ``[m(x) for m in modules]`` for
linear layers that read the same input ``x`` (``(..., d_in)``), where a peft LoRA layer adds its update
only at the positions ``adapter`` (bool, ``x.shape[:-1]``) marks, and its base layer alone elsewhere: the
skip adapter changes the generated positions of a skipping schedule and nothing else, so prompts and
full-depth requests see the base model exactly. ``packed_linears`` (``skipray.core.kernels.PackedLinears``)
runs the matmuls.

* Training (autograd on): LoRA as peft computes it, masked; gradients reach the LoRA weights.
* Inference: the modules run as one matmul where they can (``PackedLinears.many``): the base weights;
  or, where every position uses the adapter and ``merge`` allows it, merged weights (base plus update,
  made once and cached); otherwise (some positions use it, or ``merge`` is off) the base plus a cached
  low-rank update on the positions that do, so with ``merge`` off a row's arithmetic does not depend on
  its batch-mates.
  Cached weights are remade when the weights they come from change (tensor versions), so a model that
  is trained and then decoded never reads stale weights. ``merges`` holds the merged layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from skipray.core.kernels import PackedLinears, fresh, linked, stamp


class Dependencies(NamedTuple):
    """What ``resolve`` answers depend on, for ``AdapterLinears.fresh``."""

    loras: list[tuple[nn.Module, tuple]]  # each LoRA layer with its peft flags (``_peft_flags``)
    links: list[tuple]  # (parent._modules, name, child) of base layers and adapter submodules (``linked``)
    stamps: list[tuple]  # what merged weights were made from (``skipray.core.kernels.stamp``)


class Resolved(NamedTuple):
    """One ``resolve`` answer: the modules to run, and what they depend on."""

    deps: Dependencies
    run: tuple[nn.Module, ...]


class Cached(NamedTuple):
    """A weight made from a LoRA layer (``_from_weights``), with the key of the weights it was made from."""

    key: tuple  # (each weight's (data_ptr, version), each adapter's scaling)
    value: Any  # a merged ``nn.Linear``, or the ``[(A, B * scaling)]`` low-rank updates


class MaskFlags(NamedTuple):
    """``flags``'s answer for the last adapter mask seen."""

    adapter: torch.Tensor
    use: bool  # some position uses the adapter
    every: bool  # every position does


class AdapterLinears:
    def __init__(self, packed_linears: PackedLinears) -> None:
        self.packed_linears = packed_linears
        self.merges: dict[nn.Module, Cached] = {}  # LoRA layer -> merged weights
        self.low_ranks: dict[nn.Module, Cached] = {}  # LoRA layer -> [(A, B * scaling)]
        self._last: MaskFlags | None = None  # see flags
        self._resolved: dict[tuple, Resolved] = {}  # (modules, merged) -> Resolved
        self.merge = True  # positions that all use the adapter may run merged weights (EngineConfig.merge_adapter)

    def __call__(
        self, modules: tuple[nn.Module, ...], x: torch.Tensor, adapter: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """-> one output per module (the module docstring's rules; where fused, views of one result).
        Raises what the modules or the matmul raise."""
        if torch.is_grad_enabled():  # training: LoRA as peft computes it, masked
            return [self._train(m, x, adapter) for m in modules]
        use, every = self.flags(adapter)
        if not use or (every and self.merge):  # one matmul: base weights, or merged ones where every position
            return self.packed_linears.many(self.resolve(modules, use), x)  # uses the adapter
        ys = self.packed_linears.many(self.resolve(modules, False), x)  # some positions use the adapter: the base,
        mask = adapter[..., None].to(ys[0].dtype)  # plus the low-rank update on those positions
        for y, m in zip(ys, modules):
            if hasattr(m, "base_layer") and not m.merged and not m.disable_adapters:
                for a, b in self._low_rank(m):
                    y.addcmul_(F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype), mask)
        return ys

    def resolve(self, modules: tuple[nn.Module, ...], merged: bool) -> tuple[nn.Module, ...]:
        """What runs for ``modules`` at positions that all use the adapter (``merged``) or none do: each
        module's merged weights (``_merged``) where its adapter is on and ``merged``, else its base layer
        (the module itself when it is not a LoRA layer). Cached with what the answer depends on (each
        LoRA layer's peft flags and active adapters; each merged weight's tensor, storage and version),
        which ``fresh`` checks on every call with a few plain reads per module, where resolving anew
        reads a dozen submodules through ``nn.Module.__getattr__`` (with the packs' own checks, that made
        the shipped default's batch-1 bf16 decode ~12% slower)."""
        key = (modules, merged)
        if self.still_resolved(modules, merged):
            return self._resolved[key].run
        old = self._resolved.get(key)
        for m, flags in old.deps.loras if old else ():
            if self._peft_flags(m) != flags:  # peft merged or unmerged through .data: no version bump
                self.packed_linears.forget(m.base_layer)
        lora = [merged and hasattr(m, "base_layer") and not m.merged and not m.disable_adapters for m in modules]
        run = tuple(self._merged(m) if on else getattr(m, "base_layer", m) for m, on in zip(modules, lora))
        loras = [(m, self._peft_flags(m)) for m in modules if hasattr(m, "lora_A")]
        inputs = [o for m, on in zip(modules, lora) if on for o in self._merge_inputs(m)]
        links = [(m._modules, "base_layer", m.base_layer) for m, _ in loras] + [
            (d._modules, n, d[n])
            for m, on in zip(modules, lora)
            if on
            for n in self._names(m)
            for d in (m.lora_A, m.lora_B)
        ]
        self._resolved[key] = Resolved(Dependencies(loras, links, stamp(tuple(inputs))), run)
        return run

    def still_resolved(self, modules: tuple[nn.Module, ...], merged: bool) -> bool:
        """Whether ``resolve(modules, merged)`` has an answer that nothing it depends on has changed since."""
        hit = self._resolved.get((modules, merged))
        return hit is not None and self.fresh(hit.deps)

    def depends(self, groups: list[tuple[nn.Module, ...]], merged: bool) -> Dependencies:
        """What the (made) answers of ``resolve(modules, merged)`` for each of ``groups`` depend on, for one
        ``fresh`` call."""
        deps = [self._resolved[(g, merged)].deps for g in groups]
        return Dependencies(
            [x for d in deps for x in d.loras], [x for d in deps for x in d.links], [x for d in deps for x in d.stamps]
        )

    @staticmethod
    def _peft_flags(m: nn.Module) -> tuple:
        return m.merged, m.disable_adapters, tuple(m.active_adapters)

    def fresh(self, deps: Dependencies) -> bool:
        """Whether a ``resolve`` answer still holds: the LoRA layers' peft flags and active adapters are
        as they were, their base layers and adapter submodules are the same modules, and each weight it
        read is still its module's, at the same storage and version."""
        for m, flags in deps.loras:
            if self._peft_flags(m) != flags:
                return False
        return linked(deps.links) and fresh(deps.stamps)

    @staticmethod
    def _names(module: nn.Module) -> list[str]:
        return [n for n in module.active_adapters if n in module.lora_A]

    @staticmethod
    def _merge_inputs(module: nn.Module) -> list[nn.Module]:
        """The modules whose weights a merge of ``module`` reads: its base layer and each active adapter's A and B."""
        return [module.base_layer] + [
            w for n in AdapterLinears._names(module) for w in (module.lora_A[n], module.lora_B[n])
        ]

    def remember(self, adapter: torch.Tensor, use: bool, every: bool) -> None:
        """Take the (any, all) flags of ``adapter`` from the caller, who knows them without reading the
        device (the engine's decode step)."""
        self._last = MaskFlags(adapter, use, use and every)

    def flags(self, adapter: torch.Tensor | None) -> tuple[bool, bool]:
        """(any, all) of the adapter mask, remembered for the last mask seen: a pass hands every linear
        layer of a layer (and, on whole batches, of every layer) the same mask tensor, and each check
        is a device read. Masks are never changed in place."""
        if adapter is None:
            return False, False
        last = self._last
        if last is None or last.adapter is not adapter:
            use = bool(adapter.any())
            last = self._last = MaskFlags(adapter, use, use and bool(adapter.all()))
        return last.use, last.every

    def _train(self, module: nn.Module, x: torch.Tensor, adapter: torch.Tensor | None) -> torch.Tensor:
        base = getattr(module, "base_layer", None)
        if base is None:
            return self.packed_linears(module, x)
        y = self.packed_linears(base, x)
        if adapter is None or module.merged or module.disable_adapters or not bool(adapter.any()):
            return y
        for name in module.active_adapters:
            if name in module.lora_A:
                d = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](x))) * module.scaling[name]
                y = y + (d if bool(adapter.all()) else d * adapter[..., None].to(d.dtype))
        return y

    def _from_weights(self, store: dict, module: nn.Module, with_base: bool, make):
        """``make(names)`` for ``module``'s active LoRA adapters, cached in ``store`` and remade when the
        weights it reads change (tensor versions), so training then decoding never reads stale weights.
        Built outside inference mode: normal tensors, usable in any mode."""
        names = self._names(module)
        parts = [
            t
            for m in self._merge_inputs(module)[(0 if with_base else 1) :]
            for t in (m.weight, m.bias)
            if t is not None
        ]
        key = (tuple((p.data_ptr(), p._version) for p in parts), tuple(module.scaling[n] for n in names))
        hit = store.get(module)
        if hit is None or hit.key != key:
            if hit is not None and isinstance(hit.value, nn.Module):
                self.packed_linears.forget(hit.value)  # the replaced merged layer's pack goes with it
            with torch.inference_mode(False), torch.no_grad():
                hit = store[module] = Cached(key, make(names))
        return hit.value

    def _low_rank(self, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per active LoRA adapter of ``module``: ``(A, B * scaling)`` for the inference update
        ``x @ A.T @ (B * scaling).T`` (LoRA, Hu et al. 2021, arXiv 2106.09685, eq. 3; dropout is the
        identity at inference). Cached by ``_from_weights``."""
        return self._from_weights(
            self.low_ranks,
            module,
            False,
            lambda names: [
                (module.lora_A[n].weight.detach().clone(), module.lora_B[n].weight.detach() * module.scaling[n])
                for n in names
            ],
        )

    def _merged(self, module: nn.Module) -> nn.Linear:
        """The LoRA layer's base weight plus its update, as one ``nn.Linear`` (inference only: decode
        steps where every row uses the adapter then cost what the base model costs). Cached by
        ``_from_weights``. Memory: one more copy of each adapted weight (its prepacked copy too, on CPU)."""

        def make(names: list[str]) -> nn.Linear:
            base = module.base_layer
            w = base.weight.detach().clone()
            for n in names:
                w += (module.lora_B[n].weight @ module.lora_A[n].weight).to(w.dtype) * module.scaling[n]
            merged = nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype
            ).requires_grad_(False)
            merged.weight.copy_(w)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
            return merged

        return self._from_weights(self.merges, module, True, make)
