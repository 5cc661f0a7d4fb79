"""Engine benchmark on the default model (fp32): prints tables and writes bench/results/engine.json.

P1: full-depth engine vs Hugging Face ``generate`` tokens/s at batch 1, 8, 32 (greedy, 64 new tokens,
    EOS ignored so both produce exactly the same number of tokens).
P2: schedules of ~2x and ~3x theoretical FLOP speedup: realized speedup of the decode steps vs
    theoretical (both exclude the full-depth prompt pass, which skipping does not change).
Also: cold vs warm model load time. Every ratio is measured side by side in one run.

Run: .venv/bin/python bench/bench_engine.py [--batches 1 8 32] [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def prompts_for(tok, n: int) -> list[list[int]]:
    import pyarrow.parquet as pq

    from skipray.text import encode_prompt

    qs = pq.read_table(Path(__file__).parent.parent / "examples" / "heldout_prompts.parquet").column("prompt").to_pylist()
    return [encode_prompt(tok, qs[i % len(qs)], chat=True) for i in range(n)]


def time_it(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_time(engine, prompts, params, schedule=None) -> float:
    """Seconds from the first generated token (end of the full-depth prefill) to the last one: the
    decode steps that the theoretical speedup counts."""
    first = None
    for _ in engine.stream(prompts, params, schedule):
        first = first or time.perf_counter()
    return time.perf_counter() - first


def hf_generate(hf, prompts, n, pad):
    from skipray.engine import left_pad

    ids, real = left_pad(prompts, pad)
    am = real.long()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)


def load_times() -> dict:
    code = "import time;t=time.perf_counter();from skipray.loading import load;load('smollm2-base');print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"warm_load_s": float(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/engine.json")
    args = ap.parse_args()

    from skipray.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.schedule import SkipSchedule, theoretical_speedup

    m = load("smollm2-base", device="cpu")
    n = args.new_tokens
    params = SamplingParams(max_new_tokens=n)  # no EOS: every row makes n tokens
    engine = Engine(m.model, max_batch=max(args.batches), max_len=256)
    results: dict = {"device": "cpu", "threads": torch.get_num_threads(), "new_tokens": n, "p1": [], "p2": []}
    bf16 = load("smollm2-base", device="cpu", dtype=torch.bfloat16)  # outside P1's fp32 rule, for reference
    engine16 = Engine(bf16.model, max_batch=max(args.batches), max_len=256)

    print(f"P1: full depth, {n} new tokens, fp32, {torch.get_num_threads()} threads (last column: skipray in bf16)")
    print(f"{'batch':>5} {'HF tok/s':>10} {'skipray tok/s':>14} {'ratio':>6} {'bf16 tok/s':>11}")
    for b in args.batches:
        ps = prompts_for(m.tokenizer, b)
        t_hf = time_it(lambda: hf_generate(m.model.hf, ps, n, m.tokenizer.pad_token_id), args.repeats)
        t_us = time_it(lambda: engine.generate(ps, params), args.repeats)
        t_16 = time_it(lambda: engine16.generate(ps, params), args.repeats)
        row = {"batch": b, "hf_tok_s": b * n / t_hf, "skipray_tok_s": b * n / t_us, "ratio": t_hf / t_us,
               "skipray_bf16_tok_s": b * n / t_16}
        results["p1"].append(row)
        print(f"{b:>5} {row['hf_tok_s']:>10.1f} {row['skipray_tok_s']:>14.1f} {row['ratio']:>6.2f} "
              f"{row['skipray_bf16_tok_s']:>11.1f}")

    schedules = {
        "~2x": SkipSchedule(30, 16, 6, 64, warmup_layers=4),
        "~3x": SkipSchedule(30, 10, 4, 32, warmup_layers=2),
    }
    b = 8
    ps = prompts_for(m.tokenizer, b)
    P = sum(map(len, ps)) // len(ps)
    t_full = min(decode_time(engine, ps, params) for _ in range(args.repeats))
    print(f"\nP2: batch {b}, {n} new tokens; decode-step time (prefill excluded, as in the theory) "
          f"against full depth ({b * (n - 1) / t_full:.1f} tok/s)")
    print(f"{'schedule':>8} {'description':>52} {'avg layers':>10} {'theory':>7} {'realized':>8} {'ratio':>6}")
    for name, s in schedules.items():
        t = min(decode_time(engine, ps, params, s) for _ in range(args.repeats))
        theory = theoretical_speedup(s, m.model.cost_model(), P, n)
        row = {"name": name, "schedule": s.to_dict(), "avg_layers": s.average_layers(n), "theoretical": theory,
               "realized": t_full / t, "ratio": (t_full / t) / theory, "decode_tok_s": b * (n - 1) / t}
        results["p2"].append(row)
        print(f"{name:>8} {s.describe():>52} {row['avg_layers']:>10.2f} {theory:>7.2f} {row['realized']:>8.2f} {row['ratio']:>6.2f}")

    results.update(load_times())
    results["kv_cache_mib"] = engine.cache.nbytes / 2**20
    print(f"\nwarm model load (converted weights cached): {results['warm_load_s']:.2f}s; "
          f"KV cache for {engine.cache.max_batch} x {engine.cache.max_len}: {results['kv_cache_mib']:.1f} MiB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
