"""The generating actor of the skip-decoding processor (a Ray Data callable class; no Ray import here).

Contract: ``SkipDecodeEngineStage(spec)`` loads the model once and builds one ``Engine`` with the spec's
``EngineConfig`` (``max_num_seqs``: the processor's ``engine_rows``; its KV cache is reused across calls).
``__call__(block)`` takes one window of rows from ``skipray.batch.rows.prepare_rows`` and returns it with
``generated_text``, ``generated_tokens``, ``num_generated_tokens``, ``avg_layers``, ``logprobs``,
``prompt_logprobs`` (one full-depth pass over the prompt of a row that asks, ``ModelRunner.prompt_logprobs``,
as the engine computes them for the Serve app) and ``finish_reason`` added and the internal columns dropped.
The window's good rows go into the engine together (continuous batching): each with its own sampling
params, seed and schedule (a row's ``skip`` flags, else the config's), admitted shortest prompt first
when ``bucket`` (rows prefilled together then have similar lengths), and a row that finishes frees its
cache row for the next prompt of the window at once, instead of the batch running until its longest
row ends. A seeded row samples from its own generator, so what shares its batch changes nothing.
Error rows pass through with no text, no tokens and 0 generated tokens. Faults stay with their rows:
a row that failed (alone, or in a pass it shared) is run again alone. A failure of the engine itself
(``fault_kind`` "engine": out of memory, a device error) is retried on a fresh engine (a new KV cache),
at most ``engine_retries`` times; a row that still fails gets ``error = "engine fault: ..."`` and
``error_kind = "engine"`` (the file job retries it on a re-run), one that fails on its own input
``error = "generation failed: ..."`` and ``error_kind = "input"`` (as rows refused before generation);
the other rows are unaffected.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from skipray.batch.params import (
    LOGPROBS_TYPE,
    PROMPT_LOGPROBS_TYPE,
    logprobs_value,
    prompt_logprobs_value,
    sampling_params,
)
from skipray.batch.rows import ERROR_KIND, GENERATED_COLUMNS, INTERNAL_COLUMNS, PARAMS, TOKENS, schedule_for
from skipray.core.config import EngineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSpec:
    """What one actor needs (resolved in the driver)."""

    model: str
    schedule: dict  # the default schedule, SkipSchedule.to_dict()
    # the engine's: max_num_seqs rows per engine batch; max_model_len, the initial cache length (generate grows it)
    engine: EngineConfig = EngineConfig(max_num_seqs=32, max_model_len=320)
    bucket: bool = True
    threads: int = 0  # torch threads (0: the node's cores / max_actors)
    max_actors: int = 1
    device: str | None = None
    engine_retries: int = 2  # a window's rows that an engine fault failed run again on a fresh engine
    metrics: bool = True  # record the engine's metrics (skipray.metrics) when Ray's metrics are active


def fault_kind(error: BaseException) -> str:
    """ "input" for an error of the row's own input (the engine refused it: ``ValueError``, ``TypeError``),
    "engine" for a failure of the engine itself (out of memory, a device error, anything else)."""
    return "input" if isinstance(error, (ValueError, TypeError)) else "engine"


def admission_order(lengths: list[int], bucket: bool) -> list[int]:
    """The order the window's rows enter the engine: shortest prompt first when ``bucket``, else as given."""
    return sorted(range(len(lengths)), key=lengths.__getitem__) if bucket else list(range(len(lengths)))


class SkipDecodeEngineStage:
    """One model and one ``Engine`` per actor, built once; ``__call__`` generates for one window."""

    def __init__(self, spec: ActorSpec) -> None:
        import torch

        from skipray.core.engine import Engine
        from skipray.core.schedule import SkipSchedule
        from skipray.loading import load
        from skipray.metrics import EngineMetrics
        from skipray.text import detokenizer

        self.metrics = EngineMetrics("batch", spec.model)
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // max(1, spec.max_actors)))
        self.spec = spec
        self.m = load(spec.model, device=spec.device)
        self.cost = self.m.model.cost_model()
        self.schedule = SkipSchedule.from_dict(spec.schedule)
        self.trained = self.m.schedule.to_dict() if self.m.schedule else None
        self._schedules: dict[str, object] = {}
        self._constraints = None  # skipray.structured.Constraints, built for the first row with a grammar
        self._new_engine = lambda: Engine(
            self.m.model, self.schedule, spec.engine, self.m.eos_token_ids, detokenize=detokenizer(self.m.tokenizer)
        )
        self.engine = self._new_engine()

    def _fresh_engine(self) -> None:
        """Drop the engine (its KV cache) and build a new one, after an engine fault."""
        import gc

        import torch

        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.engine = self._new_engine()

    def _sampling(self, row: dict):
        """The engine's ``SamplingParams`` of a row, with its structured output's constraint factory."""
        sp = sampling_params(row)
        grammar = row.get("grammar")
        if grammar:
            if self._constraints is None:
                from skipray.structured import Constraints

                self._constraints = Constraints(self.m.tokenizer, self.m.model.vocab_size, self.m.eos_token_ids)
            sp.structured = self._constraints.factory(grammar)
        return sp

    def _schedule(self, flags: str | None):
        """The schedule of a row's ``skip`` flags (JSON), resolved once per distinct value."""
        if flags is None:
            return self.schedule
        if flags not in self._schedules:
            self._schedules[flags] = schedule_for(flags, self.m.model.num_layers, self.trained)
        return self._schedules[flags]

    def _prompt_logprobs(self, prompt: list[int], top: int) -> list[dict | None]:
        """A row's ``prompt_logprobs`` value: one full-depth pass over its prompt (``ModelRunner.prompt_logprobs``)."""
        import torch

        with torch.inference_mode():
            return prompt_logprobs_value(prompt, self.engine.runner.prompt_logprobs(prompt, top), top)

    def _alone(self, prompt: list[int], params, schedule):
        """One row run by itself; -> its ``Completion`` or what it failed with."""
        try:
            c = self.engine.generate([prompt], [params], [schedule], raise_errors=False)[0]
        except Exception as e:  # noqa: BLE001 - e.g. a ValueError for this row's input
            return e
        return c.error if c.finish_reason == "error" else c

    def _run(self, prompts: list[list[int]], params: list, schedules: list) -> list:
        """``_attempt``, then the rows an engine fault failed (``fault_kind``) again on a fresh engine, at most
        ``engine_retries`` times; -> a ``Completion`` or the exception of each row."""
        comps = self._attempt(prompts, params, schedules)
        for attempt in range(self.spec.engine_retries):
            failed = [k for k, c in enumerate(comps) if isinstance(c, BaseException) and fault_kind(c) == "engine"]
            if not failed:
                break
            print(
                f"[skipray] engine fault on {len(failed)} rows ({comps[failed[0]]!r}); retry {attempt + 1} of "
                f"{self.spec.engine_retries} on a fresh engine",
                file=sys.stderr,
            )
            self._fresh_engine()
            again = self._attempt(
                [prompts[k] for k in failed], [params[k] for k in failed], [schedules[k] for k in failed]
            )
            for k, c in zip(failed, again):
                comps[k] = c
        return comps

    def _attempt(self, prompts: list[list[int]], params: list, schedules: list) -> list:
        """Generate for the window's rows once; -> a ``Completion`` or the exception of each row. A row that
        failed is run again alone (faults stay with their rows).

        When the rows ask for different ``max_tokens``, the whole window goes to the engine at once and a
        finished row's cache row takes the next prompt (continuous batching: 1.53x the tokens/s of static
        micro-batches on a 16/128-token mix, ``bench/bench_batch.py --mixed``). When they all ask for the
        same budget, rows run in micro-batches of ``max_num_seqs``, each until its longest row ends: on the
        bundled prompts (EOS ends rows at different lengths) that was 1.5x faster than refilling, whose
        newcomers sit at other steps than their batch-mates (other layers, another adapter phase) and
        prefill in small groups."""
        t0, steps = time.perf_counter(), self.engine.steps
        size = len(prompts) if len({p.max_tokens for p in params}) > 1 else self.spec.engine.max_num_seqs
        try:
            comps: list = [
                c
                for b in range(0, len(prompts), size)
                for c in self.engine.generate(
                    prompts[b : b + size], params[b : b + size], schedules[b : b + size], raise_errors=False
                )
            ]
        except Exception:  # noqa: BLE001 - the call refused some row's input: find it, run each alone
            return [self._alone(*row) for row in zip(prompts, params, schedules)]
        for k, c in enumerate(comps):
            if c.finish_reason == "error":
                comps[k] = self._alone(prompts[k], params[k], schedules[k])
        done = [c for c in comps if not isinstance(c, BaseException)]
        if not self.spec.metrics:
            return comps
        try:
            self.metrics.record_batch(
                done,
                self.m.model.num_layers,
                self.spec.engine.max_num_seqs,
                time.perf_counter() - t0,
                self.engine.steps - steps,
                self.cost,
            )
        except Exception:  # metrics never fail a batch
            logger.exception("recording batch metrics failed")
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
        lps: list[list[dict] | None] = [None] * n
        plps: list[list[dict | None] | None] = [None] * n
        errors = block.column("error").to_pylist()
        kinds = ["input" if e is not None else None for e in errors]
        toks = block.column(TOKENS).to_pylist()
        params = block.column(PARAMS).to_pylist()
        ok = [i for i in range(n) if errors[i] is None]
        rows = [ok[j] for j in admission_order([len(toks[i]) for i in ok], spec.bucket)]
        comps = (
            self._run(
                [toks[r] for r in rows],
                [self._sampling(params[r]) for r in rows],
                [self._schedule(params[r]["skip"]) for r in rows],
            )
            if rows
            else []
        )
        for r, c in zip(rows, comps):
            if isinstance(c, BaseException):
                kinds[r] = fault_kind(c)
                errors[r] = f"{'engine fault' if kinds[r] == 'engine' else 'generation failed'}: {c!r}"
                continue
            text[r] = decode(self.m.tokenizer, c.token_ids, params[r]["stop"] or (), bool(params[r]["include_stop"]))
            tokens[r], gen[r] = list(c.token_ids), len(c.token_ids)
            avg[r], reason[r] = round(c.avg_layers, 3), c.finish_reason
            lps[r] = logprobs_value(c.token_ids, c.logprobs, params[r]["logprobs"])
            top = params[r].get("prompt_logprobs")
            if top is not None:
                try:
                    plps[r] = self._prompt_logprobs(toks[r], top)
                except Exception as e:  # noqa: BLE001 - this row's failure, not its window's
                    kinds[r] = fault_kind(e)
                    errors[r] = f"{'engine fault' if kinds[r] == 'engine' else 'generation failed'}: {e!r}"
                    text[r] = tokens[r] = avg[r] = reason[r] = lps[r] = None
                    gen[r] = 0
        out = block.drop_columns([c for c in INTERNAL_COLUMNS if c in block.column_names] + ["error"])
        for name, values, typ in (
            ("generated_text", text, pa.string()),
            ("generated_tokens", tokens, pa.list_(pa.int32())),
            ("num_generated_tokens", gen, pa.int32()),
            ("avg_layers", avg, pa.float32()),
            ("logprobs", lps, LOGPROBS_TYPE),
            ("prompt_logprobs", plps, PROMPT_LOGPROBS_TYPE),
            ("finish_reason", reason, pa.string()),
            ("error", errors, pa.string()),
            (ERROR_KIND, kinds, pa.string()),
        ):
            out = out.append_column(name, pa.array(values, typ))
        first = [c for c in out.column_names if c not in GENERATED_COLUMNS]
        return out.select(first + list(GENERATED_COLUMNS))
