"""The skip-decoding engine: batched, KV-cached generation over token ids.

Contract: the engine knows nothing about tokenization, Ray or HTTP. It takes prompts as lists of
token ids and returns generated token ids, a finish reason per row (``"stop"`` or ``"length"``) and
the number of layers computed for each generated token. The prompt runs at full depth (``prefill``);
each later token runs the schedule's layers for its step (``decode_one_token``). Rows that finish
are compacted out of the batch, so they stop costing compute. One preallocated KV cache is reused
across calls and grows only when a call needs more rows or slots.

The cache shrinks with the schedule: layer ``l`` needs only ``P + k_l`` slots (``P`` the padded prompt,
``k_l`` the steps of the call's schedule that run ``l``; ``skipray.memory.layer_slots``). A call whose
needs exceed the cache reallocates it to the per-layer maximum of both. ``Engine(max_new_tokens=n)``
preallocates for the engine's schedule with ``max_len - n`` prompt tokens and ``n`` new tokens; without
it every layer gets ``max_len`` slots up front (any split of prompt and new tokens fits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from skipray.memory import layer_slots
from skipray.model import SkipModel, forward, full_plan, step_plan
from skipray.sampling import sample, validate
from skipray.schedule import SkipSchedule


MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_fn: Callable[[list[int]], bool] | None = None  # e.g. stop strings, checked at the edges
    logprobs: int = 0  # return the top-N log-probs of each step's logits (0: only none; vLLM's `logprobs`)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        validate(self.temperature, self.top_k, self.top_p)


@dataclass
class TopLogprobs:
    """Log-softmax of the logits a step really produced (before temperature/top-p, as vLLM returns them):
    the sampled token's log-prob and the ``n`` most likely token ids with theirs, best first."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


def top_logprobs(logits: torch.Tensor, chosen: Sequence[int], n: Sequence[int]) -> list[TopLogprobs | None]:
    """Per row of ``logits`` (B, V): ``TopLogprobs`` with ``n[row]`` entries, or ``None`` where ``n[row] == 0``."""
    if not any(n):
        return [None] * len(chosen)
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(lp, max(n), dim=-1)
    picked = lp[torch.arange(len(chosen)), torch.tensor(chosen)].tolist()
    vals, ids = vals.tolist(), ids.tolist()
    return [TopLogprobs(picked[i], ids[i][:k], vals[i][:k]) if k else None for i, k in enumerate(n)]


@dataclass
class Completion:
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TopLogprobs] = field(default_factory=list)  # one per token when params.logprobs > 0

    @property
    def avg_layers(self) -> float:
        return sum(self.layers_per_token) / max(len(self.layers_per_token), 1)


@dataclass
class TokenEvent:
    row: int
    token_id: int
    layers: int
    finish_reason: str | None  # set on the row's last token
    logprobs: TopLogprobs | None = None  # when the request asked for logprobs


def finish_reason(generated: list[int], p: SamplingParams, eos_token_ids: Sequence[int]) -> str | None:
    """Stop token, EOS or ``stop_fn`` -> ``"stop"``; ``max_new_tokens`` reached -> ``"length"``."""
    if generated[-1] in p.stop_token_ids or generated[-1] in eos_token_ids:
        return "stop"
    if p.stop_fn is not None and p.stop_fn(generated):
        return "stop"
    if len(generated) >= p.max_new_tokens:
        return "length"
    return None


def check_schedule(schedule: SkipSchedule, num_layers: int) -> None:
    """Raise ``ValueError`` when ``schedule`` was made for a model of another depth."""
    if schedule.num_layers != num_layers:
        raise ValueError(f"schedule is for {schedule.num_layers} layers, model has {num_layers}")


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, real)`` of shape (B, P), P the longest prompt: ``side="left"`` right-aligns the prompts
    (static batches: every row's next token goes to slot P), ``"right"`` left-aligns them (continuous
    batching: each row's own length is its next slot). ``real`` marks tokens, not padding."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    real = torch.zeros(B, P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        cols = slice(P - len(p), P) if side == "left" else slice(0, len(p))
        tokens[b, cols] = torch.tensor(p, dtype=torch.long)
        real[b, cols] = True
    return tokens, real


def validate_request(prompt: Sequence[int], p: SamplingParams, vocab_size: int, context: int) -> None:
    """Raise ``ValueError`` for a request no engine can serve."""
    if len(prompt) == 0:
        raise ValueError("prompt is empty")
    if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in prompt):
        raise ValueError(f"prompt has token ids outside [0, {vocab_size})")
    p.validate()
    if len(prompt) + p.max_new_tokens > context:
        raise ValueError(f"{len(prompt)} prompt tokens + {p.max_new_tokens} new tokens exceed the context of {context}")


class Engine:
    def __init__(
        self,
        model: SkipModel,
        schedule: SkipSchedule | None = None,
        max_batch: int = 32,
        max_len: int = 512,
        eos_token_ids: Sequence[int] = (),
        max_new_tokens: int | None = None,
    ) -> None:
        """``max_batch`` rows of ``max_len`` slots (prompt + new tokens) are preallocated; with
        ``max_new_tokens`` the cache is sized for ``schedule`` (module docstring). Calls that need more
        grow it. Raises ``ValueError`` for a schedule of another depth or ``max_new_tokens`` outside
        ``[1, max_len]``."""
        self.model = model.eval()
        self.schedule = schedule or SkipSchedule.full(model.num_layers)
        check_schedule(self.schedule, model.num_layers)
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = next(model.parameters()).device
        lens = None
        if max_new_tokens is not None:
            if not 1 <= max_new_tokens <= max_len:
                raise ValueError(f"max_new_tokens must be in [1, max_len={max_len}], got {max_new_tokens}")
            lens = layer_slots(self.schedule, max_len - max_new_tokens, max_new_tokens)
        self.cache = model.new_cache(max_batch, max_len, lens)

    # -- public API --------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        schedule: SkipSchedule | None = None,
    ) -> list[Completion]:
        """Generate for a batch of token-id prompts; one ``Completion`` per prompt, in order."""
        out = [Completion(prompt_len=len(p)) for p in prompts]
        for ev in self.stream(prompts, params, schedule):
            c = out[ev.row]
            c.token_ids.append(ev.token_id)
            c.layers_per_token.append(ev.layers)
            c.finish_reason = ev.finish_reason
            if ev.logprobs is not None:
                c.logprobs.append(ev.logprobs)
        return out

    @torch.inference_mode()
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        schedule: SkipSchedule | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield one ``TokenEvent`` per generated token as soon as it is sampled."""
        schedule = schedule or self.schedule
        check_schedule(schedule, self.model.num_layers)
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        self._validate(prompts, plist)
        if not prompts:
            return
        B, P = len(prompts), max(len(p) for p in prompts)
        max_new = max(p.max_new_tokens for p in plist)
        self._ensure_cache(B, layer_slots(schedule, P, max_new))
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in plist]

        logits = self.prefill(prompts)
        row_of = list(range(B))  # cache row i holds request row_of[i]
        generated: list[list[int]] = [[] for _ in range(B)]
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        layers = self.model.num_layers
        step = 0
        while row_of:
            tokens, keep = [], []
            picked = [sample(logits[i], plist[r].temperature, plist[r].top_k, plist[r].top_p, gens[r])
                      for i, r in enumerate(row_of)]
            lps = top_logprobs(logits, picked, [plist[r].logprobs for r in row_of])
            for i, r in enumerate(row_of):
                tok = picked[i]
                generated[r].append(tok)
                reason = finish_reason(generated[r], plist[r], self.eos_token_ids)
                yield TokenEvent(r, tok, layers, reason, lps[i])
                if reason is None:
                    keep.append(i)
                    tokens.append(tok)
            if not keep:
                return
            if len(keep) < len(row_of):  # compact: finished rows stop costing compute
                idx = torch.tensor(keep, device=self.device)
                self.cache.move_rows(idx, torch.arange(len(keep), device=self.device), upto=P + step)
                positions = positions[idx]
                row_of = [row_of[i] for i in keep]
            tok_t = torch.tensor(tokens, device=self.device)[:, None]
            active = schedule.active_layers(step)
            logits = self.decode_one_token(tok_t, positions, P + step, active, adapter=schedule.skips(step))
            layers = len(active)
            positions = positions + 1
            step += 1

    # -- phases ------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Full-depth pass over left-padded prompts into cache rows ``0..B-1``; last-token logits (B, V)."""
        tokens, real = (t.to(self.device) for t in pad_prompts(prompts))
        B, P = tokens.shape
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.reset_rows(slice(0, B))
        logits = forward(
            self.model, tokens, positions, full_plan(self.model.num_layers), real,
            cache=self.cache, cache_rows=slice(0, B), start=0, logits_at=slice(P - 1, P),
        )
        return logits[:, 0].float()

    def decode_one_token(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, active: Sequence[int], adapter: bool = False
    ) -> torch.Tensor:
        """One step for the live rows (cache rows ``0..n-1``), running only ``active`` layers; with
        ``adapter``, the model's skip adapter (if it has one) applies to these generated tokens."""
        n = tokens.shape[0]
        ones = torch.ones_like(tokens, dtype=torch.bool)
        logits = forward(
            self.model, tokens, positions[:, None], step_plan(active, self.model.num_layers), ones,
            cache=self.cache, cache_rows=slice(0, n), start=slot, adapter=ones if adapter else None,
        )
        return logits[:, 0].float()

    # -- helpers -----------------------------------------------------------------------------------
    def _validate(self, prompts: Sequence[Sequence[int]], plist: list[SamplingParams]) -> None:
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                validate_request(p, sp, self.model.vocab_size, self.model.max_positions)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None

    def _ensure_cache(self, rows: int, layer_lens: Sequence[int]) -> None:
        """Reallocate the cache when ``rows`` rows of ``layer_lens`` slots per layer do not fit it."""
        c = self.cache
        if not c.fits(rows, layer_lens):
            lens = [max(a, b) for a, b in zip(c.layer_lens, layer_lens)]
            self.cache = self.model.new_cache(max(rows, c.max_batch), max(lens), lens)
