"""Offline batch generation on Ray Data: Parquet in (local or S3), skip-decoded generations out.

Contract:

* ``check_input`` / ``done_ids`` run in the driver before any actor starts. ``check_input`` lists the
  input (file, directory or glob; local or ``s3://``), reads its schema and its id column only, and
  raises ``InputError`` with a clear message for an unreadable input or a missing prompt/id column.
  It also finds ids that occur more than once. ``done_ids`` reads the id column of an existing output
  (resume); Parquet files there that cannot be read (a write cut short) are deleted and redone.
* ``build_pipeline`` streams: ``read_parquet`` -> ``repartition(target_num_rows_per_block=W)`` (streaming,
  no shuffle) -> ``prepare_block`` (a task per block: tokenize, add ``num_prompt_tokens``, mark bad rows,
  drop ids already done) -> ``Generator`` (a callable class on an autoscaling ``ActorPoolStrategy``; one
  ``Engine`` per actor, its KV cache reused across calls) -> ``write_parquet``. Each actor call gets one
  window of ``W = batch_size * bucket_window`` rows, sorts *that window* by prompt length and runs it in
  length-homogeneous micro-batches of ``batch_size`` (position-aligned: little left padding). There is
  no global sort, so memory is bounded by the windows in flight, whatever the corpus size.
* Bad rows (null/empty/non-string prompt, null id, prompt too long for the context, an id that occurs
  more than once in the input: every occurrence) become output rows with ``error`` set and no text.
* Exactly once: Ray Data hands a window's rows to the writer only after the actor call returned, and
  retries a call whose actor died on a restarted actor (the pool's defaults: ``max_restarts=-1``,
  ``max_task_retries=-1``; an actor that dies in ``__init__`` is replaced by the autoscaler), so a
  killed actor loses no rows and duplicates none; each write is a new file named by Ray's write id, and
  a re-run skips every id already in the output.
* ``summarize`` reads back the files this run wrote and returns the counts for the final summary line.
* ``build_pipeline`` reads Parquet footers with one actor (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``, unless
  set): Ray Data 2.60's Parquet reader otherwise starts a pool of 32 footer-reading actors of one
  CPU each, even for one file, and on an autoscaling cluster those pending actors alone launch nodes
  (``tests/test_autoscaling.py`` saw all 8 GPU nodes of ``cluster/aws.yaml`` start for a 1-actor job).
* GPU jobs cap Ray Data's resources (``gpu_job_limits``): GPUs at ``MAX x gpus_per_actor``, CPUs at
  the CPUs the cluster has now that the actors will not take plus the actors' own. Ray Data asks the
  autoscaler for more of whatever its tasks are short of (the same run asked for 27 tokenize tasks'
  CPUs); where the only worker types are GPU nodes, CPUs come only with GPU nodes no actor uses.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

OUTPUT_COLUMNS = ("id", "prompt", "generated_text", "num_prompt_tokens", "num_generated_tokens",
                  "avg_layers", "finish_reason", "error")
TOKENS = "__skipray_token_ids"

from skipray.batch_files import (  # noqa: E402  (re-exported: the job and the tests use them from here)
    InputCheck, InputError, Summary, check_input, done_ids, filesystem_for, summarize,
)


@dataclass
class JobConfig:
    model: str = "default"
    prompt_column: str = "prompt"
    id_column: str = "id"
    chat: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    schedule: dict | None = None  # SkipSchedule.to_dict(), resolved in the driver
    max_positions: int = 2048
    batch_size: int = 32
    bucket_window: int = 4  # batches per window sorted by length; 1 = arrival order
    bucket: bool = True
    actors: tuple[int, int] = (1, 1)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 0  # 0: the node's cores / max actors
    device: str | None = None
    crash_marker: str | None = None  # tests only: the first actor to see this path missing creates it and dies

    @property
    def window(self) -> int:
        return self.batch_size * max(1, self.bucket_window)


# -- model facts without loading weights (driver) ------------------------------------------------------
def model_facts(spec: str, schedule_args: argparse.Namespace) -> tuple[Any, Any, int]:
    """-> (SkipSchedule for the flags, CostModel, max positions); builds the model on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from skipray.loading import resolve, trained_schedule
    from skipray.model import SkipModel
    from skipray.options import schedule_from_args

    base, adapter = resolve(spec)
    with torch.device("meta"):
        sm = SkipModel(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)))
    trained = trained_schedule(base, adapter)
    return schedule_from_args(schedule_args, sm.num_layers, trained), sm.cost_model(), sm.max_positions


# -- tokenize step (a Ray task per block) --------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from skipray.loading import resolve

    return AutoTokenizer.from_pretrained(resolve(spec)[0])


def prepare_block(block: pa.Table, cfg: JobConfig, duplicate_ids: pa.Array, done: pa.Array | None) -> pa.Table:
    """Rename to ``id``/``prompt``, drop ids already done, tokenize, and set ``error`` on bad rows."""
    from skipray.text import encode_prompt

    rename = {}
    for c in block.column_names:
        if c == cfg.prompt_column:
            rename[c] = "prompt"
        elif c == cfg.id_column:
            rename[c] = "id"
        elif c in OUTPUT_COLUMNS or c == TOKENS:
            rename[c] = f"input_{c}"  # an input column that clashes with an output column is kept, renamed
    block = block.rename_columns([rename.get(c, c) for c in block.column_names])
    if done is not None and len(done):
        done_here = pc.is_in(block.column("id"), value_set=done.cast(block.column("id").type))
        block = block.filter(pc.invert(pc.fill_null(done_here, False)))
    tok = _tokenizer(cfg.model)
    dup = set(duplicate_ids.to_pylist())
    ids, prompts = block.column("id").to_pylist(), block.column("prompt").to_pylist()
    token_ids, lengths, errors = [], [], []
    for i, p in zip(ids, prompts):
        ids_i, err = [], None
        if i is None:
            err = "id is null"
        elif i in dup:
            err = f"duplicate id {i!r}: it occurs more than once in the input"
        elif p is None:
            err = "prompt is null"
        elif not isinstance(p, str):
            err = f"prompt is not a string (got {type(p).__name__})"
        elif not p.strip():
            err = "prompt is empty"
        else:
            try:
                ids_i = encode_prompt(tok, p, chat=cfg.chat)
            except Exception as e:  # noqa: BLE001 - a row the tokenizer rejects is a bad row
                err = f"cannot tokenize prompt: {e}"
            if not err and len(ids_i) + cfg.max_new_tokens > cfg.max_positions:
                err = (f"prompt too long: {len(ids_i)} tokens + max_new_tokens {cfg.max_new_tokens} exceed the "
                       f"model's context of {cfg.max_positions}")
        token_ids.append([] if err else ids_i)
        lengths.append(len(ids_i) if ids_i else 0)
        errors.append(err)
    ptype = block.column("prompt").type
    if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype)):
        block = block.set_column(block.column_names.index("prompt"), "prompt",
                                 pa.array([p if isinstance(p, str) else None for p in prompts], pa.string()))
    return (block.append_column("num_prompt_tokens", pa.array(lengths, pa.int32()))
                 .append_column("error", pa.array(errors, pa.string()))
                 .append_column(TOKENS, pa.array(token_ids, pa.list_(pa.int32()))))


def plan_batches(lengths: list[int], batch_size: int, bucket: bool) -> list[list[int]]:
    """Row indices of each micro-batch: sorted by length within the window when ``bucket``."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__) if bucket else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of prompt positions in the padded prefill tensors that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


# -- the actor ---------------------------------------------------------------------------------------
class Generator:
    """One model and one ``Engine`` per actor, built once; ``__call__`` generates for one window."""

    def __init__(self, cfg: JobConfig) -> None:
        import torch

        from skipray.engine import Engine
        from skipray.loading import load
        from skipray.metrics import EngineMetrics
        from skipray.schedule import SkipSchedule

        self.metrics = EngineMetrics("batch")
        threads = cfg.threads_per_actor or max(1, (os.cpu_count() or 1) // max(1, cfg.actors[1]))
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.m = load(cfg.model, device=cfg.device)
        schedule = SkipSchedule.from_dict(cfg.schedule) if cfg.schedule else None
        self.engine = Engine(self.m.model, schedule, max_batch=cfg.batch_size, max_len=256 + cfg.max_new_tokens,
                             eos_token_ids=self.m.eos_token_ids)
        self.calls = 0

    def __call__(self, block: pa.Table) -> pa.Table:
        from skipray.engine import SamplingParams
        from skipray.text import decode, stop_checker

        cfg, self.calls = self.cfg, self.calls + 1
        n = block.num_rows
        text: list[str | None] = [None] * n
        gen = [0] * n
        avg: list[float | None] = [None] * n
        reason: list[str | None] = [None] * n
        errors = block.column("error").to_pylist()
        toks = block.column(TOKENS).to_pylist()
        ok = [i for i in range(n) if errors[i] is None]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k, seed=cfg.seed, stop_fn=stop_checker(self.m.tokenizer, cfg.stop))
        for k, mb in enumerate(plan_batches([len(toks[i]) for i in ok], cfg.batch_size, cfg.bucket)):
            if cfg.crash_marker and self.calls == 2 and k == 1 and not os.path.exists(cfg.crash_marker):
                open(cfg.crash_marker, "w").close()
                os._exit(1)  # fault injection for tests: the actor process dies mid-call
            rows = [ok[j] for j in mb]
            t0 = time.perf_counter()
            comps = self.engine.generate([toks[r] for r in rows], params)
            self.metrics.record_batch(comps, self.m.model.num_layers, cfg.batch_size, time.perf_counter() - t0)
            for r, c in zip(rows, comps):
                text[r] = decode(self.m.tokenizer, c.token_ids, cfg.stop)
                gen[r], avg[r], reason[r] = len(c.token_ids), round(c.avg_layers, 3), c.finish_reason
        out = block.drop_columns([TOKENS])
        for name, values, typ in (("generated_text", text, pa.string()), ("num_generated_tokens", gen, pa.int32()),
                                  ("avg_layers", avg, pa.float32()), ("finish_reason", reason, pa.string())):
            out = out.append_column(name, pa.array(values, typ))
        first = list(OUTPUT_COLUMNS)
        return out.select(first + [c for c in out.column_names if c not in first])


# -- the pipeline --------------------------------------------------------------------------------------
def build_pipeline(files: list[str], fs, cfg: JobConfig, duplicate_ids: pa.Array, done: pa.Array | None):
    """The lazy Ray Data dataset of output rows (nothing runs until it is written or consumed)."""
    import ray
    from ray.data import ActorPoolStrategy

    # read with one footer actor, not 32: pending ones make the autoscaler launch nodes (see the contract);
    # read by the driver's read_parquet call below, so the driver's environment is the one that counts
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    ds = ray.data.read_parquet(files, filesystem=fs)
    ds = ds.repartition(target_num_rows_per_block=cfg.window)
    ds = ds.map_batches(prepare_block, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                        fn_kwargs={"cfg": cfg, "duplicate_ids": duplicate_ids, "done": done})
    lo, hi = cfg.actors
    return ds.map_batches(
        Generator, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=cfg.window,
        compute=ActorPoolStrategy(min_size=lo, max_size=hi), num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )  # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: dead actors are replaced


def gpu_job_limits(cfg: JobConfig, nodes: list[dict]) -> tuple[float, float]:
    """(CPU, GPU) caps for a GPU job from ``ray.nodes()``: GPUs ``MAX x gpus_per_actor``; CPUs those of
    the live nodes without GPUs, plus the CPUs of live GPU nodes beyond what their actors would take,
    plus ``MAX x cpus_per_actor`` (at least one CPU beyond the actors, so reading never starves)."""
    _, hi = cfg.actors
    spare = 0.0
    for n in nodes:
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        cpus, gpus = float(r.get("CPU", 0)), float(r.get("GPU", 0))
        actors_here = int(gpus // cfg.gpus_per_actor) if gpus else 0
        spare += max(0.0, cpus - actors_here * cfg.cpus_per_actor)
    return max(spare, 1.0) + hi * cfg.cpus_per_actor, hi * cfg.gpus_per_actor


@dataclass
class Plan:
    """What the driver found before any Ray work: the input, the output, what is left to do."""

    cfg: JobConfig
    in_fs: Any
    out_fs: Any
    out_path: str
    check: InputCheck
    done: pa.Array | None
    before: list[str]  # output files present before this run
    pending: int


def plan(input_path: str, output: str, cfg: JobConfig, s3_endpoint: str | None = None) -> Plan:
    """Driver-side checks (no Ray needed): raises ``InputError`` for an unusable input."""
    in_fs, in_path = filesystem_for(input_path, s3_endpoint)
    out_fs, out_path = filesystem_for(output, s3_endpoint)
    check = check_input(in_path, in_fs, cfg.prompt_column, cfg.id_column)
    done, before = done_ids(out_path, out_fs)
    pending = check.num_rows
    if done is not None:
        done = done.cast(check.ids.type)
        present = pc.fill_null(pc.is_in(check.ids, value_set=done), False)
        pending = check.num_rows - int(pc.sum(present.cast(pa.int64())).as_py() or 0)
    return Plan(cfg, in_fs, out_fs, out_path, check, done, before, pending)


def execute(p: Plan) -> Summary:
    """Run the pipeline and write; Ray must be initialized by the caller."""
    t0 = time.perf_counter()
    if p.pending:
        import ray
        from ray.data import DataContext, ExecutionResources

        options = DataContext.get_current().execution_options
        before = options.resource_limits
        if p.cfg.gpus_per_actor > 0:
            cpu, gpu = gpu_job_limits(p.cfg, ray.nodes())
            options.resource_limits = ExecutionResources.for_limits(cpu=cpu, gpu=gpu)
        try:
            ds = build_pipeline(p.check.files, p.in_fs, p.cfg, p.check.duplicate_ids, p.done)
            ds.write_parquet(p.out_path, filesystem=p.out_fs)
        finally:
            options.resource_limits = before
    return summarize(p.out_path, p.out_fs, p.before, time.perf_counter() - t0, p.check.num_rows - p.pending)


def run(input_path: str, output: str, cfg: JobConfig, s3_endpoint: str | None = None) -> Summary:
    """``plan`` then ``execute``."""
    return execute(plan(input_path, output, cfg, s3_endpoint))
