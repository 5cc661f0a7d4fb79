"""The default model's linear layers on this CPU, one torch thread: which fp32 kernel to use.

Times every matmul of one SmolLM2-135M decode step (30 layers of q, k, v, o, gate, up, down, each layer
with its own weights so they stream from memory as in a real step, then the 49152x576 lm_head) at
batch 1, 8, 32 and 320 (a prefill), with

* ``F.linear`` in fp32 (what Hugging Face models call; MKL sgemm in this torch build),
* ``skipray.core.kernels.product`` in fp32 (oneDNN, weights prepacked once; what skipray's forward uses),
* ``F.linear`` and the prepacked product in bf16 (for reference: another precision).

Checks that the packed results equal ``F.linear``'s, prints a table and writes bench/results/linear.json.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_linear.py``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

D, I, KV, L, VOCAB = 576, 1536, 192, 30, 49152  # SmolLM2-135M
SHAPES = [(D, D), (D, KV), (D, KV), (D, D), (D, I), (D, I), (I, D)]  # (in, out) per layer


def step_ms(fn, x_d, x_i, layers, head, repeats: int = 4) -> float:
    def step():
        for mods in layers:
            for m in mods:
                fn(m, x_i if m.in_features == I else x_d)
        fn(head, x_d)

    step()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    from skipray.core.kernels import apply, product

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [[nn.Linear(i, o, bias=False) for i, o in SHAPES] for _ in range(L)]
    head = nn.Linear(D, VOCAB, bias=False)
    layers16 = [[nn.Linear(i, o, bias=False).bfloat16() for i, o in SHAPES] for _ in range(L)]
    head16 = nn.Linear(D, VOCAB, bias=False).bfloat16()
    products = {}  # each layer's prepacked product, built once (as the engine builds its inference weights)

    def packed(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if m not in products:
            products[m] = product([m.weight], [m.bias], pack=True)
        return apply(x, products[m])

    rows = []
    print("one decode step's matmuls (30 layers + lm_head), one thread; packed = oneDNN prepacked, fp32")
    print(
        f"{'batch':>5} {'F.linear fp32 ms':>17} {'packed fp32 ms':>15} {'gain':>6} {'max |diff|':>11} "
        f"{'F.linear bf16 ms':>17} {'packed bf16 ms':>15}"
    )
    with torch.inference_mode():
        for b in (1, 8, 32, 320):
            x_d, x_i = torch.randn(b, D), torch.randn(b, I)
            diff = max(
                float((packed(m, x) - F.linear(x, m.weight)).abs().max())
                for m, x in ((layers[0][0], x_d), (layers[0][6], x_i), (head, x_d))
            )
            plain = step_ms(lambda m, x: F.linear(x, m.weight), x_d, x_i, layers, head)
            fast = step_ms(packed, x_d, x_i, layers, head)
            bf16 = step_ms(lambda m, x: F.linear(x, m.weight), x_d.bfloat16(), x_i.bfloat16(), layers16, head16)
            bf16_packed = step_ms(packed, x_d.bfloat16(), x_i.bfloat16(), layers16, head16)
            row = {
                "batch": b,
                "f_linear_fp32_ms": plain,
                "packed_fp32_ms": fast,
                "gain": plain / fast,
                "max_abs_diff": diff,
                "f_linear_bf16_ms": bf16,
                "packed_bf16_ms": bf16_packed,
            }
            rows.append(row)
            print(
                f"{b:>5} {plain:>17.1f} {fast:>15.1f} {plain / fast:>5.2f}x {diff:>11.1e} {bf16:>17.1f} "
                f"{bf16_packed:>15.1f}"
            )
    out = Path(__file__).parent / "results" / "linear.json"
    out.write_text(json.dumps({"threads": 1, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
