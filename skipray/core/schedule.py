"""The SkipDecode schedule: which layers run at each generation step.

Pure Python (no torch). Contract:

* The prompt always runs at full depth. Generation step ``i`` is the forward pass that consumes the
  ``i``-th generated token (``i = 0, 1, ...``) and produces the logits of token ``i + 1``; the first
  generated token comes from the prompt's full-depth pass.
* At step ``i`` the model runs ``n(i)`` layers: all of them except the first ``num_layers - n(i)``
  layers of ``drop_order``, the fixed order in which layers stop running. The default order is
  SkipDecode's (arXiv 2307.02628, section 3): the ``warmup_layers`` lowest layers always run and the
  layers above them drop out from the bottom up (``warmup_layers, warmup_layers + 1, ...``), so a
  token runs the warm-up block plus the top ``n(i) - warmup_layers`` layers. Any other order (for
  example one that ``skipray calibrate`` found) keeps every guarantee below.
* ``n(i)`` falls monotonically from ``max_layers`` (step 0) to ``min_layers`` (step ``decay_tokens``
  and later). With a fixed drop order, ``active_layers(i + 1)`` is therefore a subset of
  ``active_layers(i)``: every layer a later token computes was computed by all earlier tokens, so the
  KV cache never needs recomputing.
* Every row of a batch at the same step shares the same layers.
* Sublayers (``sublayers=True``): a layer's attention block and its MLP block drop out separately. Unit
  ``2 l`` is layer ``l``'s attention, ``2 l + 1`` its MLP; ``drop_order`` lists units (default: SkipDecode's
  layer order, each layer's MLP before its attention). ``n(i)`` is then a FLOP budget in layer equivalents
  (unrounded): step ``i`` drops the longest prefix of the order whose remaining units weigh at least ``n(i)``,
  an attention block weighing ``attn_share`` of a layer and an MLP ``1 - attn_share`` (their shares of a layer's
  weights; ``SkipModel.attention_share``). Monotone as before, so a step's attention blocks are a subset of the
  previous step's (the KV cache invariant: only attention writes the cache; MLP blocks never touch it), and
  ``layers_per_token`` reports FLOP-weighted layer equivalents (floats).
* ``to_dict``/``from_dict`` round-trip every field; ``from_dict`` refuses keys it does not know, so a
  schedule file never loses its drop order silently.
* ``resolve_schedule`` is the one place skip flags (the CLI's ``--max-layers`` ... as a mapping, the
  Serve request's ``skip``, a batch row's ``skip``, a processor config's ``schedule``, training's
  flags) become a schedule: the rule is a model's default schedule is the one it was trained for, a
  model not trained for skipping defaults to full depth, and asking it to skip returns a warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

SHAPES = ("linear", "power")
SCHEDULE_FLAGS = (
    "max_layers",
    "min_layers",
    "decay_tokens",
    "warmup_layers",
    "shape",
    "power",
    "drop_order",
    "sublayers",
    "attn_share",
)
UNTRAINED_WARNING = (
    "this model was not trained for skipping: its output under a skip schedule will be poor "
    "(train it with `skipray train`, or use --full)"
)


@dataclass(frozen=True)
class SkipSchedule:
    """A monotone skip schedule over a model with ``num_layers`` decoder layers."""

    num_layers: int
    max_layers: int
    min_layers: int
    decay_tokens: int
    warmup_layers: int = 1
    shape: str = "linear"
    power: float = 2.0  # only for shape="power": n(i) = max - (max-min) * (i/decay)^power
    drop_order: tuple[int, ...] | None = None  # layers in the order they stop running; None: SkipDecode's
    sublayers: bool = False  # attention and MLP blocks drop separately; drop_order then lists units (contract)
    attn_share: float = 0.25  # sublayers: an attention block's share of a layer's weight FLOPs

    def __post_init__(self) -> None:
        L, W = self.num_layers, self.warmup_layers
        if self.sublayers:
            self._check_units()
        elif self.drop_order is not None:
            order = tuple(int(x) for x in self.drop_order)
            object.__setattr__(self, "drop_order", order)
            if len(set(order)) != len(order) or any(not 0 <= x < L for x in order):
                raise ValueError(f"drop_order must list distinct layers in [0, {L}), got {list(order)}")
            if len(order) < L - self.min_layers:
                raise ValueError(
                    f"drop_order names {len(order)} layers but min_layers={self.min_layers} drops "
                    f"{L - self.min_layers} of {L}"
                )
        if L < 1:
            raise ValueError(f"num_layers must be >= 1, got {L}")
        if not 0 <= W <= L:
            raise ValueError(f"warmup_layers must be in [0, {L}], got {W}")
        if not (self.min_layers <= self.max_layers <= L):
            raise ValueError(
                f"need min_layers <= max_layers <= num_layers, got min={self.min_layers} "
                f"max={self.max_layers} num_layers={L}"
            )
        if self.drop_order is None and self.min_layers < max(W + 1, 1) and self.min_layers < L:
            raise ValueError(
                f"min_layers={self.min_layers} leaves no top layer after {W} warm-up layers; "
                f"need min_layers >= warmup_layers + 1 = {W + 1}"
            )
        if self.decay_tokens < 0:
            raise ValueError(f"decay_tokens must be >= 0, got {self.decay_tokens}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.shape == "power" and not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power}")

    def _check_units(self) -> None:
        if not 0 < self.attn_share < 1:
            raise ValueError(f"attn_share must be in (0, 1), got {self.attn_share}")
        if self.drop_order is not None:
            order = tuple(int(x) for x in self.drop_order)
            object.__setattr__(self, "drop_order", order)
            if len(set(order)) != len(order) or any(not 0 <= x < 2 * self.num_layers for x in order):
                raise ValueError(f"a sublayer drop_order lists distinct units in [0, {2 * self.num_layers})")
        left = self.num_layers - sum(self.unit_weight(u) for u in self.order)
        if left > self.min_layers + 1e-9:
            raise ValueError(
                f"the drop order can drop only down to {left:.2f} layer equivalents, above min_layers={self.min_layers}"
            )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def full(cls, num_layers: int) -> SkipSchedule:
        """Full depth at every step (no skipping)."""
        return cls(num_layers, num_layers, num_layers, 0, warmup_layers=min(1, num_layers))

    @classmethod
    def from_dict(cls, d: dict) -> SkipSchedule:
        """Inverse of ``to_dict``. Raises ``ValueError`` on a key it does not know (never drops one)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.drop_order is not None:
            d["drop_order"] = list(self.drop_order)
        return d

    def with_drop_order(self, order) -> SkipSchedule:
        """The same depths per step with another drop order (``None``: SkipDecode's)."""
        return replace(self, drop_order=None if order is None else tuple(order))

    @property
    def order(self) -> tuple[int, ...]:
        """The effective drop order: ``drop_order``, or SkipDecode's ``warmup_layers .. num_layers-1`` (with
        sublayers: each of those layers' MLP unit, then its attention unit)."""
        if self.drop_order is not None:
            return self.drop_order
        if self.sublayers:
            return tuple(u for l in range(self.warmup_layers, self.num_layers) for u in (2 * l + 1, 2 * l))
        return tuple(range(self.warmup_layers, self.num_layers))

    def unit_weight(self, unit: int) -> float:
        """Sublayers: a unit's share of a layer's weight FLOPs (attention ``attn_share``, MLP the rest)."""
        return self.attn_share if unit % 2 == 0 else 1.0 - self.attn_share

    @property
    def is_full(self) -> bool:
        return self.min_layers == self.num_layers

    # -- queries ------------------------------------------------------------------------------
    def _frac(self, step: int) -> float:
        """How far ``step`` is along the decay, in [0, 1] (after the power shape)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.decay_tokens == 0:
            return 1.0
        frac = min(step, self.decay_tokens) / self.decay_tokens
        return frac**self.power if self.shape == "power" else frac

    def budget(self, step: int) -> float:
        """n(step) before rounding: the layer equivalents step ``step`` may run."""
        return self.max_layers - (self.max_layers - self.min_layers) * self._frac(step)

    def num_active(self, step: int) -> int | float:
        """n(step): how many layers run at generation step ``step`` (warm-up included); with sublayers, the
        FLOP-weighted layer equivalents of the units that run."""
        if self.sublayers:
            return float(round(self.num_layers - sum(self.unit_weight(u) for u in self._dropped_units(step)), 9))
        # floor(x + 0.5) is monotone in x, so n is non-increasing in step.
        return self.max_layers - math.floor((self.max_layers - self.min_layers) * self._frac(step) + 0.5)

    def _dropped_units(self, step: int) -> tuple[int, ...]:
        """Sublayers: the longest prefix of the order whose remaining units weigh at least ``budget(step)``."""
        need, left, k = self.budget(step), float(self.num_layers), 0
        for u in self.order:
            if left - self.unit_weight(u) < need - 1e-9:
                break
            left -= self.unit_weight(u)
            k += 1
        return self.order[:k]

    def runs(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(layers whose attention runs, layers whose MLP runs) at ``step``, ascending; the same tuple twice
        without sublayers."""
        if not self.sublayers:
            on = self.active_layers(step)
            return on, on
        dropped = set(self._dropped_units(step))
        L = range(self.num_layers)
        return tuple(l for l in L if 2 * l not in dropped), tuple(l for l in L if 2 * l + 1 not in dropped)

    def num_attention(self, step: int) -> int:
        """Attention blocks that run at ``step`` (each attends over the context)."""
        return len(self.runs(step)[0]) if self.sublayers else self.num_active(step)

    def skips(self, step: int) -> bool:
        """True when generation step ``step`` drops at least one layer: only then does a skip adapter
        apply (a full-depth step is the base model exactly, so the adapter cannot help it)."""
        return self.num_active(step) < self.num_layers

    def active_layers(self, step: int) -> tuple[int, ...]:
        """Indices of the layers that run at ``step``, ascending: all but the first ``L - n(step)`` of the
        drop order (with sublayers: the layers with a unit that runs)."""
        if self.sublayers:
            attn, mlp = self.runs(step)
            return tuple(sorted(set(attn) | set(mlp)))
        dropped = set(self.order[: self.num_layers - self.num_active(step)])
        return tuple(l for l in range(self.num_layers) if l not in dropped)

    def steps_running(self, layer: int, horizon: int, part: str = "attn") -> int:
        """How many of the steps ``0 .. horizon-1`` run ``layer`` (with sublayers: its ``part``, ``"attn"`` (what
        the cache holds) or ``"mlp"``); by monotonicity they are the first ones."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        order = self.order
        if self.sublayers:
            unit = 2 * layer + (part == "mlp")
            if unit not in order:
                return horizon
            count = 0
            while count < horizon and unit not in self._dropped_units(count):
                count += 1
                if count > self.decay_tokens:
                    return horizon
            return count
        if layer not in order:
            return horizon
        need = self.num_layers - order.index(layer)  # n(i) >= need  <=>  layer runs
        count = 0
        while count < horizon and self.num_active(count) >= need:
            count += 1
            if count > self.decay_tokens:  # n is constant from here on
                return horizon
        return count

    def layers_per_token(self, new_tokens: int) -> list[int | float]:
        """Layers computed to produce each of ``new_tokens`` generated tokens (token 0: full depth); floats
        (FLOP-weighted layer equivalents) with sublayers."""
        if new_tokens <= 0:
            return []
        return [self.num_layers] + [self.num_active(i) for i in range(new_tokens - 1)]

    def average_layers(self, new_tokens: int) -> float:
        """Mean layers per generated token over a generation of ``new_tokens`` tokens."""
        per = self.layers_per_token(new_tokens)
        return sum(per) / len(per) if per else float(self.num_layers)

    def describe(self) -> str:
        if self.is_full:
            return f"full depth ({self.num_layers} layers)"
        how = f"warm-up {self.warmup_layers}" if self.drop_order is None else f"drop order {list(self.drop_order)}"
        if self.sublayers:
            how = f"attention and MLP separately, {how}"
        return (
            f"{self.shape} {self.max_layers}->{self.min_layers} of {self.num_layers} layers over "
            f"{self.decay_tokens} tokens, {how}"
        )


@dataclass(frozen=True)
class CostModel:
    """Per-token FLOP model of a decoder (2 FLOPs per multiply-add).

    ``layer_params``: weights in one decoder layer; ``attn_dim``: query heads x head_dim;
    ``head_params``: lm_head weights; ``embed_params``: the embedding (a lookup: counted as 0 FLOPs,
    kept for reporting).
    """

    layer_params: int
    attn_dim: int
    head_params: int
    embed_params: int = 0

    def layer_flops(self, context: int) -> float:
        return 2.0 * self.layer_params + 4.0 * self.attn_dim * context

    def token_flops(self, num_layers_run: float, context: int, attention_run: int | None = None) -> float:
        """One token's FLOPs: ``num_layers_run`` layers' (or layer equivalents') matmuls, the attention over
        ``context`` of ``attention_run`` blocks (default: one per layer run), and the lm_head."""
        attn = num_layers_run if attention_run is None else attention_run
        return 2.0 * self.layer_params * num_layers_run + 4.0 * self.attn_dim * context * attn + 2.0 * self.head_params


def theoretical_speedup(schedule: SkipSchedule, cost: CostModel, prompt_len: int, new_tokens: int) -> float:
    """FLOP ratio full depth / schedule for decoding ``new_tokens`` after a ``prompt_len`` prompt.

    Counts every decode step (steps 0..new_tokens-2; the prompt pass is identical under both and
    excluded), each layer's matmuls and attention over its context, and the lm_head.
    """
    if new_tokens < 2:
        return 1.0
    full = skip = 0.0
    for i in range(new_tokens - 1):
        ctx = prompt_len + i + 1
        full += cost.token_flops(schedule.num_layers, ctx)
        skip += cost.token_flops(schedule.num_active(i), ctx, schedule.num_attention(i))
    return full / skip


class ResolvedSchedule(NamedTuple):
    """``resolve_schedule``'s answer: the schedule, and a warning for the user or None."""

    schedule: SkipSchedule
    warning: str | None


def resolve_schedule(
    flags: Mapping[str, Any] | None,
    num_layers: int,
    trained: SkipSchedule | None = None,
    start: SkipSchedule | None = None,
) -> ResolvedSchedule:
    """Skip flags -> the schedule to run. Pure: no I/O (a schedule file is read by the caller and passed
    as ``start``).

    ``flags``: ``full`` (bool) and the ``SCHEDULE_FLAGS`` (``max_layers``, ``min_layers``,
    ``decay_tokens``, ``warmup_layers``, ``shape``, ``power``, ``drop_order``: the CLI flags' names with
    underscores); ``None`` values count as not given. ``trained``: the schedule the model was trained
    for (None: not trained for skipping). ``start``: the schedule the flags override (default
    ``trained``). Rules: ``full`` wins; no flags give ``start``, else ``trained``, else full depth;
    flags override ``start`` (else full depth with ``decay_tokens`` 64, linear, one warm-up layer), and
    ``max_layers`` alone lowers ``min_layers`` to it. A skipping schedule for an untrained model comes
    with ``UNTRAINED_WARNING``. Raises ``ValueError`` for an unknown flag, a value of the wrong type or
    an invalid schedule.
    """
    flags = dict(flags or {})
    unknown = sorted(set(flags) - set(SCHEDULE_FLAGS) - {"full"})
    if unknown:
        raise ValueError(f"unknown skip flags {unknown}; known: {['full', *SCHEDULE_FLAGS]}")
    if flags.pop("full", False):
        return ResolvedSchedule(SkipSchedule.full(num_layers), None)
    given = {k: v for k, v in flags.items() if v is not None}
    start = start if start is not None else trained
    if not given:
        schedule = start if start is not None else SkipSchedule.full(num_layers)
    else:
        base = (
            start.to_dict()
            if start is not None
            else {"max_layers": num_layers, "min_layers": num_layers, "decay_tokens": 64, "shape": "linear"}
        )
        base.update(given, num_layers=num_layers)
        try:
            if "max_layers" in given and "min_layers" not in given:
                base["min_layers"] = min(base["min_layers"], base["max_layers"])
            schedule = SkipSchedule.from_dict(base)
        except TypeError as e:  # e.g. a string where a number belongs
            raise ValueError(f"invalid skip flags: {e}") from None
    warning = UNTRAINED_WARNING if trained is None and not schedule.is_full else None
    return ResolvedSchedule(schedule, warning)


def flop_speedup(layers_per_token, cost: CostModel, prompt_len: int, num_layers: int) -> float:
    """FLOP ratio full depth / what one answer ran: ``layers_per_token`` as the engine reports it (one
    entry per generated token; entry 0 comes from the prompt's full-depth pass and is left out, as in
    ``theoretical_speedup``); attention over each step's context and the lm_head are counted. 1.0 for an
    answer of fewer than two tokens."""
    full = skip = 0.0
    for i, n in enumerate(list(layers_per_token)[1:]):
        ctx = prompt_len + i + 1
        full += cost.token_flops(num_layers, ctx)
        skip += cost.token_flops(n, ctx)
    return full / skip if skip else 1.0
