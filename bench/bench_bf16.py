"""bf16 on a CPU: packed (oneDNN) against unpacked bf16 against packed fp32, side by side in one run.

Contract: ``OMP_NUM_THREADS=1 python bench/bench_bf16.py [--batches 1 32] [--new-tokens 32] [--repeats 3]`` loads
the base default model in fp32 and in bf16 and generates at full depth (greedy, no EOS: every row makes
``--new-tokens``) with three engines: fp32 with packed weights (the default on a CPU), bf16 with packed
weights, and bf16 with ``packed_linears=False``, which runs bf16 the way a CPU without oneDNN bf16
packing (no AVX-512 BF16 or AMX) always does. Each batch size times the three engines in turn,
``--repeats`` rounds, best of each; prints tokens/s and writes ``bench/results/bf16.json`` with the CPU's
capability and whether it packs bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from skipray.env import apply as apply_env

apply_env()
import torch  # noqa: E402


def main() -> None:
    from bench_engine import prompts_for

    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.kernels import cpu_bf16_packing
    from skipray.core.model import SkipModel
    from skipray.loading import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/bf16.json")
    a = ap.parse_args()
    fp32 = load("smollm2-base", device="cpu")
    bf16 = load("smollm2-base", device="cpu", dtype=torch.bfloat16)
    big = max(a.batches)
    engines = {
        "fp32 packed": Engine(fp32.model, max_batch=big, max_len=256),
        "bf16 packed": Engine(bf16.model, max_batch=big, max_len=256),
        "bf16 unpacked": Engine(SkipModel(bf16.model.hf, packed_linears=False), max_batch=big, max_len=256),
    }
    params = SamplingParams(max_tokens=a.new_tokens)
    rows = []
    for b in a.batches:
        ps = prompts_for(fp32.tokenizer, b)
        best = dict.fromkeys(engines, float("inf"))
        for _ in range(a.repeats):
            for name, eng in engines.items():
                t = time.perf_counter()
                eng.generate(ps, params)
                best[name] = min(best[name], time.perf_counter() - t)
        rows.append({"batch": b, **{f"{k} tok/s": b * a.new_tokens / v for k, v in best.items()}})
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_packing": cpu_bf16_packing(),
        "threads": torch.get_num_threads(),
        "new_tokens": a.new_tokens,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
    }
    names = list(engines)
    print(
        f"CPU {result['cpu_capability']}, oneDNN bf16 packing: {result['cpu_bf16_packing']}, "
        f"{result['threads']} threads, {a.new_tokens} new tokens, full depth (tokens/s)"
    )
    print(f"{'batch':>5} " + " ".join(f"{n:>14}" for n in names))
    for r in rows:
        print(f"{r['batch']:>5} " + " ".join(f"{r[n + ' tok/s']:>14.1f}" for n in names))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
