"""Linear layers on CPU through oneDNN, with each weight prepacked once (fp32/bf16 inference only).

Contract: ``PackedLinears()(module, x)`` returns ``module(x)``. Where it can, it computes the same
product with oneDNN from a copy of the weight prepacked into oneDNN's blocked layout: a plain
``nn.Linear``, fp32 or bf16 input and weight (one dtype) on the CPU, no autograd (training and LoRA
layers go through the module as usual), a torch built with oneDNN. Otherwise, or if oneDNN fails on
this CPU, it calls the module. A pack is remade when its weight changes (an optimizer step bumps the
tensor's version; ``.to()`` moves its storage), so a model that is trained and then decoded never
reads a stale pack. Results equal ``F.linear``'s up to summation order (about 1e-6 relative in fp32).

Why: on this project's CPU (AVX-512, one thread) ``F.linear`` in fp32 runs MKL's sgemm, and the
prepacked oneDNN kernel ran the default model's matmuls 1.8x faster at batch 1 and 2.3x at batch 8 to
320; in bf16 1.8x at batch 1 and 1.5x at batch 8 (``bench/bench_linear.py``). Hugging Face models
call ``F.linear``. The price is memory: one packed copy of each weight used (538 MB for the default
model in fp32). ``PackedLinears(enabled=False)`` opts out.
"""

from __future__ import annotations

import torch
from torch import nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _stamp(modules: tuple[nn.Module, ...]) -> list[tuple]:
    """What a pack of ``modules`` was made from: per module its parameter dict, weight tensor, storage and
    version, so ``_fresh`` can tell a stale pack with plain reads (no ``nn.Module.__getattr__``)."""
    return [(m._parameters, m._parameters["weight"], m._parameters["weight"].data_ptr(), m._parameters["weight"]._version)
            for m in modules]


def _fresh(stamp: list[tuple]) -> bool:
    """Whether every weight a pack was made from is still its module's, at the same storage and version
    (an optimizer step bumps the version, ``.to()`` moves the storage, assignment replaces the tensor)."""
    return all(d["weight"] is w and w.data_ptr() == ptr and w._version == v for d, w, ptr, v in stamp)


class PackedLinears:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and onednn_available()
        self._packs: dict[nn.Module, tuple[list[tuple], torch.Tensor]] = {}
        self._fused: dict[tuple[nn.Module, ...], tuple[list[tuple], torch.Tensor, torch.Tensor | None, list[int]]] = {}

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
        if hit is None or not _fresh(hit[0]):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any mode
                hit = (_stamp((module,)), torch.ops.mkldnn._reorder_linear_weight(module.weight.detach()))
            self._packs[module] = hit
        return hit[1]

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.usable(module, x):
            return module(x)
        bias = module._parameters["bias"]  # not module.bias: see _stamp
        return self._guarded(lambda: torch.ops.mkldnn._linear_pointwise(x, self.pack(module), bias, "none", [], ""),
                             lambda: module(x))

    def many(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """``[m(x) for m in modules]``: one matmul over the modules' concatenated weights (and biases) when
        every module is usable and all or none have a bias; the outputs are views of its result, split
        along the last dimension. Otherwise each module through ``__call__``."""
        if len(modules) == 1:
            return [self(modules[0], x)]
        hit = self._fused.get(modules)
        if hit is None or not (self.usable(modules[0], x) and _fresh(hit[0])):  # a pack is made from usable modules
            if not all(self.usable(m, x) for m in modules) or len({m.bias is None for m in modules}) > 1:
                return [self(m, x) for m in modules]
            hit = None

        def product() -> list[torch.Tensor]:
            nonlocal hit
            if hit is None:
                with torch.inference_mode(False), torch.no_grad():
                    w = torch.cat([m.weight.detach() for m in modules])  # one dtype: each is usable with x
                    bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
                    hit = self._fused[modules] = (_stamp(modules), torch.ops.mkldnn._reorder_linear_weight(w), bias,
                                                  [m.out_features for m in modules])
            return list(torch.ops.mkldnn._linear_pointwise(x, hit[1], hit[2], "none", [], "").split(hit[3], -1))

        return self._guarded(product, lambda: [m(x) for m in modules])

    def _guarded(self, run, fallback):
        """``run()`` (packing and oneDNN's product); when this oneDNN build cannot run it on this CPU,
        packing is off from then on (the modules themselves) and ``fallback()`` answers."""
        try:
            return run()
        except RuntimeError:
            self.enabled = False
            self.clear()
            return fallback()

    def clear(self) -> None:
        """Drop every pack (frees their memory; they are remade on next use)."""
        self._packs.clear()
        self._fused.clear()

    @property
    def nbytes(self) -> int:
        return (sum(p.numel() * p.element_size() for _, p in self._packs.values())
                + sum(p.numel() * p.element_size() for _, p, _, _ in self._fused.values()))

