"""Linear products for inference: one or several linear layers' weights fused into one matmul, prepacked for
oneDNN on a CPU that can run it.

Contract: ``product(weights, biases, pack)`` builds a ``Product`` once from plain ``(out, in)`` weights (and
optional biases) that read the same input; ``apply(x, p)`` computes ``x @ W.T + b`` for ``x`` ``(..., in)``:
one output, or for several weights a view of each one's columns (``p.splits``). With ``pack`` (see
``can_pack``) the concatenated weight is reordered once into oneDNN's blocked layout and every product runs
``mkldnn._linear_pointwise``; otherwise ``F.linear``. Results equal ``F.linear``'s up to summation order
(about 1e-6 relative in fp32). A ``Product`` is a copy: it never changes when the modules it was made from
do (``skipray.core.weights`` rebuilds them on request).

Why: Hugging Face models call ``F.linear``, which on the CPU runs MKL's sgemm in fp32; the prepacked oneDNN
kernel computes the same products faster, in fp32 and bf16 (``bench/bench_linear.py``; the figures are in
docs/benchmarks/performance.md), and one matmul over q/k/v (or gate/up) reads the input once. The price is
memory: one packed copy of each weight.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def cpu_bf16_packing() -> bool:
    """Whether oneDNN runs bf16 matmuls from packed weights on this CPU (x86 with AVX-512 BF16 or AMX, or
    the native bf16 of some Arm cores). Where it cannot (AVX2-only x86, for one), bf16 runs unpacked and is
    several times slower than fp32. Probed once, on first use."""
    if not onednn_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except Exception:  # noqa: BLE001 - any refusal means no bf16 packing here
        return False
    return _runs_packed(torch.bfloat16)


@functools.cache
def _runs_packed(dtype: torch.dtype) -> bool:
    """Whether a packed product in ``dtype`` runs on this CPU (packing one weight and multiplying with it)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 16, dtype=dtype), w, None, "none", [], "")
    except Exception:  # noqa: BLE001 - any refusal means no packing here
        return False
    return True


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products in ``dtype`` on ``device`` run prepacked: a CPU, fp32 or bf16, a torch built with
    oneDNN, and (probed once per dtype) a CPU on which oneDNN runs them."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or not onednn_available():
        return False
    return cpu_bf16_packing() if dtype == torch.bfloat16 else _runs_packed(dtype)


CPU_BF16_SLOW = (
    "bfloat16 on this CPU: it has no fast bf16 matmuls (oneDNN cannot pack bf16 weights here; x86 needs "
    "AVX-512 BF16 or AMX), so bf16 runs unpacked and is several times slower than float32 (measured on an "
    "AVX2-only EPYC: 21.0 against 114.9 tokens/s at batch 32). Use float32 on this machine."
)


class Product(NamedTuple):
    """Linear layers that read one input, as one matmul (``apply``), or unpacked several as theirs (``parts``)."""

    weight: torch.Tensor | None  # (sum of out, in), or oneDNN's blocked layout of it; None: see parts
    bias: torch.Tensor | None  # (sum of out,), zeros for a layer without one
    splits: tuple[int, ...] | None  # each layer's output columns; None: one layer, one output
    packed: bool
    parts: tuple[tuple[torch.Tensor, torch.Tensor | None], ...] | None = None  # unpacked layers' own (w, b)
    owned: bool = True  # holds copies (False: the layers' own tensors, no memory of its own)

    @property
    def nbytes(self) -> int:
        """Bytes this product holds besides the layers' own tensors."""
        if not self.owned:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


def product(weights: list[torch.Tensor], biases: list[torch.Tensor | None], pack: bool, copy: bool = True) -> Product:
    """One ``Product`` of ``weights`` (each ``(out_i, in)``, one dtype and device) and their ``biases`` (``None``
    where a layer has none; all ``None``: no bias), prepacked and fused when ``pack``. Copies, so later
    changes to the given tensors do not reach it, except unpacked with ``copy=False``: then it runs the given
    tensors themselves, one matmul each (fusing them would cost a copy; on a GPU memory is the scarce part)."""
    if not pack and not copy:
        if len(weights) == 1:
            return Product(weights[0].detach(), _detach(biases[0]), None, False, owned=False)
        parts = tuple((w.detach(), _detach(b)) for w, b in zip(weights, biases))
        return Product(None, None, None, False, parts, owned=False)
    with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable in any mode
        w = torch.cat([t.detach() for t in weights]) if len(weights) > 1 else weights[0].detach()
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b.detach() if b is not None else torch.zeros(t.shape[0], dtype=t.dtype, device=t.device)
                    for t, b in zip(weights, biases)
                ]
            )
        if pack:
            w = torch.ops.mkldnn._reorder_linear_weight(w)  # a new tensor in oneDNN's layout
        elif len(weights) == 1:
            w = w.clone()  # a copy, as for several layers (their concatenation)
    splits = tuple(t.shape[0] for t in weights) if len(weights) > 1 else None
    return Product(w, bias, splits, pack)


def apply(x: torch.Tensor, p: Product) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``x`` ``(..., in)`` through ``p``: ``(..., out)``, or for several layers a view of each one's columns."""
    if p.parts is not None:
        return tuple(F.linear(x, w, b) for w, b in p.parts)
    if p.packed:
        y = torch.ops.mkldnn._linear_pointwise(x, p.weight, p.bias, "none", [], "")
    else:
        y = F.linear(x, p.weight, p.bias)
    return y if p.splits is None else y.split(p.splits, -1)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
