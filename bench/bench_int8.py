"""Batch-1 decode matmuls with cold weights: prepacked fp32 / bf16, separate or fused, and weight-only int8.

Contract: a script, not a test. It builds 30 layers of the default model's linear shapes (SmolLM2-135M:
q 576x576, k/v 192x576, o 576x576, gate/up 1536x576, down 576x1536, and the 49152x576 lm_head) with
random weights, each layer its own tensors, so one pass over them streams every weight from memory as
a decode step does (the weights, 427 MB in fp32, do not fit the caches). For each kind it times one
such pass at batch 1, best of ``--repeats``:

* ``fp32`` / ``bf16``: oneDNN with prepacked weights (``skipray.core.kernels.product``'s kernel),
  the seven projections separately (``sep``) and as four matmuls with q/k/v and gate/up concatenated
  (``fused``, what a fused ``product`` runs);
* ``int8``: torch's weight-only int8 kernel ``torch._weight_int8pack_mm`` (int8 weights, one bf16
  scale per output channel, bf16 activations).

Prints a table (ms per pass over the 30 layers, with and without the lm_head, and the GB/s that
implies) and writes ``bench/results/int8.json``.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_int8.py [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SEPARATE = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
FUSED = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD = (49152, 576)
LAYERS = 30


def matmul(kind: str, shape: tuple[int, int]):
    """A batch-1 ``x -> x @ W.T`` for a fresh random ``W`` of ``shape`` stored as ``kind``."""
    if kind == "int8":
        w = torch.randint(-127, 127, shape, dtype=torch.int8)
        scales = torch.rand(shape[0], dtype=torch.bfloat16) / 100
        return lambda x: torch._weight_int8pack_mm(x, w, scales)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(*shape, dtype=dtype) / 30)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.json"))
    args = ap.parse_args()
    from bench_engine import time_it  # best of repeats, seconds

    rows = []
    with torch.inference_mode():
        for kind in ("fp32", "bf16", "int8"):
            x_dtype = torch.float32 if kind == "fp32" else torch.bfloat16
            bytes_per = {"fp32": 4, "bf16": 2, "int8": 1}[kind]
            for layout, shapes in (("sep", SEPARATE), ("fused", FUSED)):
                layers = [[(matmul(kind, s), s[1]) for s in shapes] for _ in range(LAYERS)]
                head = matmul(kind, HEAD)
                xs = {k: torch.randn(1, k, dtype=x_dtype) for k in (576, 1536)}

                def layers_pass(layers=layers, xs=xs):
                    for layer in layers:
                        for f, k in layer:
                            f(xs[k])

                def step(layers_pass=layers_pass, head=head, xs=xs):
                    layers_pass()
                    head(xs[576])

                for _ in range(3):  # warm-up
                    step()
                t_layers, t_step = time_it(layers_pass, args.repeats), time_it(step, args.repeats)
                nbytes = LAYERS * sum(a * b for a, b in shapes) * bytes_per
                rows.append(
                    {
                        "kind": kind,
                        "layout": layout,
                        "layers_ms": t_layers * 1e3,
                        "with_head_ms": t_step * 1e3,
                        "layer_weights_mb": nbytes / 1e6,
                        "layers_gbs": nbytes / t_layers / 1e9,
                    }
                )
                del layers, head
    print(f"{'kind':<6}{'layout':<7}{'30 layers ms':>13}{'+ lm_head ms':>14}{'weights MB':>12}{'GB/s':>7}")
    for r in rows:
        print(
            f"{r['kind']:<6}{r['layout']:<7}{r['layers_ms']:>13.2f}{r['with_head_ms']:>14.2f}"
            f"{r['layer_weights_mb']:>12.0f}{r['layers_gbs']:>7.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
