"""Engine benchmark on the default model (fp32): prints tables and writes bench/results/engine.json.

P1: full-depth engine vs Hugging Face ``generate`` tokens/s at batch 1, 8, 32 (greedy, 64 new tokens,
    EOS ignored so both produce exactly the same number of tokens).
P2: schedules of ~2x and ~3x theoretical FLOP speedup: realized speedup of the decode steps vs
    theoretical (both exclude the full-depth prompt pass, which skipping does not change).
Roofline for P1: at small batches a decode step reads every weight once, so its time is bounded below by
    weight bytes / the memory bandwidth one core can stream. The bench measures that bandwidth
    (``torch.sum`` over 1 GiB) and the decode-step time of both engines ((time for n tokens - time for
    1 token) / (n - 1): the prompt pass cancels out), and prints the most any fp32 engine could gain
    over Hugging Face's decode step on this machine.
Memory: KV cache bytes per row at full depth and under the ~2x and ~3x schedules (the cache shrinks with
    the schedule: a layer holds the prompt plus the steps that run it; ``skipray.core.memory``), checked
    against a real allocation, and the largest batch whose cache fits ``--mem-budget-gib`` next to the
    weights (20% kept for activations). ``--memory-only`` prints just this (no timing).
Also: warm model load time. Every ratio is measured side by side in one run.

Run: .venv/bin/python bench/bench_engine.py [--batches 1 8 32] [--new-tokens 64] [--repeats 2] [--memory-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from skipray.env import apply as apply_env

apply_env()  # huge pages for the weights, as skipray's entry points run (before torch allocates)
import torch  # noqa: E402


def prompts_for(tok, n: int) -> list[list[int]]:
    import pyarrow.parquet as pq

    from skipray.text import encode_prompt

    qs = (
        pq.read_table(Path(__file__).parent.parent / "examples" / "heldout_prompts.parquet")
        .column("prompt")
        .to_pylist()
    )
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


def read_bandwidth_gbs(nbytes: int = 2**30, repeats: int = 3) -> float:
    x = torch.ones(nbytes // 4)
    return nbytes / time_it(lambda: x.sum(), repeats) / 1e9


def step_seconds(run, n: int, repeats: int) -> float:
    """One decode step: (time for n new tokens - time for 1) / (n - 1); the prompt pass cancels out."""
    return (time_it(lambda: run(n), repeats) - time_it(lambda: run(1), repeats)) / (n - 1)


def hf_generate(hf, prompts, n, pad):
    from skipray.core.runner import pad_prompts

    ids, real = pad_prompts(prompts, pad)
    am = real.long()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)


def load_times() -> dict:
    """A second load in a new process: the ``load()`` call, and the process total with ``import torch``."""
    code = (
        "import time;t=time.perf_counter();from skipray.loading import load;u=time.perf_counter();"
        "load(SPEC);print(time.perf_counter()-u,time.perf_counter()-t)"
    )
    res = {}
    for spec in ("smollm2-base", "default"):
        load_s = []
        for _ in range(2):  # the first may convert or merge into the cache; the second is the warm load
            out = subprocess.run(
                [sys.executable, "-c", code.replace("SPEC", repr(spec))], capture_output=True, text=True, check=True
            )
            load_s = [float(x) for x in out.stdout.strip().splitlines()[-1].split()]
        res[spec] = {"load_call_s": load_s[0], "with_imports_s": load_s[1]}
    return {"warm_load": res}


def memory_table(m, schedules: dict, prompts, n: int, budget_gib: float) -> tuple[str, dict]:
    """KV cache per row of the padded ``prompts`` + ``n`` new tokens, per schedule (plus full depth), in the
    model's dtype, each checked against a real ``KVCache`` allocation; -> (markdown, JSON)."""
    from skipray.core.memory import GIB, format_report, layer_slots, memory_report
    from skipray.core.schedule import SkipSchedule

    model = m.model
    P = max(map(len, prompts))
    dtype_bytes = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    all_schedules = {"full": SkipSchedule.full(model.num_layers), **schedules}
    rows = memory_report(
        all_schedules,
        model.kv_heads,
        model.head_dim,
        dtype_bytes,
        P,
        n,
        int(budget_gib * GIB),
        weight_bytes,
        reserve=0.2,
    )
    for r, s in zip(rows, all_schedules.values()):
        lens = layer_slots(s, P, n)
        assert model.new_cache(1, max(lens), lens).nbytes == r.bytes_per_row, "memory model != KVCache"
    title = (
        f"Memory: KV cache per row, prompt {P} (padded) + {n} new tokens, {dtype_bytes * 8}-bit; largest batch "
        f"in {budget_gib:g} GiB after {weight_bytes / GIB:.2f} GiB of weights and a 20% reserve"
    )
    return format_report(rows, title, budget_gib), {
        "prompt_len": P,
        "new_tokens": n,
        "dtype_bytes": dtype_bytes,
        "budget_gib": budget_gib,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results/engine.json")
    ap.add_argument("--mem-budget-gib", type=float, default=24.0, help="memory budget of the memory table (GiB)")
    ap.add_argument("--memory-only", action="store_true", help="only the memory table (no timing)")
    args = ap.parse_args()

    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule, theoretical_speedup
    from skipray.loading import load

    m = load("smollm2-base", device="cpu")
    n = args.new_tokens
    schedules = {
        "~2x": SkipSchedule(30, 16, 6, 64, warmup_layers=4),
        "~3x": SkipSchedule(30, 10, 4, 32, warmup_layers=2),
    }
    if args.memory_only:
        print(memory_table(m, schedules, prompts_for(m.tokenizer, 8), n, args.mem_budget_gib)[0])
        return
    params = SamplingParams(max_tokens=n)  # no EOS: every row makes n tokens
    engine = Engine(m.model, max_batch=max(args.batches), max_len=256)
    results: dict = {"device": "cpu", "threads": torch.get_num_threads(), "new_tokens": n, "p1": [], "p2": []}
    bf16 = load("smollm2-base", device="cpu", dtype=torch.bfloat16)  # outside P1's fp32 rule, for reference
    engine16 = Engine(bf16.model, max_batch=max(args.batches), max_len=256)

    print(f"P1: full depth, {n} new tokens, fp32, {torch.get_num_threads()} threads (last column: skipray in bf16)")
    print(f"{'batch':>5} {'HF tok/s':>10} {'skipray tok/s':>14} {'ratio':>6} {'bf16 tok/s':>11}")
    for b in args.batches:
        ps = prompts_for(m.tokenizer, b)
        t_hf = time_it(lambda ps=ps: hf_generate(m.model.hf, ps, n, m.tokenizer.pad_token_id), args.repeats)
        t_us = time_it(lambda ps=ps: engine.generate(ps, params), args.repeats)
        t_16 = time_it(lambda ps=ps: engine16.generate(ps, params), args.repeats)
        row = {
            "batch": b,
            "hf_tok_s": b * n / t_hf,
            "skipray_tok_s": b * n / t_us,
            "ratio": t_hf / t_us,
            "skipray_bf16_tok_s": b * n / t_16,
        }
        results["p1"].append(row)
        print(
            f"{b:>5} {row['hf_tok_s']:>10.1f} {row['skipray_tok_s']:>14.1f} {row['ratio']:>6.2f} "
            f"{row['skipray_bf16_tok_s']:>11.1f}"
        )

    bw = read_bandwidth_gbs()
    weight_bytes = sum(p.numel() * p.element_size() for p in m.model.hf.parameters())  # tied lm_head once
    floor = weight_bytes / (bw * 1e9)
    results["roofline"] = {
        "read_bandwidth_gbs": bw,
        "weight_mb": weight_bytes / 1e6,
        "step_floor_ms": floor * 1e3,
        "rows": [],
    }
    print(
        f"\nRoofline: one core streams {bw:.1f} GB/s; a full-depth step reads {weight_bytes / 1e6:.0f} MB of fp32 "
        f"weights, so no step can take less than {floor * 1e3:.1f} ms"
    )
    print(f"{'batch':>5} {'HF ms/step':>11} {'skipray ms/step':>16} {'HF GB/s':>8} {'max gain over HF':>17}")
    for b in [x for x in args.batches if x <= 8]:
        ps = prompts_for(m.tokenizer, b)
        t_hf = step_seconds(lambda k, ps=ps: hf_generate(m.model.hf, ps, k, m.tokenizer.pad_token_id), n, args.repeats)
        t_us = step_seconds(lambda k, ps=ps: engine.generate(ps, SamplingParams(max_tokens=k)), n, args.repeats)
        row = {
            "batch": b,
            "hf_step_ms": t_hf * 1e3,
            "skipray_step_ms": t_us * 1e3,
            "hf_gbs": weight_bytes / t_hf / 1e9,
            "max_gain": t_hf / floor,
        }
        results["roofline"]["rows"].append(row)
        print(
            f"{b:>5} {row['hf_step_ms']:>11.1f} {row['skipray_step_ms']:>16.1f} {row['hf_gbs']:>8.1f} "
            f"{row['max_gain']:>16.2f}x"
        )

    b = 8
    ps = prompts_for(m.tokenizer, b)
    P = sum(map(len, ps)) // len(ps)
    t_full = min(decode_time(engine, ps, params) for _ in range(args.repeats))
    print(
        f"\nP2: batch {b}, {n} new tokens; decode-step time (prefill excluded, as in the theory) "
        f"against full depth ({b * (n - 1) / t_full:.1f} tok/s)"
    )
    print(f"{'schedule':>8} {'description':>52} {'avg layers':>10} {'theory':>7} {'realized':>8} {'ratio':>6}")
    for name, s in schedules.items():
        t = min(decode_time(engine, ps, params, s) for _ in range(args.repeats))
        theory = theoretical_speedup(s, m.model.cost_model(), P, n)
        row = {
            "name": name,
            "schedule": s.to_dict(),
            "avg_layers": s.average_layers(n),
            "theoretical": theory,
            "realized": t_full / t,
            "ratio": (t_full / t) / theory,
            "decode_tok_s": b * (n - 1) / t,
        }
        results["p2"].append(row)
        print(
            f"{name:>8} {s.describe():>52} {row['avg_layers']:>10.2f} {theory:>7.2f} {row['realized']:>8.2f} "
            f"{row['ratio']:>6.2f}"
        )

    table, results["memory"] = memory_table(m, schedules, ps, n, args.mem_budget_gib)
    print("\n" + table)
    results.update(load_times())
    results["kv_cache_mib"] = engine.cache.nbytes / 2**20
    for spec, r in results["warm_load"].items():
        print(
            f"\nwarm load of {spec!r} in a new process: load() {r['load_call_s']:.2f}s, "
            f"{r['with_imports_s']:.2f}s with importing torch",
            end="",
        )
    print(f"\nKV cache for {engine.cache.max_batch} x {engine.cache.max_len}: {results['kv_cache_mib']:.1f} MiB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
