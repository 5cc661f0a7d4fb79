"""Seconds per training step of skip distillation, three ways, side by side in one run.

1. live teacher: the 30-layer teacher runs every step, and the student forward covers prompt + answer;
2. cached teacher: the teacher's top-k log-probs come from the data (``distill-data --topk``);
3. cached teacher + cached prompt: the prompt runs once without gradients (``train.answer_logits``).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train_step.py --data runs/data/project/part-00000.parquet
Prints a table and writes bench/results/train_step.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="distill-data output with teacher_top_* columns")
    ap.add_argument("--schedule-file", default=None, help="schedule JSON (default: 30->10 over 36, power 1.5)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="bench/results/train_step.json")
    args = ap.parse_args()

    import torch

    from skipray.core.schedule import SkipSchedule
    from skipray.options import read_schedule_file
    from skipray.training import train as T
    from skipray.training.data import batches, collate, load_examples

    cfg = T.TrainConfig(data=args.data, out="/tmp/skipray-bench-train", schedule={}, batch_size=args.batch_size)
    loaded, model, teacher, params = T.prepare(cfg)
    sched = (
        read_schedule_file(args.schedule_file, model.num_layers)
        if args.schedule_file
        else SkipSchedule(model.num_layers, 30, 10, 36, shape="power", power=1.5)
    )
    examples = load_examples(args.data, loaded.tokenizer, max_len=192)
    data = batches(examples, args.batch_size, seed=0)
    step_batches = [collate(next(data), loaded.tokenizer.pad_token_id or 0) for _ in range(args.steps + 1)]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def run(mode: str) -> float:
        times = []
        for b in step_batches:
            if mode == "live teacher":
                b = dataclasses.replace(b, teacher_ids=None, teacher_logprobs=None)
            t0 = time.perf_counter()
            loss, _ = T.skip_loss(
                model, teacher, b, sched, 1.0, 0.0, cached_prompt=mode == "cached teacher + cached prompt"
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return sum(times[1:]) / len(times[1:])  # the first step warms up

    rows = {m: run(m) for m in ("live teacher", "cached teacher", "cached teacher + cached prompt")}
    tokens = sum(int(b.real.sum()) for b in step_batches[1:]) / args.steps
    print(f"| training step ({args.batch_size} sequences, ~{tokens:.0f} tokens) | s/step | vs live teacher |")
    print("|---|---:|---:|")
    for m, s in rows.items():
        print(f"| {m} | {s:.2f} | {rows['live teacher'] / s:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "schedule": sched.to_dict(),
                "batch_size": args.batch_size,
                "tokens_per_step": tokens,
                "seconds_per_step": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
