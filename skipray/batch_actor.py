"""The generating actor of the skip-decoding processor (a Ray Data callable class; no Ray import here).

Contract: ``Generator(spec)`` loads the model once and builds one static ``Engine`` (its KV cache
reused across calls). ``__call__(block)`` takes one window of rows from ``batch_rows.prepare_rows``
and returns it with ``generated_text``, ``generated_tokens``, ``num_generated_tokens``,
``avg_layers`` and ``finish_reason`` added and the internal columns dropped. The window's good rows
are grouped by schedule (a row's ``skip`` flags, else the config's schedule), each group sorted by
prompt length (``plan_batches``) and run in micro-batches of ``batch_size`` with each row's own
sampling params and seed. Error rows pass through with no text, no tokens and 0 generated tokens.
Faults stay with their rows: when a micro-batch raises, each of its rows is run alone, and a row
that fails alone gets ``error = "generation failed: ..."``; its batch-mates are unaffected.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import pyarrow as pa

from skipray.batch_rows import GENERATED_COLUMNS, INTERNAL_COLUMNS, PARAMS, TOKENS, schedule_for


@dataclass(frozen=True)
class ActorSpec:
    """What one actor needs (resolved in the driver)."""

    model: str
    schedule: dict  # the default schedule, SkipSchedule.to_dict()
    batch_size: int = 32
    bucket: bool = True
    max_len: int = 320  # the engine's initial cache length (it grows when a call needs more)
    threads: int = 0  # torch threads (0: the node's cores / max_actors)
    max_actors: int = 1
    device: str | None = None


def plan_batches(lengths: list[int], batch_size: int, bucket: bool) -> list[list[int]]:
    """Row indices of each micro-batch: sorted by length within the window when ``bucket``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucket else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of prompt positions in the padded prefill tensors that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


class Generator:
    """One model and one ``Engine`` per actor, built once; ``__call__`` generates for one window."""

    def __init__(self, spec: ActorSpec) -> None:
        import torch

        from skipray.engine import Engine
        from skipray.loading import load
        from skipray.metrics import EngineMetrics
        from skipray.schedule import SkipSchedule
        from skipray.text import detokenizer

        self.metrics = EngineMetrics("batch")
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // max(1, spec.max_actors)))
        self.spec = spec
        self.m = load(spec.model, device=spec.device)
        self.schedule = SkipSchedule.from_dict(spec.schedule)
        self.trained = self.m.schedule.to_dict() if self.m.schedule else None
        self.engine = Engine(self.m.model, self.schedule, max_batch=spec.batch_size, max_len=spec.max_len,
                             eos_token_ids=self.m.eos_token_ids, detokenize=detokenizer(self.m.tokenizer))

    @functools.lru_cache(maxsize=64)
    def _schedule(self, flags: str | None):
        return self.schedule if flags is None else schedule_for(flags, self.m.model.num_layers, self.trained)

    def _params(self, p: dict):
        from skipray.requests import SamplingParams

        return SamplingParams(max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                              top_k=p["top_k"], seed=p["seed"], stop=tuple(p["stop"] or ()))

    def _run(self, prompts: list[list[int]], params: list, schedule) -> list:
        """Generate one micro-batch; -> a ``Completion`` or the exception of each row (faults stay per row)."""
        t0 = time.perf_counter()
        try:
            comps = self.engine.generate(prompts, params, schedule)
        except Exception as e:  # noqa: BLE001 - find the row(s) at fault: run each alone
            if len(prompts) == 1:
                return [e]
            out = []
            for p, sp in zip(prompts, params):
                try:
                    out.append(self.engine.generate([p], [sp], schedule)[0])
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out
        self.metrics.record_batch(comps, self.m.model.num_layers, self.spec.batch_size, time.perf_counter() - t0)
        return comps

    def __call__(self, block: pa.Table) -> pa.Table:
        from skipray.text import decode

        spec = self.spec
        n = block.num_rows
        text: list[str | None] = [None] * n
        tokens: list[list[int] | None] = [None] * n
        gen = [0] * n
        avg: list[float | None] = [None] * n
        reason: list[str | None] = [None] * n
        errors = block.column("error").to_pylist()
        toks = block.column(TOKENS).to_pylist()
        params = block.column(PARAMS).to_pylist()
        groups: dict[str | None, list[int]] = {}
        for i in range(n):
            if errors[i] is None:
                groups.setdefault(params[i]["skip"], []).append(i)
        for flags, ok in groups.items():
            schedule = self._schedule(flags)
            for mb in plan_batches([len(toks[i]) for i in ok], spec.batch_size, spec.bucket):
                rows = [ok[j] for j in mb]
                comps = self._run([toks[r] for r in rows], [self._params(params[r]) for r in rows], schedule)
                for r, c in zip(rows, comps):
                    if isinstance(c, BaseException):
                        errors[r] = f"generation failed: {c!r}"
                        continue
                    text[r] = decode(self.m.tokenizer, c.token_ids, params[r]["stop"] or ())
                    tokens[r], gen[r] = list(c.token_ids), len(c.token_ids)
                    avg[r], reason[r] = round(c.avg_layers, 3), c.finish_reason
        out = block.drop_columns([c for c in INTERNAL_COLUMNS if c in block.column_names] + ["error"])
        for name, values, typ in (("generated_text", text, pa.string()),
                                  ("generated_tokens", tokens, pa.list_(pa.int32())),
                                  ("num_generated_tokens", gen, pa.int32()), ("avg_layers", avg, pa.float32()),
                                  ("finish_reason", reason, pa.string()), ("error", errors, pa.string())):
            out = out.append_column(name, pa.array(values, typ))
        first = [c for c in out.column_names if c not in GENERATED_COLUMNS]
        return out.select(first + list(GENERATED_COLUMNS))

