"""The file job's command line: Parquet prompts or OpenAI batch files in, skip-decoded generations out (Ray Data).

Contract: argument parsing, Ray start-up and the summary line only; the pipeline is
``skipray.batch.job``. Run it as ``python -m skipray.batch ...`` or ``python jobs/generate.py ...``
(starts an embedded local Ray), or as ``ray job submit --working-dir . -- python jobs/generate.py ...``
(joins the cluster in RAY_ADDRESS).
Exit status: 0 done (rows with bad input are error rows, counted, not fatal); 2 unusable input, output or
arguments (overlapping paths, an output the job does not own or that another job is writing, an input
changed while the job ran), or an actor that no node of the cluster can hold, now or after the autoscaler
adds one (``skipray.resources.check_schedulable``: the message names the resource; ``--resource-wait 0``
skips that check); 3 the engine failed on some rows after its retries (written with ``error_kind``
"engine", or not written when actors kept crashing): re-running the same command retries exactly those.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from skipray.options import add_sampling_args, add_schedule_args

    p = argparse.ArgumentParser(
        prog="generate", description="skip-decoded batch generation over Parquet or OpenAI batch files on Ray Data"
    )
    p.add_argument(
        "--input", required=True, help="Parquet or OpenAI batch (.jsonl) file, directory or glob; local or s3://"
    )
    p.add_argument(
        "--input-format",
        choices=("auto", "parquet", "openai-batch"),
        default="auto",
        help="auto: OpenAI batch files (JSON lines of custom_id/method/url/body, written back as OpenAI's batch "
        "output lines) for a .jsonl path or a directory of .jsonl files, else Parquet",
    )
    p.add_argument("--output", required=True, help="output directory, local or s3:// (re-runs resume)")
    p.add_argument("--model", default="default", help="'default', 'smollm2-base', a model dir or a .gguf file")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--id-column", default="id")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--batch-size", type=int, default=32, help="rows per engine batch")
    p.add_argument(
        "--bucket-window",
        type=int,
        default=4,
        help="batches per window that is sorted by prompt length (1: no bucketing)",
    )
    p.add_argument("--actors", default="1,1", help="MIN,MAX actors of the autoscaling pool (one engine each)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--threads-per-actor", type=int, default=0, help="torch threads (0: node cores / MAX actors)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the actor has a GPU)")
    p.add_argument(
        "--resource-wait",
        type=float,
        default=45.0,
        help="seconds to wait for the autoscaler to start a node that can hold one actor when none "
        "can now, before failing (0: skip this check)",
    )
    p.add_argument(
        "--engine-retries",
        type=int,
        default=2,
        help="times a window's rows that failed from an engine fault (out of memory, a device error, a "
        "crashed actor) run again on a fresh engine or actor (default 2)",
    )
    p.add_argument(
        "--allow-foreign-files",
        action="store_true",
        help="write into an output directory that holds files this job did not write (they are never read or touched)",
    )
    p.add_argument(
        "--allow-changed-settings",
        action="store_true",
        help="add rows to an output written with other settings (model, schedule, sampling, input, "
        "columns); the manifest then records the new ones",
    )
    p.add_argument(
        "--shared-mount",
        action="store_true",
        help="local --input/--output paths are a mount every node of the cluster shares (needed for "
        "local paths when the job joins a cluster)",
    )
    p.add_argument(
        "--s3-endpoint",
        default=None,
        help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000 (credentials: AWS_* env vars)",
    )
    add_schedule_args(p)
    add_sampling_args(p, max_new_tokens=64)
    return p


def parse_actors(text: str) -> tuple[int, int]:
    parts = [int(x) for x in text.split(",")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if not 1 <= lo <= hi or len(parts) > 2:
        raise ValueError(f"--actors wants MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skipray.batch import JobConfig, execute, model_facts, plan
    from skipray.core.schedule import theoretical_speedup

    try:
        schedule, cost, max_positions = model_facts(args.model, args)
        cfg = JobConfig(
            model=args.model,
            input_format=args.input_format,
            prompt_column=args.prompt_column,
            id_column=args.id_column,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            schedule=schedule.to_dict(),
            max_positions=max_positions,
            batch_size=args.batch_size,
            bucket_window=args.bucket_window,
            actors=parse_actors(args.actors),
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            threads_per_actor=args.threads_per_actor,
            device=args.device,
            engine_retries=args.engine_retries,
            allow_foreign_files=args.allow_foreign_files,
            allow_changed_settings=args.allow_changed_settings,
            shared_mount=args.shared_mount,
        )
        if args.engine_retries < 0:
            raise ValueError("--engine-retries must be >= 0")
        todo = plan(args.input, args.output, cfg, s3_endpoint=args.s3_endpoint)  # fails fast, before Ray
    except (ValueError, FileNotFoundError) as e:  # InputError and OutputError are ValueErrors
        print(f"generate: error: {e}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray binds to loopback
    import ray

    from skipray.env import worker_env

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": worker_env()})
        else:  # embedded local Ray with a bounded object store
            ray.init(object_store_memory=512 * 1024**2, include_dashboard=False, runtime_env={"env_vars": worker_env()})
    if not cfg.gpus_per_actor and ray.cluster_resources().get("GPU", 0):
        print(
            "[skipray] note: the actors request no GPU (--gpus-per-actor 0), so they run on CPUs, also on GPU "
            "nodes; pass --gpus-per-actor 1 or --device cuda to use the GPUs",
            file=sys.stderr,
        )
    if args.resource_wait > 0:
        from skipray.resources import Unschedulable, check_schedulable

        try:
            how = check_schedulable(
                {"CPU": args.cpus_per_actor, "GPU": cfg.gpus_per_actor},  # --device cuda requests one by itself
                "one generation actor (--cpus-per-actor, --gpus-per-actor)",
                can_grow=bool(os.environ.get("RAY_ADDRESS")),
                wait_s=args.resource_wait,
            )
        except Unschedulable as e:
            print(f"generate: error: {e} (--resource-wait 0 skips this check)", file=sys.stderr)
            return 2
        print(f"[skipray] resources: one actor {how}", file=sys.stderr)
    try:
        s = execute(todo)
    except Exception as e:  # noqa: BLE001 - sorted into the exit statuses of the module contract
        return _failed(e)
    ok = s.rows - s.errors
    new = s.generated_tokens / ok if ok else 0
    speed = theoretical_speedup(schedule, cost, round(s.prompt_tokens / ok) if ok else 1, round(new)) if ok else 1.0
    print(
        f"[skipray] rows {s.rows} | errors {s.errors} | skipped (already done) {s.skipped} | generated tokens "
        f"{s.generated_tokens} | {s.tokens_per_s:.1f} tok/s over {s.seconds:.1f}s | avg layers {s.avg_layers:.2f} "
        f"of {schedule.num_layers} | theoretical speedup {speed:.2f}x | {schedule.describe()} | output {args.output}"
    )
    if s.engine_errors:
        print(
            f"generate: {s.engine_errors} rows failed from engine faults after {args.engine_retries} retries "
            "(error_kind 'engine'); re-run the same command to retry exactly those rows",
            file=sys.stderr,
        )
        return 3
    return 0


def _failed(e: BaseException) -> int:
    """Exit status and message for a failure of ``execute`` (module contract)."""
    from skipray.batch.output import OutputError
    from skipray.batch.resume import InputChanged

    chain, x = [], e
    while x is not None and len(chain) < 20:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, (OutputError, InputChanged)):
            print(f"generate: error: {x}", file=sys.stderr)
            return 2
    if any(type(x).__name__ == "InputChanged" or "changed after the job planned it" in str(x) for x in chain):
        print(
            f"generate: error: an input file changed while the job ran; nothing of it was written ({e})",
            file=sys.stderr,
        )
        return 2
    print(
        f"generate: error: the job stopped: {e!r}\nRows written so far are kept; re-run the same command to "
        "finish the rest (actors that keep crashing: see --engine-retries)",
        file=sys.stderr,
    )
    return 3
