"""Realized skip speedup under continuous batching, against the schedule's theoretical one.

Contract: ``python bench/bench_skip_speedup.py [--model default] [--duration 20] [--pairs 3]
[--max-tokens 64] [--in-flight 16] [--threads 1] [--dtype float32] [--out bench/results/skip_speedup.json]``

* One ``Engine`` in this process (no Ray, no HTTP) keeps ``--in-flight`` requests always in flight: a
  finished request is replaced at once by the next prompt, as that many closed-loop clients would.
  Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``), greedy.
* ``skip`` runs every request under the model's trained schedule, ``full`` at full depth; the two
  alternate ``--pairs`` times in one run (skip, full, full, skip, ...), each for ``--duration``
  seconds, and each mode's median generated tokens/s is reported.
* ``theoretical`` is the FLOP ratio of full depth over the schedule for these prompts and lengths
  (``skipray.core.schedule.theoretical_speedup``: every layer's matmuls and attention over its
  context, and the lm_head); ``realized / theoretical`` is the share of it the engine turns into time.

Prints a table and writes the JSON (every run, the medians, the machine's torch version and CPU count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

PROMPTS = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of a detective novel you invent.",
    "How do vaccines train the immune system?",
    "List the steps to bake bread at home.",
    "What makes a good team leader?",
    "Explain what a database index is.",
    "Describe a walk through a busy market.",
    "How does a bicycle stay upright?",
    "Write a polite email declining a meeting.",
    "What is photosynthesis?",
    "Compare trains and planes for a 500 km trip.",
]


def run(eng, ids, params, schedule, in_flight: int, duration: float) -> dict:
    """Generated tokens/s with ``in_flight`` requests always in flight for ``duration`` seconds."""
    sent = 0

    def submit() -> None:
        nonlocal sent
        eng.add_request(ids[sent % len(ids)], params, schedule)
        sent += 1

    for _ in range(in_flight):
        submit()
    tokens, done, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        for ev in eng.step():
            tokens += ev.token_id is not None
            if ev.finish_reason is not None:
                done += 1
                submit()
    dt = time.perf_counter() - t0
    eng.reset()  # drop what is still in flight so the next run starts empty (not timed)
    return {"tokens": tokens, "requests": done, "seconds": dt, "tok_s": tokens / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--in-flight", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="bench/results/skip_speedup.json")
    a = ap.parse_args()

    import torch

    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule, theoretical_speedup
    from skipray.loading import load
    from skipray.text import encode_prompt

    torch.set_num_threads(a.threads)
    m = load(a.model, device="cpu", dtype=getattr(torch, a.dtype))
    ids = [encode_prompt(m.tokenizer, p, chat=True) for p in PROMPTS]
    eng = Engine(m.model, m.schedule, max_batch=a.in_flight, max_len=256, eos_token_ids=m.eos_token_ids)
    params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    schedules = {"skip": m.schedule, "full": SkipSchedule.full(m.schedule.num_layers)}
    prompt_len = round(sum(map(len, ids)) / len(ids))
    theory = theoretical_speedup(m.schedule, m.model.cost_model(), prompt_len, a.max_tokens)

    run(eng, ids, params, schedules["skip"], a.in_flight, min(5.0, a.duration))  # warm-up, not counted
    runs: dict[str, list[dict]] = {"skip": [], "full": []}
    for p in range(a.pairs):
        for mode in ("skip", "full") if p % 2 == 0 else ("full", "skip"):
            r = run(eng, ids, params, schedules[mode], a.in_flight, a.duration)
            runs[mode].append(r)
            print(
                f"pair {p} {mode}: {r['tok_s']:.1f} tok/s ({r['tokens']} tokens, {r['requests']} requests)", flush=True
            )
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    realized = med["skip"] / med["full"]
    avg = m.schedule.average_layers(a.max_tokens)
    print()
    print("| model | schedule | layers/token | full tok/s | skip tok/s | realized | theoretical | realized/theory |")
    print("|---|---|---|---|---|---|---|---|")
    sc = m.schedule
    print(
        f"| {a.model} | {sc.max_layers}->{sc.min_layers} over {sc.decay_tokens} steps | {avg:.2f} | "
        f"{med['full']:.1f} | {med['skip']:.1f} | {realized:.2f}x | {theory:.2f}x | {realized / theory:.2f} |"
    )
    out = {
        "model": a.model,
        "schedule": m.schedule.to_dict(),
        "avg_layers": avg,
        "in_flight": a.in_flight,
        "max_tokens": a.max_tokens,
        "threads": a.threads,
        "dtype": a.dtype,
        "prompt_len": prompt_len,
        "median_tok_s": med,
        "realized_speedup": realized,
        "theoretical_speedup": theory,
        "realized_over_theoretical": realized / theory,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
