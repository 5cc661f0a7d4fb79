"""Benchmark resuming the batch job at scale: planning in the driver, and skipping done rows in the read tasks.

Synthesizes an input of ``--rows`` ids (``--files`` Parquet files, ``--row-group`` rows per row group)
and an output that already holds a random ``--done`` fraction of them (files of ``--output-file-rows``
rows, as the job writes one file per window), then times, without Ray (generation is not the point):

* planning (``batch.plan``'s driver work): ``check_input`` (footers, the id column, duplicates),
  ``read_done`` (the output's ids and source positions) and ``plan_units`` (one hash set, per-row-group
  bitmaps);
* skipping: ``read_units`` over every unit, as the read tasks run it (read the row group, drop done rows);
* the previous design for comparison: every tokenizing task was sent the whole done-id array and built
  a hash set of it for its block of ``--window`` rows; timed on ``--old-blocks`` blocks and scaled to all.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_resume.py [--rows 1000000 --done 0.9]``; writes
``bench/results/resume.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthesize(tmp: Path, args) -> tuple[Path, Path, int]:
    """-> (input dir, output dir, rows done)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp, out = tmp / "in", tmp / "out"
    inp.mkdir()
    out.mkdir()
    per_file = args.rows // args.files
    rng = np.random.default_rng(0)
    done_rows = []
    for f in range(args.files):
        ids = [f"r{f * per_file + i:09d}" for i in range(per_file)]
        path = inp / f"part-{f:04d}.parquet"
        pq.write_table(
            pa.table({"id": ids, "prompt": ["Tell me about owls."] * per_file}), path, row_group_size=args.row_group
        )
        mask = rng.random(per_file) < args.done
        rows = np.flatnonzero(mask)
        done_rows.append(
            pa.table(
                {
                    "id": pa.array(ids).take(pa.array(rows)),
                    "source_file": [str(path)] * len(rows),
                    "source_row": pa.array(rows, pa.int64()),
                }
            )
        )
    done = pa.concat_tables(done_rows)
    done = done.take(pa.array(rng.permutation(done.num_rows)))  # outputs are written in no input order
    n = args.output_file_rows
    for k in range(0, done.num_rows, n):
        pq.write_table(done.slice(k, n), out / f"out-{k // n:07d}.parquet")
    return inp, out, done.num_rows


def old_design(check, done_ids, args) -> dict:
    """Per block: unpickle the done array sent with every task, build its hash set, filter the block."""
    import pyarrow.compute as pc

    payload = pickle.dumps(done_ids)
    ids = check.ids.combine_chunks()
    t0 = time.perf_counter()
    for b in range(args.old_blocks):
        block = ids.slice(b * args.window, args.window)
        value_set = pickle.loads(payload)
        pc.filter(block, pc.invert(pc.fill_null(pc.is_in(block, value_set=value_set), False)))
    per_block = (time.perf_counter() - t0) / args.old_blocks
    blocks = -(-check.num_rows // args.window)
    return {
        "bytes_per_task": len(payload),
        "seconds_per_block": round(per_block, 4),
        "blocks": blocks,
        "task_seconds_all_blocks": round(per_block * blocks, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=10)
    p.add_argument("--row-group", type=int, default=50_000)
    p.add_argument("--done", type=float, default=0.9)
    p.add_argument("--output-file-rows", type=int, default=128)
    p.add_argument("--window", type=int, default=128, help="rows per tokenizing block in the old design")
    p.add_argument("--old-blocks", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume.json"))
    args = p.parse_args()

    import pyarrow as pa

    from skipray.batch.files import check_input
    from skipray.batch.resume import plan_units, read_done, read_units

    tmp = Path(tempfile.mkdtemp(prefix="skipray-resume-"))
    try:
        t0 = time.perf_counter()
        inp, out, n_done = synthesize(tmp, args)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        check = check_input(str(inp), None, "prompt", "id")
        t_check = time.perf_counter() - t0
        t0 = time.perf_counter()
        done = read_done(str(out), None)
        t_done = time.perf_counter() - t0
        t0 = time.perf_counter()
        units, pending = plan_units(check, done, None)
        t_units = time.perf_counter() - t0
        sizes = [len(pickle.dumps(u)) for u in units]
        t0 = time.perf_counter()
        read = sum(read_units(pa.Table.from_pylist([u]), None, check.schema, "prompt", "id").num_rows for u in units)
        t_skip = time.perf_counter() - t0
        assert read == pending == args.rows - n_done, (read, pending, n_done)
        res = {
            "rows": args.rows,
            "done": n_done,
            "pending": pending,
            "input_files": args.files,
            "row_group_rows": args.row_group,
            "output_files": len(done.files),
            "setup_s": round(setup, 1),
            "plan": {
                "check_input_s": round(t_check, 2),
                "read_done_s": round(t_done, 2),
                "plan_units_s": round(t_units, 2),
                "total_s": round(t_check + t_done + t_units, 2),
            },
            "skip": {
                "units": len(units),
                "bytes_per_unit_max": max(sizes, default=0),
                "read_and_skip_s": round(t_skip, 2),
                "rows_read_per_s": round(args.rows / t_skip),
            },
            "old_design": old_design(check, done.ids, args),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
