"""The skip adapter's linear layers on the module path: a peft LoRA applied only where an adapter mask marks.

Contract: ``masked_lora(modules, x, adapter)`` returns ``[m(x) for m in modules]`` for linear layers that read
the same input ``x`` (``(..., d_in)``), where a peft LoRA layer adds its update only at the positions
``adapter`` (bool, ``x.shape[:-1]``; ``None``: nowhere) marks, and its base layer alone elsewhere: the skip
adapter changes the generated positions of a skipping schedule and nothing else, so prompts and full-depth
requests see the base model exactly. It calls the modules (peft's own layers), so gradients reach the LoRA
weights: this is the training path, and the path of any pass on a model whose inference weights are not
built. ``lora_update(module)`` reads a LoRA layer's active adapters for the inference weights
(``skipray.core.weights``), which hold them merged or as low-rank factors.
"""

from __future__ import annotations

import torch
from torch import nn


def lora_update(module: nn.Module) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """``module``'s base linear layer and, per active adapter, ``(A, B, scaling)`` with ``A`` ``(r, d_in)`` and
    ``B`` ``(d_out, r)``: the update ``scaling * x @ A.T @ B.T`` (LoRA, Hu et al. 2021, arXiv 2106.09685,
    eq. 3; dropout is the identity at inference). A plain layer, or a LoRA layer that peft has merged or
    disabled, has no update: ``(module or its base layer, [])``. Detached."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module, []
    if module.merged or module.disable_adapters:
        return base, []
    names = [n for n in module.active_adapters if n in module.lora_A]
    return base, [
        (module.lora_A[n].weight.detach(), module.lora_B[n].weight.detach(), module.scaling[n]) for n in names
    ]


def masked_lora(modules: tuple[nn.Module, ...], x: torch.Tensor, adapter: torch.Tensor | None) -> list[torch.Tensor]:
    """-> one output per module: its base layer on ``x``, plus its LoRA update where ``adapter`` marks (the
    module docstring). Raises what the modules raise."""
    return [_masked(m, x, adapter) for m in modules]


def _masked(module: nn.Module, x: torch.Tensor, adapter: torch.Tensor | None) -> torch.Tensor:
    base = getattr(module, "base_layer", None)
    if base is None:
        return module(x)
    y = base(x)
    if adapter is None or module.merged or module.disable_adapters or not bool(adapter.any()):
        return y
    every = bool(adapter.all())
    for name in module.active_adapters:
        if name in module.lora_A:
            d = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](x))) * module.scaling[name]
            y = y + (d if every else d * adapter[..., None].to(d.dtype))
    return y
