"""The file job (``python -m skipray.batch``, ``jobs/generate.py``), built on the processor.

Contract:

* The processor (``build_processor``, ``SkipDecodeProcessorConfig``; ``skipray.batch.processor``,
  ``skipray.batch.rows``, ``skipray.batch.actor``): Ray Data LLM's shape, ``processor(ds) -> ds``
  for any Dataset of ``prompt`` / ``messages`` rows.
* The file job (``jobs/generate.py``): ``plan`` runs in the driver before any Ray work: it lists the
  input (file, directory or glob; local or ``s3://``), reads footers and the id column only, refuses an
  unusable input with ``InputError`` (unreadable, a missing prompt/id column, files that disagree on a
  column's type), finds duplicate ids, reads what the output already holds and plans the work left
  per input row group (``skipray.batch.resume``), and builds the processor. ``execute`` streams:
  ``from_items(units)`` -> ``read_units`` (a task per row group: its pending rows, with
  ``source_file`` / ``source_row`` and the id checks) -> ``processor.generate`` (tokenize, the
  ``SkipDecodeEngineStage`` actors) -> the job's column order -> ``write_parquet``.
* Output columns: ``id, prompt, generated_text, num_prompt_tokens, num_generated_tokens, avg_layers,
  finish_reason, error`` first (the layout of earlier versions, so their outputs still resume), then the
  input's other columns (a clashing one renamed ``input_<name>``, uniquely), ``num_input_tokens``,
  ``generated_tokens``, ``source_file`` and ``source_row``.
* Bad rows (null/empty/non-string prompt, null id, a prompt too long for the context, an id that occurs
  more than once in the input: every occurrence, invalid per-row ``sampling_params`` / ``skip``)
  become output rows with ``error`` set and no text.
* Exactly once: Ray Data hands a window's rows to the writer only after the actor call returned, and
  retries a call whose actor died on a restarted actor (the pool's defaults: ``max_restarts=-1``,
  ``max_task_retries=-1``; an actor that dies in ``__init__`` is replaced by the autoscaler), so a
  killed actor loses no rows and duplicates none; each write is a new file named by Ray's write id, and
  a re-run skips every row already in the output (by id; null ids by input file and row).
* OpenAI batch files (``input_format``: ``openai-batch``, or ``auto`` and ``.jsonl`` input;
  ``skipray.batch.openai_batch``): the same plan, checks, resume, lock and manifest, keyed by ``custom_id``;
  the read step is ``openai_batch.read_lines`` and the output JSON-lines part files of OpenAI's batch
  output lines (``skipray.batch.openai_output``) instead of Parquet. ``--chat``, ``--prompt-column`` and
  ``--id-column`` do not apply to them (each line's ``url`` says chat or completions).
* Seeds: with ``--seed``, each row's random stream is seeded from (seed, its id) (``skipray.batch.rows``).
* ``summarize`` reads back the files this run wrote and returns the counts for the final summary line.
* GPU jobs cap Ray Data's resources (``gpu_job_limits``): GPUs at ``MAX x gpus_per_actor``, CPUs at
  the CPUs the cluster has now that the actors will not take plus the actors' own. Ray Data asks the
  autoscaler for more of whatever its tasks are short of; where the only worker types are GPU nodes,
  CPUs come only with GPU nodes no actor uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from skipray.batch import openai_batch, openai_output
from skipray.batch.files import InputCheck, InputError, Summary, check_input, filesystem_for, summarize, uri
from skipray.batch.lock import OutputLock
from skipray.batch.output import (
    FORMAT_PATTERNS,
    MANIFEST,
    Claim,
    JobFiles,
    Manifest,
    OutputError,
    claim,
    inspect,
    quarantine,
    write_text,
)
from skipray.batch.paths import LOCAL_SCHEME, overlap, split_scheme
from skipray.batch.processor import SkipDecodeProcessor, build_processor  # noqa: F401 (re-exported)
from skipray.batch.resume import OUTPUT_COLUMNS, SOURCE_COLUMNS, Done, plan_units, read_done, read_units, supersede
from skipray.batch.rows import SkipDecodeProcessorConfig


@dataclass
class JobConfig:
    """The file job's settings (its command line's flags). ``batch_size`` is the engine's rows and a Ray
    Data batch holds ``bucket_window`` of them (``processor_config``: ``engine_kwargs["max_num_seqs"]`` and
    ``batch_size``); ``actors`` is the pool's ``(min, max)``."""

    model: str = "default"
    input_format: str = "auto"  # "parquet", "openai-batch" (JSON lines), or "auto": by the input's names
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
    batch_size: int = 32  # the engine's rows (the processor's engine_kwargs["max_num_seqs"])
    bucket_window: int = 4  # engine batches per Ray Data batch, sorted by length; 1 = arrival order
    actors: tuple[int, int] = (1, 1)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 0  # 0: the node's cores / max actors
    device: str | None = None
    engine_retries: int = 2  # engine faults: retries of a window's failed rows on a fresh engine or actor
    allow_foreign_files: bool = False  # write beside files the job did not write (never reading them)
    allow_changed_settings: bool = False  # add rows made with settings other than the output's manifest
    shared_mount: bool = False  # local paths are the same shared mount on every node of the cluster

    def __post_init__(self) -> None:
        if (self.device or "").startswith("cuda") and not self.gpus_per_actor:
            self.gpus_per_actor = 1.0  # a CUDA actor must request its GPU, or Ray hides every GPU from it

    @property
    def sampling(self) -> dict:
        """The rows' default sampling params (vLLM's names), as the processor and the manifest take them."""
        return {
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
        }

    @property
    def window(self) -> int:
        return self.batch_size * max(1, self.bucket_window)

    def processor_config(self) -> SkipDecodeProcessorConfig:
        """The processor's config for this job (rows are named ``prompt`` and ``id`` by ``read_units``)."""
        # --batch-size is the engine's rows and a Ray Data batch holds --bucket-window of them
        return SkipDecodeProcessorConfig(
            model_source=self.model,
            batch_size=self.window,
            engine_kwargs={"max_num_seqs": self.batch_size},
            bucket_window=max(1, self.bucket_window),
            concurrency=tuple(self.actors),
            num_cpus_per_actor=self.cpus_per_actor,
            num_gpus_per_actor=self.gpus_per_actor,
            torch_threads=self.threads_per_actor,
            device=self.device,
            apply_chat_template=self.chat,
            schedule=self.schedule,
            id_column="id",
            max_model_len=self.max_positions,
            engine_retries=self.engine_retries,
            sampling_params=self.sampling,
        )


def model_facts(spec: str, schedule_args: argparse.Namespace) -> tuple[Any, Any, int]:
    """-> (SkipSchedule for the flags, CostModel, max positions); builds the model on the meta device."""
    from skipray.batch.processor import model_facts as facts_of
    from skipray.options import schedule_from_args

    f = facts_of(spec)
    return schedule_from_args(schedule_args, f.num_layers, f.trained), f.cost, f.max_positions


def job_columns(block: pa.Table) -> pa.Table:
    """The job's output layout (module contract): ``num_prompt_tokens`` beside ``num_input_tokens``."""
    block = block.append_column("num_prompt_tokens", block.column("num_input_tokens"))
    first = list(OUTPUT_COLUMNS)
    last = ["num_input_tokens", "generated_tokens", *SOURCE_COLUMNS]
    return block.select(first + [c for c in block.column_names if c not in first and c not in last] + last)


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
    units: list[dict]  # input row groups with rows left (skipray.batch.resume.plan_units)
    before: list[str]  # the job's own output files present before this run
    pending: int
    processor: SkipDecodeProcessor | None = None
    planning_s: float = 0.0
    claim: Claim | None = None
    cut_short: list[str] = field(default_factory=list)  # own files a crash cut short (quarantined by execute)
    done: Done | None = None
    s3_endpoint: str | None = None
    local_input: bool = False  # Ray's local:// form: read tasks run on the driver's node
    local_output: bool = False
    format: str = openai_batch.PARQUET  # "parquet" or "openai-batch" (openai_batch.input_format)

    @property
    def lines(self) -> bool:
        """Whether the job reads OpenAI batch files and writes JSON lines."""
        return self.format == openai_batch.OPENAI_BATCH


def manifest_for(input_path: str, cfg: JobConfig, fmt: str = openai_batch.PARQUET) -> Manifest:
    """The settings this run records in (and compares with) the output's manifest."""
    from skipray import __version__

    return Manifest(
        input=input_path,
        model=cfg.model,
        schedule=cfg.schedule,
        sampling=cfg.sampling,
        chat=cfg.chat,
        prompt_column=cfg.prompt_column,
        id_column=cfg.id_column,
        skipray_version=__version__,
        format=fmt,
        file_patterns=[FORMAT_PATTERNS[fmt]],
    )


def check_paths(input_path: str, output: str, cfg: JobConfig, joined: bool) -> None:
    """Refuse (``InputError``) an input and output that overlap, and local paths on a cluster the job
    joined unless declared a shared mount (``shared_mount``) or in Ray's ``local://`` form."""
    why = overlap(input_path, output) or overlap(input_path, output, "skipray-probe.jsonl")
    if why:
        raise InputError(f"--input and --output overlap: {why}; write the output elsewhere")
    if joined and not cfg.shared_mount:
        for flag, path in (("--input", input_path), ("--output", output)):
            if not path.startswith(("s3://", LOCAL_SCHEME)):
                raise InputError(
                    f"{flag} {path!r} is a local path, and this job runs on a Ray cluster it joined: each node would "
                    f"see its own disk. Use s3://, declare a mount every node shares with --shared-mount, or use "
                    f"{LOCAL_SCHEME}{path} (files on the driver's node only)"
                )


def plan(
    input_path: str, output: str, cfg: JobConfig, s3_endpoint: str | None = None, joined: bool | None = None
) -> Plan:
    """Driver-side checks and planning; reads only, writes nothing (no Ray needed). Raises ``InputError``
    for an unusable input or paths, ``OutputError`` for an output the job may not use or cannot read.
    ``joined``: whether the job runs on a cluster it joined (default: ``RAY_ADDRESS`` is set)."""
    t0 = time.perf_counter()
    joined = bool(os.environ.get("RAY_ADDRESS")) if joined is None else joined
    check_paths(input_path, output, cfg, joined)
    local_in, input_path = split_scheme(input_path)
    local_out, output = split_scheme(output)
    in_fs, in_path = filesystem_for(input_path, s3_endpoint)
    out_fs, out_path = filesystem_for(output, s3_endpoint)
    fmt = openai_batch.input_format(in_path, in_fs, cfg.input_format)
    if fmt == openai_batch.OPENAI_BATCH:
        openai_batch.check_flags(cfg.chat, cfg.prompt_column, cfg.id_column)
        check = openai_batch.check_input(in_path, in_fs)
    else:
        check = check_input(in_path, in_fs, cfg.prompt_column, cfg.id_column)
    where = lambda p: uri(out_fs, p)  # noqa: E731
    claimed = claim(
        out_fs,
        out_path,
        manifest_for(uri(in_fs, in_path), cfg, fmt),
        cfg.allow_foreign_files,
        cfg.allow_changed_settings,
        where=uri(out_fs, out_path),
    )
    cut = inspect(out_fs, claimed.files, where)
    kept = [f for f in claimed.files if f not in cut]
    if fmt == openai_batch.OPENAI_BATCH:
        done = openai_output.read_done(kept, out_fs, check, in_fs, where)
    else:
        done = read_done(kept, out_fs, where)
    units, pending = plan_units(check, done, in_fs)
    processor = SkipDecodeProcessor(cfg.processor_config()) if pending else None
    return Plan(
        cfg,
        in_fs,
        out_fs,
        out_path,
        check,
        units,
        claimed.files,
        pending,
        processor,
        time.perf_counter() - t0,
        claimed,
        cut,
        done,
        s3_endpoint,
        local_in,
        local_out,
        fmt,
    )


def build_pipeline(p: Plan):
    """The lazy Ray Data dataset of output rows (nothing runs until it is written or consumed)."""
    import ray

    cfg = p.cfg
    pin: dict[str, Any] = {}
    if p.local_input:  # local:// input: the files are on the driver's node
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        pin["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ds = ray.data.from_items(p.units, override_num_blocks=max(1, len(p.units)))
    if p.lines:
        read, kw = openai_batch.read_lines, {"fs": p.in_fs}
    else:
        kw = {"fs": p.in_fs, "schema": p.check.schema, "prompt_column": cfg.prompt_column, "id_column": cfg.id_column}
        read = read_units
    ds = ds.map_batches(read, batch_format="pyarrow", batch_size=1, num_cpus=0.25, fn_kwargs=kw, **pin)
    ds = p.processor.generate(ds)
    if p.lines:
        from skipray import __version__

        ctx = openai_output.LineContext(
            p.processor.row_context.tokenizer, cfg.model, f"skipray-{__version__}-{cfg.model}"
        )
        return ds.map_batches(
            openai_output.to_lines, batch_format="pyarrow", batch_size=None, num_cpus=0.25, fn_kwargs={"ctx": ctx}
        )
    return ds.map_batches(job_columns, batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def _write(p: Plan) -> None:
    import ray
    from ray.data import DataContext, ExecutionResources

    options = DataContext.get_current().execution_options
    before = options.resource_limits
    if p.cfg.gpus_per_actor > 0:
        cpu, gpu = gpu_job_limits(p.cfg, ray.nodes())
        options.resource_limits = ExecutionResources.for_limits(cpu=cpu, gpu=gpu)
        # Ray Data 2.60's default ("RATE_BASED") cluster autoscaler sizes its requests by throughput and
        # launched GPU nodes for its tasks' CPUs (tests/test_autoscaling.py: 4 GPU nodes for a 2-actor
        # pool); "V2" keeps its requests within the resource limits above. Read by the driver at execute.
        os.environ.setdefault("RAY_DATA_CLUSTER_AUTOSCALER", "V2")
    target = LOCAL_SCHEME + p.out_path if p.local_output else p.out_path
    try:
        if p.lines:
            build_pipeline(p).write_datasink(openai_output.lines_sink(p.out_fs, p.out_path, p.local_output))
        else:
            build_pipeline(p).write_parquet(
                target, filesystem=None if p.local_output else p.out_fs, filename_provider=JobFiles()
            )
    finally:
        options.resource_limits = before


def execute(p: Plan) -> Summary:
    """Lock the output, check it is as planned, move cut-short files aside, record the manifest, run the
    pipeline and write, then drop the engine-error rows this run superseded. Ray must be initialized by
    the caller when rows are pending. Raises ``OutputError`` (lock held elsewhere, output changed)."""
    t0 = time.perf_counter()
    where = lambda f: uri(p.out_fs, f)  # noqa: E731
    with OutputLock(p.out_fs, p.out_path, where(p.out_path), p.s3_endpoint) as lock:
        now = claim(p.out_fs, p.out_path, p.claim.manifest, True, True).files
        # under the lock: the files and which of them are cut short must be as planned (a file another
        # job was still writing when this one planned is complete now, or gone)
        if now != p.before or set(inspect(p.out_fs, now, where)) != set(p.cut_short):
            raise OutputError(f"the output {where(p.out_path)!r} changed since the job planned it; re-run")
        for message in p.claim.messages:
            print(f"[skipray] {message}", file=sys.stderr)
        quarantine(p.out_fs, p.out_path, p.cut_short, where)
        write_text(p.out_fs, f"{p.out_path}/{MANIFEST}", p.claim.manifest.to_json())
        if p.pending:
            _write(p)
        lock.check()  # another job took the output over meanwhile: rewrite nothing
        new = [f for f in claim(p.out_fs, p.out_path, p.claim.manifest, True, True).files if f not in set(p.before)]
        drop = openai_output.supersede if p.lines else supersede
        dropped = drop(p.out_fs, p.out_path, p.done, new) if p.done else 0
        if dropped:
            print(
                f"[skipray] replaced {dropped} engine-error rows of earlier runs with this run's rows", file=sys.stderr
            )
    count = openai_output.summarize if p.lines else summarize
    return count(new, p.out_fs, time.perf_counter() - t0, p.check.num_rows - p.pending)


def run(
    input_path: str, output: str, cfg: JobConfig, s3_endpoint: str | None = None, joined: bool | None = None
) -> Summary:
    """``plan`` then ``execute``."""
    return execute(plan(input_path, output, cfg, s3_endpoint, joined))
