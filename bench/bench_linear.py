"""Why P1 is flat: the default model's linear layers on this CPU, one torch thread.

Times (a) the five projections of one SmolLM2-135M layer as separate matmuls vs fused QKV and gate/up
matmuls, and (b) one 576x1536 linear in fp32 vs bf16, at batch 1, 8 and 32. Prints a table and writes
bench/results/linear.json.

Run: .venv/bin/python bench/bench_linear.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

D, I, KV = 576, 1536, 192  # SmolLM2-135M: hidden, MLP, key/value width


def per_call_ms(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) * 1e3 / n


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    print(f"{'batch':>5} {'separate ms':>12} {'fused ms':>9} {'fused gain':>10} {'fp32 ms':>8} {'bf16 ms':>8} {'bf16 gain':>9}")
    for b in (1, 8, 32):
        x = torch.randn(b, D)
        wq, wk, wv, wg, wu = (torch.randn(n, D) for n in (D, KV, KV, I, I))
        wqkv, wgu = torch.cat([wq, wk, wv]), torch.cat([wg, wu])
        sep = per_call_ms(lambda: [F.linear(x, w) for w in (wq, wk, wv, wg, wu)])
        fused = per_call_ms(lambda: (F.linear(x, wqkv), F.linear(x, wgu)))
        x16, wg16 = x.bfloat16(), wg.bfloat16()
        fp32 = per_call_ms(lambda: F.linear(x, wg), 500)
        bf16 = per_call_ms(lambda: F.linear(x16, wg16), 500)
        row = {"batch": b, "separate_ms": sep, "fused_ms": fused, "fused_gain": sep / fused,
               "fp32_ms": fp32, "bf16_ms": bf16, "bf16_gain": fp32 / bf16}
        rows.append(row)
        print(f"{b:>5} {sep:>12.3f} {fused:>9.3f} {sep / fused:>10.2f} {fp32:>8.3f} {bf16:>8.3f} {fp32 / bf16:>9.2f}")
    out = Path(__file__).parent / "results" / "linear.json"
    out.write_text(json.dumps({"threads": 1, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
