"""Linear layers on CPU through oneDNN, with each weight prepacked once (fp32/bf16 inference only).

Contract: ``PackedLinears()(module, x)`` returns ``module(x)``. Where it can, it computes the same
product with oneDNN from a copy of the weight prepacked into oneDNN's blocked layout: a plain
``nn.Linear``, fp32 or bf16 input and weight (one dtype) on the CPU, no autograd (training and LoRA
layers go through the module as usual), a torch built with oneDNN. Otherwise, or if oneDNN fails on
this CPU, it calls the module. A pack is remade when its weight or bias changes (an optimizer step
bumps the tensor's version; ``.to()`` moves its storage; assignment replaces the tensor), so a model
that is trained and then decoded never reads a stale pack. Writes through ``.data`` bump no version:
after them call ``forget(module)`` or ``clear()`` (``AdapterLinears`` does when peft merges or
unmerges). Results equal ``F.linear``'s up to summation order (about 1e-6 relative in fp32).

Why: Hugging Face models call ``F.linear``, which on the CPU runs MKL's sgemm in fp32; the prepacked
oneDNN kernel computes the same products faster, in fp32 and bf16 (``bench/bench_linear.py``; the
figures are in docs/benchmarks/performance.md). The price is memory: one packed copy of each weight
used. ``PackedLinears(enabled=False)`` opts out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def cpu_bf16_packing() -> bool:
    """Whether oneDNN runs bf16 matmuls from packed weights on this CPU (x86 with AVX-512 BF16 or AMX, or
    the native bf16 of some Arm cores). Where it cannot (AVX2-only x86, for one), ``PackedLinears`` calls
    the module and bf16 matmuls are several times slower than fp32. Probed once, on first use."""
    if not onednn_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except Exception:  # noqa: BLE001 - any refusal means no bf16 packing here
        return False
    return True


CPU_BF16_SLOW = (
    "bfloat16 on this CPU: it has no fast bf16 matmuls (oneDNN cannot pack bf16 weights here; x86 needs "
    "AVX-512 BF16 or AMX), so bf16 runs unpacked and is several times slower than float32 (measured on an "
    "AVX2-only EPYC: 21.0 against 114.9 tokens/s at batch 32). Use float32 on this machine."
)


def stamp(modules: tuple[nn.Module, ...]) -> list[tuple]:
    """What a pack of ``modules`` was made from: per weight and bias its parameter dict, name, tensor, storage
    and version, so ``fresh`` can tell a stale pack with plain reads (no ``nn.Module.__getattr__``)."""
    return [
        (m._parameters, n, t, t.data_ptr(), t._version)
        for m in modules
        for n in ("weight", "bias")
        if (t := m._parameters.get(n)) is not None
    ]


def fresh(stamp: list[tuple]) -> bool:
    """Whether every tensor a pack was made from is still its module's, at the same storage and version
    (an optimizer step bumps the version, ``.to()`` moves the storage, assignment replaces the tensor)."""
    return all(d.get(n) is t and t.data_ptr() == ptr and t._version == v for d, n, t, ptr, v in stamp)


def linked(links: list[tuple[dict, str, object]]) -> bool:
    """Whether each ``(parent._modules, name, module)`` still holds: the parent has not swapped the child."""
    return all(d.get(n) is o for d, n, o in links)


class Pack(NamedTuple):
    """One module's weight, prepacked, and what it was made from."""

    stamp: list[tuple]  # ``stamp((module,))``: ``fresh`` tells when the pack is stale
    weight: torch.Tensor  # oneDNN's blocked layout


class Packed(NamedTuple):
    """A prepacked product for ``PackedLinears.apply``: one module's pack, or one pack of several modules'
    concatenated weights (``splits``: each module's output columns)."""

    stamp: list[tuple]  # what it was made from, as ``stamp(modules)``
    weight: torch.Tensor  # oneDNN's blocked layout
    bias: torch.Tensor | None
    splits: list[int] | None  # None: one module, one output


class PackedLinears:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and onednn_available()
        self._packs: dict[nn.Module, Pack] = {}
        self._fused: dict[tuple[nn.Module, ...], Packed] = {}

    def usable(self, module: nn.Module, x: torch.Tensor) -> bool:
        return (
            self.enabled
            and type(module) is nn.Linear
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and module._parameters["weight"].dtype == x.dtype
            and not torch.is_grad_enabled()
        )

    def pack(self, module: nn.Linear) -> torch.Tensor:
        hit = self._packs.get(module)
        if hit is None or not fresh(hit.stamp):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode
                hit = Pack(stamp((module,)), torch.ops.mkldnn._reorder_linear_weight(module.weight.detach()))
            self._packs[module] = hit
        return hit.weight

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(module, x):
            return module(x)
        bias = module._parameters["bias"]  # not module.bias: see stamp
        return self._guarded(
            lambda: torch.ops.mkldnn._linear_pointwise(x, self.pack(module), bias, "none", [], ""), lambda: module(x)
        )

    def many(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """``[m(x) for m in modules]``: one matmul over the modules' concatenated weights (and biases) when
        every module is usable and all or none have a bias; the outputs are views of its result, split
        along the last dimension. Otherwise each module through ``__call__``."""
        if len(modules) == 1:
            return [self(modules[0], x)]
        hit = self.packed(modules, x)
        if hit is None:
            return [self(m, x) for m in modules]
        return self._guarded(lambda: list(self.apply(x, hit)), lambda: [m(x) for m in modules])

    def packed(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> Packed | None:
        """The prepacked product of ``modules`` for inputs like ``x``, for ``apply``: made on first use and
        remade when stale; ``None`` when they cannot run packed (then: the modules themselves). One module:
        its own pack (``pack``); several: one pack of their concatenated weights."""
        if len(modules) == 1:
            m = modules[0]
            if not self.usable(m, x):
                return None

            def single() -> Packed:
                weight = self.pack(m)
                return Packed(self._packs[m].stamp, weight, m._parameters["bias"], None)

            return self._guarded(single, lambda: None)
        hit = self._fused.get(modules)
        if hit is not None and self.usable(modules[0], x) and fresh(hit.stamp):  # a pack is made from usable modules
            return hit
        if not all(self.usable(m, x) for m in modules) or len({m.bias is None for m in modules}) > 1:
            return None

        def make() -> Packed:
            with torch.inference_mode(False), torch.no_grad():
                w = torch.cat([m.weight.detach() for m in modules])  # one dtype: each is usable with x
                bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
                hit = self._fused[modules] = Packed(
                    stamp(modules),
                    torch.ops.mkldnn._reorder_linear_weight(w),
                    bias,
                    [m.out_features for m in modules],
                )
            return hit

        return self._guarded(make, lambda: None)

    @staticmethod
    def apply(x: torch.Tensor, packed: Packed) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``x`` through a ``packed`` product: one output, or for several modules a view of each's columns."""
        y = torch.ops.mkldnn._linear_pointwise(x, packed.weight, packed.bias, "none", [], "")
        return y if packed.splits is None else y.split(packed.splits, -1)

    def _guarded(self, run, fallback):
        """``run()`` (packing and oneDNN's product); when this oneDNN build cannot run it on this CPU,
        packing is off from then on (the modules themselves) and ``fallback()`` answers."""
        try:
            return run()
        except RuntimeError:
            self.disable()
            return fallback()

    def disable(self) -> None:
        """Packing off from now on (a oneDNN build that cannot run on this CPU), its packs dropped."""
        self.enabled = False
        self.clear()

    def entry(self, modules: tuple[nn.Module, ...]) -> Pack | Packed | None:
        """The cache entry a ``packed(modules, ...)`` answer comes from (``None`` once forgotten or cleared)."""
        return self._packs.get(modules[0]) if len(modules) == 1 else self._fused.get(modules)

    def forget(self, module: nn.Module) -> None:
        """Drop the packs made from ``module`` (alone or fused): for weights changed where tensor versions
        do not show it (writes through ``.data``, as peft's merge does), and for modules that are gone."""
        self._packs.pop(module, None)
        for key in [k for k in self._fused if module in k]:
            del self._fused[key]

    def clear(self) -> None:
        """Drop every pack (frees their memory; they are remade on next use)."""
        self._packs.clear()
        self._fused.clear()

    @property
    def nbytes(self) -> int:
        packs = [*self._packs.values(), *self._fused.values()]
        return sum(p.weight.numel() * p.weight.element_size() for p in packs)
