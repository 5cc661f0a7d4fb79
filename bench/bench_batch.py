"""Benchmark the offline batch job: job tokens/s vs the direct engine, bucketed vs unbucketed windows.

Contract: a script, not a test. Same prompts (examples/prompts.parquet, first ``--limit``), same model,
schedule, batch size and window for all four runs; greedy. The direct engine runs each window the way
the job's actor does (``skipray.batch.actor.admission_order``, then micro-batches of ``--batch-size``
when every row has the same token budget, one ``Engine.generate`` over the window with finished rows
refilled when budgets differ). ``--mixed`` adds a direct and a job run where every other prompt asks
for 16 tokens and the rest for 128 (a ``sampling_params`` column), the case continuous batching is
for, plus ``direct_mixed_static``: the same rows in static micro-batches of ``--batch-size``, each
running until its longest row ends (how the actor ran before continuous batching). Prints a table and writes
bench/results/batch.json. Job tokens/s is wall time of the whole Ray Data run (actor start and model
load included); direct engine tokens/s is generation time only (load excluded). The job's actor is
wrapped to log its start-up and each window's times, so the table also shows where the job's extra
time went and its steady-state tokens/s (windows after the first, over the time since the first ended).
``--copies K`` repeats the prompts K times (new ids) so a long run shows the job's steady state, with
its fixed start-up (actor start, model load: seconds) spread over more tokens.
Run: ``.venv/bin/python bench/bench_batch.py [--limit 128 --max-new-tokens 32 --copies 1 --mixed]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


MIXED = (16, 128)  # --mixed: max_tokens of even / odd rows


def row_max_tokens(n: int, args, mixed: bool) -> list[int]:
    return [MIXED[i % 2] for i in range(n)] if mixed else [args.max_new_tokens] * n


def direct(
    m, schedule, prompts: list[list[int]], args, bucket: bool, mixed: bool = False, static: bool = False
) -> dict:
    from skipray.batch import admission_order
    from skipray.core.engine import Engine, SamplingParams

    engine = Engine(m.model, schedule, max_batch=args.batch_size, max_len=256, eos_token_ids=m.eos_token_ids)
    params = [SamplingParams(max_tokens=n) for n in row_max_tokens(len(prompts), args, mixed)]
    window = args.batch_size * args.bucket_window
    tokens, t0 = 0, time.perf_counter()
    for w in range(0, len(prompts), window):  # the same windows the job's actor sees, in its order
        order = [w + i for i in admission_order([len(p) for p in prompts[w : w + window]], bucket)]
        # static: one generate call per micro-batch, which runs until its longest row ends (the actor before
        # continuous batching); else the whole window at once, a finished row's cache row taking the next prompt
        step = args.batch_size if static else len(order)  # the actor: static unless the budgets differ
        for b in range(0, len(order), step):
            part = order[b : b + step]
            tokens += sum(
                len(c.token_ids) for c in engine.generate([prompts[i] for i in part], [params[i] for i in part])
            )
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(dt, 2), "tokens_per_s": round(tokens / dt, 1)}


def timed_engine_stage(log: Path):
    """``skipray.batch.SkipDecodeEngineStage`` that appends its start-up and each window's times to ``log``
    (JSON lines)."""
    import json as _json

    from skipray.batch.actor import SkipDecodeEngineStage

    class TimedEngineStage(SkipDecodeEngineStage):
        def __init__(self, spec) -> None:
            t = time.time()
            super().__init__(spec)
            with open(log, "a") as f:
                f.write(_json.dumps({"ev": "init", "start": t, "end": time.time()}) + "\n")

        def __call__(self, block):
            t = time.time()
            out = super().__call__(block)
            tokens = sum(out.column("num_generated_tokens").to_pylist())
            with open(log, "a") as f:
                f.write(_json.dumps({"ev": "window", "start": t, "end": time.time(), "tokens": tokens}) + "\n")
            return out

    return TimedEngineStage


def job(inp: Path, schedule, max_positions: int, args, bucket: bool) -> dict:
    """The Ray Data job end to end, and where its time went: actor start-up, first window, the rest."""
    import skipray.batch as batch
    import skipray.batch.actor as batch_actor

    out = Path(tempfile.mkdtemp(prefix="skipray-bench-"))
    log = out / "timeline.jsonl"
    plain = batch_actor.SkipDecodeEngineStage
    batch_actor.SkipDecodeEngineStage = timed_engine_stage(log)  # the processor looks the class up at call time
    try:
        cfg = batch.JobConfig(
            model=args.model,
            schedule=schedule.to_dict(),
            max_positions=max_positions,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            bucket_window=args.bucket_window if bucket else 1,
            actors=(1, 1),
            threads_per_actor=args.threads,
        )
        t0 = time.time()
        s = batch.run(str(inp), str(out / "gen"), cfg)
        events = [json.loads(line) for line in log.read_text().splitlines()]
        init = next(e for e in events if e["ev"] == "init")
        wins = sorted((e for e in events if e["ev"] == "window"), key=lambda e: e["end"])
        rest = wins[1:]
        steady = (sum(e["tokens"] for e in rest) / (rest[-1]["end"] - wins[0]["end"])) if rest else None
        return {
            "tokens": s.generated_tokens,
            "seconds": round(s.seconds, 2),
            "tokens_per_s": round(s.tokens_per_s, 1),
            "rows": s.rows,
            "errors": s.errors,
            "actor_start_s": round(init["start"] - t0, 2),
            "actor_init_s": round(init["end"] - init["start"], 2),
            "first_window_s": round(wins[0]["end"] - wins[0]["start"], 2),
            "later_windows_s": round(sum(e["end"] - e["start"] for e in rest) / max(1, len(rest)), 2),
            "steady_tokens_per_s": round(steady, 1) if steady else None,
        }
    finally:
        batch_actor.SkipDecodeEngineStage = plain
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    from skipray.env import apply, worker_env

    apply()  # as skipray's entry points run (before torch allocates)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--input", default=str(ROOT / "examples" / "prompts.parquet"))
    p.add_argument("--limit", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--copies", type=int, default=1, help="repeat the prompts this many times (new ids)")
    p.add_argument(
        "--skip-unbucketed-job", action="store_true", help="the unbucketed comparison on the direct engine only"
    )
    p.add_argument(
        "--mixed",
        action="store_true",
        help=f"also run direct and job with max_tokens {MIXED[0]} / {MIXED[1]} on alternate prompts",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bucket-window", type=int, default=4)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, same for both (on a loaded 2-core box 2 threads ran ~10x slower than 1)",
    )
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "batch.json"))
    args = p.parse_args()

    import pyarrow.parquet as pq
    import torch

    from skipray.loading import load
    from skipray.options import SCHEDULE_FLAGS, schedule_from_args
    from skipray.text import encode_prompt

    torch.set_num_threads(args.threads)
    import pyarrow as pa

    table = pq.read_table(args.input).slice(0, args.limit).select(["id", "prompt"])
    table = pa.concat_tables(
        [
            table.set_column(0, "id", pa.array([f"{i}-{k}" for i in table.column("id").to_pylist()]))
            for k in range(args.copies)
        ]
    )
    tmp = Path(tempfile.mkdtemp(prefix="skipray-bench-in-"))
    pq.write_table(table, tmp / "in.parquet")
    t0 = time.perf_counter()
    m = load(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    schedule = schedule_from_args(
        argparse.Namespace(full=False, **{k: None for k in SCHEDULE_FLAGS}), m.model.num_layers, m.schedule
    )
    prompts = [encode_prompt(m.tokenizer, t) for t in table.column("prompt").to_pylist()]
    res = {
        "direct_bucketed": direct(m, schedule, prompts, args, True, static=True),
        "direct_unbucketed": direct(m, schedule, prompts, args, False, static=True),
    }
    if args.mixed:
        res["direct_mixed_static"] = direct(m, schedule, prompts, args, True, mixed=True, static=True)
        res["direct_mixed"] = direct(m, schedule, prompts, args, True, mixed=True)
        mixed = table.append_column(
            "sampling_params", pa.array([{"max_tokens": n} for n in row_max_tokens(table.num_rows, args, True)])
        )
        pq.write_table(mixed, tmp / "mixed.parquet")
    del m
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env()},
    )
    try:
        res["job_bucketed"] = job(tmp / "in.parquet", schedule, 8192, args, True)
        if not args.skip_unbucketed_job:
            res["job_unbucketed"] = job(tmp / "in.parquet", schedule, 8192, args, False)
        if args.mixed:
            res["job_mixed"] = job(tmp / "mixed.parquet", schedule, 8192, args, True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = res["job_bucketed"]["tokens_per_s"] / res["direct_bucketed"]["tokens_per_s"]
    meta = {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "mixed": list(MIXED) if args.mixed else None,
        "batch_size": args.batch_size,
        "bucket_window": args.bucket_window,
        "model": args.model,
        "schedule": schedule.describe(),
        "model_load_s": round(load_s, 1),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "job_vs_direct": round(ratio, 3),
    }
    print(
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, "
        f"window {args.batch_size * args.bucket_window}, {schedule.describe()}, {os.cpu_count()} cores"
    )
    print(f"{'run':<20}{'tokens':>8}{'seconds':>9}{'tok/s':>9}")
    for name, r in res.items():
        print(f"{name:<20}{r['tokens']:>8}{r['seconds']:>9}{r['tokens_per_s']:>9}")
    j = res["job_bucketed"]
    steady = j["steady_tokens_per_s"] / res["direct_bucketed"]["tokens_per_s"] if j["steady_tokens_per_s"] else None
    meta["job_steady_vs_direct"] = round(steady, 3) if steady else None
    print(
        f"job / direct (bucketed): {ratio:.2f}x end to end (target >= 0.85x; job time includes actor start "
        f"and model load)"
    )
    print(
        f"job start-up: actor started after {j['actor_start_s']}s, its __init__ (imports, model load) took "
        f"{j['actor_init_s']}s; first window {j['first_window_s']}s, later windows {j['later_windows_s']}s each"
    )
    if steady:
        print(f"job after its first window: {j['steady_tokens_per_s']} tok/s = {steady:.2f}x the direct engine")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
