"""One forward pass over a chosen set of layers, for prefill, decode steps and training.

Contract: ``forward(model, seg, cache=None, prefix=None)`` runs one batch (``seg``, a ``Segment``:
tokens, positions, real mask, plan, and in a cached pass its cache rows, first slot(s), logit columns
and adapter mask) through the decoder layers that ``seg.plan`` names, then the final norm and
lm_head. ``plan[l]`` is ``None`` (layer ``l`` skipped: it neither writes nor reads the cache) or a
``LayerRun(rows, cols)``: the layer runs on ``hidden[rows, :cols]`` (``cols=None``: all columns), or a
``SplitRun(attn, mlp)`` (sublayer skipping): its attention block where ``attn`` says, then its MLP block where
``mlp`` says (each a ``LayerRun`` or ``None``; the layer pass is ``skipray.core.blocks.layer_pass``).
Entries it does not run keep their hidden state, which is exactly what skipping a residual block means.

* prefill: every layer on every row and column, writing the cache;
* decode step: one column, the schedule's layers, on the live rows;
* training: no cache; layer ``l`` runs on the column prefix that the decoder would have run it on
  (the prompt plus the generation steps whose schedule includes ``l``), so the parallel forward
  computes what cached decoding computes;
* the decode hot path: a pass with one segment, whole rows and a Llama-family model runs its layers
  through ``skipray.core.fastpath`` (the same arithmetic, its kernels built with the inference weights);
* mixed passes (``forward_segments``): several cached batches (``Segment``), say a decode step and
  a prompt chunk, share one pass: each layer's linear layers run once on all their tokens, attention
  runs per segment. Each segment gets what ``forward`` would give it alone.

A layer's cache may be shorter than the pass's slot span (``KVCache`` sized for a skip schedule):
attention reads only the slots the layer holds, and a write past them raises ``IndexError``.

``SkipModel`` wraps a Hugging Face causal LM (Llama family: Llama, SmolLM2, Mistral, Qwen2/3; OPT); what
differs between families is one small class each in ``skipray.core.architectures``, which call the Hugging
Face module's own submodules, so LoRA adapters and ``save_pretrained`` keep working on it. A pass without
gradients on a model whose inference weights are built (``SkipModel.build_inference_weights``; an engine
builds them when it is created) runs the decoder's linear layers and the lm_head from those weights
(``skipray.core.weights``: fused, prepacked on a CPU, the skip adapter merged or low-rank, built once and
never checked again); every other pass (training, or no weights built) runs the modules themselves, the
skip adapter only where a segment's adapter mask marks (``skipray.core.lora.masked_lora``).

Callers build the ``Segment`` by field name: the training layout needs only ``tokens``, ``positions``,
``plan``, ``real`` (and ``logits_at``, ``adapter``); the engine's ``skipray.core.runner`` adds cache rows
and slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from skipray.core.architectures import FAMILIES, rope_tables
from skipray.core.attention import attend
from skipray.core.blocks import join, layer_pass, part
from skipray.core.cache import KVCache
from skipray.core.fastpath import layer_kernels, run_layers
from skipray.core.lora import masked_lora
from skipray.core.weights import InferenceWeights


class LayerRun(NamedTuple):
    """Where a plan runs a layer: on ``hidden[rows, :cols]`` (``cols=None``: every column); ``adapter_flags``:
    (any, all) of the segment's adapter mask on those rows, and ``end``, one past the last cache slot they
    write, when the host knows them (no device read)."""

    rows: slice | torch.Tensor
    cols: int | None
    adapter_flags: tuple[bool, bool] | None = None
    end: int | None = None


class SplitRun(NamedTuple):
    """Sublayer skipping: where a plan runs a layer's attention block and where its MLP block (``LayerRun`` each,
    ``None``: that block is skipped); ``end`` is the attention's (what writes the cache)."""

    attn: LayerRun | None
    mlp: LayerRun | None

    @property
    def end(self) -> int | None:
        return None if self.attn is None else self.attn.end


class SkipModel(nn.Module):
    """A Hugging Face causal LM viewed as embed -> decoder layers -> final norm -> lm_head; the family's
    details are its ``family`` (``skipray.core.architectures``)."""

    def __init__(self, hf_model: nn.Module, packed_linears: bool = True) -> None:
        """``packed_linears``: inference weights may be prepacked for oneDNN (on a CPU that can). Raises
        ``ValueError`` for an architecture without an adapter (or an unsupported variant)."""
        super().__init__()
        self.hf = hf_model
        self.packed_linears = packed_linears
        self.inference_weights: InferenceWeights | None = None  # build_inference_weights
        cfg = hf_model.config
        self.arch = cfg.model_type
        if self.arch not in FAMILIES:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {sorted(FAMILIES)}")
        self.family = FAMILIES[self.arch](hf_model)
        a = self.family
        self.body, self.num_heads, self.kv_heads, self.head_dim = a.body, a.num_heads, a.kv_heads, a.head_dim
        self.layers = self.body.layers
        self.num_layers = len(self.layers)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048))
        self.vocab_size = cfg.vocab_size

    # -- inference weights -----------------------------------------------------------------------
    def build_inference_weights(self, merge: bool | None = None) -> InferenceWeights:
        """Build (or rebuild) the weights passes without gradients run (``skipray.core.weights``), from the
        modules as they are now: call it again after training, loading another adapter or moving the model.
        ``merge``: hold the skip adapter merged too (default: on a CPU only; on a GPU it would be one more
        copy of every adapted weight). Returns them (also ``self.inference_weights``)."""
        self.inference_weights = None  # the old ones go before the new ones are made
        device = next(self.parameters()).device
        merge = device.type == "cpu" if merge is None else merge
        self.inference_weights = InferenceWeights(self, merge=merge, pack=self.packed_linears)
        return self.inference_weights

    def active_weights(self) -> InferenceWeights | None:
        """The inference weights, when they are built and the current pass needs no gradients; else ``None``
        (the pass runs the modules)."""
        w = self.inference_weights
        return w if w is not None and not torch.is_grad_enabled() else None

    def linears(self):
        """What runs the linear layers of the current pass: ``active_weights()``, else the modules
        (``masked_lora``)."""
        w = self.active_weights()
        return w if w is not None else masked_lora

    # -- the pieces forward calls: the family's, with LoRA-aware linears ----------------------------
    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.family.embed(tokens, positions)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.family.rope(h, positions)

    def attn_norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.family.attn_norm(layer, x)

    def qkv(self, layer: nn.Module, x: torch.Tensor, adapter: torch.Tensor | None = None):
        """Normed input -> q, k, v as (b, heads, t, head_dim), plus the attention scale to use."""
        return self.family.qkv(layer, x, self.linears(), adapter)

    def attn_out(self, layer: nn.Module, o: torch.Tensor, adapter: torch.Tensor | None = None) -> torch.Tensor:
        return self.family.attn_out(layer, o, self.linears(), adapter)

    def mlp(self, layer: nn.Module, x: torch.Tensor, adapter: torch.Tensor | None = None) -> torch.Tensor:
        return self.family.mlp(layer, x, self.linears(), adapter)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: logits."""
        h, w = self.family.final(h), self.active_weights()
        return w.head(h) if w is not None else self.hf.lm_head(h)

    # -- sizes -----------------------------------------------------------------------------------
    def cost_model(self):
        from skipray.core.schedule import CostModel

        layer_params = sum(p.numel() for p in self.layers[0].parameters())
        head = self.hf.lm_head.weight.numel()
        return CostModel(layer_params, self.num_heads * self.head_dim, head, self.body.embed_tokens.weight.numel())

    def attention_share(self) -> float:
        """An attention block's share of a decoder layer's weights (the FLOP weight of sublayer skipping's
        attention units, ``SkipSchedule.attn_share``; the MLP has the rest). 0.25 for SmolLM2-135M."""
        named = list(self.layers[0].named_parameters())
        attn = sum(p.numel() for n, p in named if "attn" in n and "norm" not in n)
        return attn / sum(p.numel() for n, p in named if "norm" not in n)

    def new_cache(self, max_batch: int, max_len: int, layer_lens: Sequence[int] | None = None) -> KVCache:
        """A ``KVCache`` in the model's dtype and device; ``layer_lens`` as in ``KVCache`` (default:
        ``max_len`` slots for every layer; ``skipray.core.memory.layer_slots`` sizes them for a schedule)."""
        p = next(self.parameters())
        return KVCache(self.num_layers, max_batch, self.kv_heads, max_len, self.head_dim, p.dtype, p.device, layer_lens)


def full_plan(num_layers: int, rows: slice | torch.Tensor = slice(None)) -> list[LayerRun | None]:
    return [LayerRun(rows, None)] * num_layers


def step_plan(
    active: Sequence[int], num_layers: int, rows: slice | torch.Tensor = slice(None)
) -> list[LayerRun | None]:
    on = set(active)
    return [LayerRun(rows, None) if l in on else None for l in range(num_layers)]


def training_plan(schedule, prompt_len: int, total_len: int) -> list[LayerRun | SplitRun | None]:
    """Columns ``[0, prompt_len)`` hold the (left-padded) prompt, column ``prompt_len + i`` the token
    consumed at generation step ``i``. Layer ``l`` runs on the prompt plus the steps that include it (with
    sublayers, its attention and its MLP each on the prompt plus the steps that run them: a ``SplitRun``)."""
    horizon = max(total_len - prompt_len, 0)
    plan: list[LayerRun | SplitRun | None] = []
    for l in range(schedule.num_layers):
        attn = LayerRun(slice(None), prompt_len + schedule.steps_running(l, horizon))
        mlp = (
            LayerRun(slice(None), prompt_len + schedule.steps_running(l, horizon, "mlp"))
            if schedule.sublayers
            else attn
        )
        plan.append(attn if mlp == attn else SplitRun(attn, mlp))
    return plan


@dataclass
class Segment:
    """One batch and its layout: what a pass (``forward``, ``forward_segments``) needs to know about it.

    ``tokens``: ``(b, t)`` ids; ``positions``: ``(b, t)`` model positions (RoPE or learned); ``real``:
    ``(b, t)`` bool, False for padding; ``plan``: per layer a ``LayerRun`` (rows are this batch's rows) or
    ``None`` (skipped).
    With a cache: batch row ``i`` is cache row ``cache_rows[i]`` and its tokens fill slots ``start ..
    start + t - 1`` (``start``: an int, or a ``(b,)`` tensor of one slot per row when ``t == 1``).
    ``logits_at``: the columns projected to logits (a slice, or a ``(b,)`` tensor of one column per row;
    ``None``: all); ``adapter``: ``(b, t)`` bool, where the skip adapter applies (``None``: nowhere).
    ``adapter_flags`` (whether any / every entry of ``adapter`` is set) and ``end`` (``max(start) + t``)
    are what the host already knows, given so the pass reads nothing back from the device for them.
    Without a cache (training, teacher-forced scoring) ``cache_rows`` and ``start`` are unused:
    ``Segment(tokens, positions, plan, real, logits_at=..., adapter=...)`` is the whole layout.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    plan: Sequence[LayerRun | None]
    real: torch.Tensor
    cache_rows: slice | torch.Tensor = field(default_factory=lambda: slice(None))
    start: int | torch.Tensor = 0
    logits_at: slice | torch.Tensor | None = None
    adapter: torch.Tensor | None = None
    adapter_flags: tuple[bool, bool] | None = None  # (any, all) of ``adapter``, when the host knows them
    end: int | None = None  # one past the last slot a per-row ``start`` reaches, when the host knows it


def forward(
    model: SkipModel, seg: Segment, cache: KVCache | None = None, prefix: KVCache | None = None
) -> torch.Tensor:
    """Logits ``(b, t', vocab)`` for the batch ``seg`` (``Segment``: tokens ``(b, t)``, their positions,
    real mask, plan, and with a cache its rows, first slot(s), logit columns and adapter mask).
    ``t'`` is ``t`` or the columns ``seg.logits_at`` selects (``1`` for a per-row column tensor).

    ``cache``: the pass writes each run layer's keys and values into ``seg.cache_rows`` at slots
    ``seg.start ..`` and attends to what those rows hold. ``prefix`` (training, no ``cache``): a cache
    whose rows hold an already prefilled prompt in slots ``[0, prefix_len)`` for batch rows
    ``0..b-1``; the tokens follow it, attend to it and write nothing, so a training step runs the
    prompt once without gradients and only the answer with them.
    Raises ``TypeError`` when ``seg`` is not a ``Segment``, ``ValueError`` for ``prefix`` with ``cache``,
    a plan of the wrong length or column-limited layers with a cache, and ``IndexError`` (from
    ``KVCache.write``) for a write past a layer's cache length.
    """
    if not isinstance(seg, Segment):
        raise TypeError(f"forward takes the batch as a Segment, got {type(seg).__name__}")
    if prefix is not None and cache is not None:
        raise ValueError("prefix is for training without a cache")
    return _run(model, [seg], cache, prefix)[0]


def forward_segments(model: SkipModel, segments: Sequence[Segment], cache: KVCache) -> list[torch.Tensor]:
    """Several independent cached batches in one pass over the layers: per layer, the linear layers
    (and norms) run once on the tokens of every segment that runs the layer, concatenated, and
    attention runs per segment (its own rows, slots and mask). Each segment gets what ``forward``
    would give it alone (up to summation order): its logits ``(b, t', vocab)``, in order.

    This is how the engine's chunked prefill (``skipray.core.engine``) puts a decode step (one token per
    row, per-row slots) and prompt chunks (many tokens of one row at an int slot) into one pass: on a
    CPU, where a layer's matmuls cost about the same for a few tokens as for many, a second pass would
    read every weight again.
    """
    if cache is None:
        raise ValueError("forward_segments runs cached passes: give it the cache")
    if not segments:
        return []
    return _run(model, list(segments), cache, None)


@dataclass
class _State:
    h: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    causal: torch.Tensor | None = None  # (b, t, end), cache path
    diag: torch.Tensor | None = None
    end: int = 0
    prefix_len: int = 0
    masks: dict = field(default_factory=dict)  # cache path: (rows, n) -> KeptMask, see attention.cached_mask
    adapter: torch.Tensor | None = None  # the segment's adapter mask; None when it marks nothing


def _run(model: SkipModel, segs: list[Segment], cache: KVCache | None, prefix: KVCache | None) -> list[torch.Tensor]:
    """The layer loop behind ``forward`` and ``forward_segments``."""
    for s in segs:
        if len(s.plan) != model.num_layers:
            raise ValueError(f"plan has {len(s.plan)} entries for {model.num_layers} layers")
    dev = segs[0].tokens.device
    states = []
    for s in segs:
        b, t = s.tokens.shape
        h = model.embed(s.tokens, s.positions)
        rope = model.rope(h, s.positions)
        st = _State(h, None if rope is None else rope_tables(*rope))
        if s.adapter is not None:  # decided once per pass, not per linear layer
            use = s.adapter_flags[0] if s.adapter_flags is not None else bool(s.adapter.any())
            if use:
                st.adapter = s.adapter
                if s.adapter_flags is not None and model.inference_weights is not None:
                    model.inference_weights.remember(s.adapter, *s.adapter_flags)
        if prefix is not None:
            st.prefix_len = int(prefix.filled[:, :b].max())
        if cache is not None:
            cache.mark_valid(s.cache_rows, s.start, s.real)
            qslots = (s.start if isinstance(s.start, int) else s.start[:, None]) + torch.arange(t, device=dev)
            qslots = qslots.expand(b, t)
            if isinstance(s.start, int):
                st.end = s.start + t
            else:
                st.end = s.end if s.end is not None else int(s.start.max()) + t
            span = torch.arange(st.end, device=dev)
            st.causal = span[None, None, :] <= qslots[:, :, None]  # (b, t, end)
            st.diag = span[None, None, :] == qslots[:, :, None]
        states.append(st)
    kernels = layer_kernels(model, segs, states, cache)  # the lean loop where the pass allows (fastpath)
    if kernels is not None:
        s, st = segs[0], states[0]
        st.h = run_layers(
            kernels,
            st.h,
            lambda l, q, k, v, scale: attend(
                l, s, st, slice(None), s.tokens.shape[1], True, q, k, v, scale, cache, None
            ),
        )
    for l, layer in enumerate(model.layers if kernels is None else ()):
        entries = [s.plan[l] for s in segs]
        if any(isinstance(e, SplitRun) for e in entries):  # sublayers: attention rows, then MLP rows
            layer_pass(
                model,
                l,
                layer,
                segs,
                states,
                [e.attn if isinstance(e, SplitRun) else e for e in entries],
                cache,
                prefix,
                "attn",
            )
            layer_pass(
                model,
                l,
                layer,
                segs,
                states,
                [e.mlp if isinstance(e, SplitRun) else e for e in entries],
                cache,
                prefix,
                "mlp",
            )
        else:
            layer_pass(model, l, layer, segs, states, entries, cache, prefix, "both")
    picked = []
    for s, st in zip(segs, states):
        h = st.h
        if isinstance(s.logits_at, torch.Tensor):
            h = h[torch.arange(h.shape[0], device=dev), s.logits_at][:, None]
        elif s.logits_at is not None:
            h = h[:, s.logits_at]
        picked.append(h)
    logits = model.final(join(picked))
    sizes = [(p.shape[0], p.shape[1]) for p in picked]
    return [part(logits, sizes, j) for j in range(len(picked))]
