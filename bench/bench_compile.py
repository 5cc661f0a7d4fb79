"""The decode step under ``torch.compile`` against the eager step, on the default model (fp32, one thread).

For each batch size: ``b`` requests are prefilled and decoded a few steps (rows at different steps, the
~2x schedule when ``--skip``), then the next decode step's pass (``forward_segments`` over its segment,
as ``ModelRunner.execute`` runs it; no sampling) is timed eager (today's path: oneDNN prepacked weights),
eager without packing, and compiled, alternately, best of ``--repeats`` runs of ``--steps`` passes each
(the same slots each time: cache writes are idempotent). Inductor cannot lower a product over weights
packed outside it (``mkldnn._linear_pointwise``), so the compiled pass runs the same model with unpacked
inference weights (``SkipModel(packed_linears=False)``) and inductor makes its own GEMMs. Compile time is
reported apart. The compiled pass must give the eager pass's logits (checked).

Run: .venv/bin/python bench/bench_compile.py [--batches 1 8 32] [--backend inductor] [--skip]
Writes bench/results/compile.json. A backend that fails to compile is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    ap.add_argument("--steps", type=int, default=20, help="passes per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", action="store_true", help="the ~2x schedule (rows at different depths)")
    ap.add_argument("--out", default="bench/results/compile.json")
    args = ap.parse_args()

    import torch

    from skipray.core.engine import Engine
    from skipray.core.model import SkipModel, forward_segments
    from skipray.core.requests import SamplingParams
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load

    torch.set_num_threads(1)
    m = load("smollm2-base", device="cpu")
    plain = SkipModel(m.model.hf, packed_linears=False)  # the same weights, unpacked (what inductor can lower)
    plain.build_inference_weights()
    sched = SkipSchedule(30, 16, 6, 64, warmup_layers=4) if args.skip else None
    rows = []
    depth = "~2x schedule" if args.skip else "full depth"
    print(f"decode pass, default model fp32, one thread, backend {args.backend}, {depth}")
    print(
        f"{'batch':>5} {'eager ms':>9} {'unpacked ms':>12} {'compiled ms':>12} {'speedup':>8} {'compile s':>10} "
        f"{'max |diff|':>11}"
    )
    for b in args.batches:
        eng = Engine(m.model, sched, max_batch=b, max_len=256)
        params = SamplingParams(max_tokens=128, ignore_eos=True)
        for i in range(b):
            eng.add_request([1 + (7 * i + j) % 500 for j in range(24 + i % 5)], params)
            if i == 0:
                eng.step()  # one row ahead: rows at different steps
        for _ in range(3):
            eng.step()
        live = eng.scheduler.live
        layer_rows, _ = eng.scheduler.layer_rows()
        seg = eng.runner.decode_segment(
            [r.generated[-1] for r in live],
            [len(r.prompt) + r.step for r in live],
            layer_rows,
            [r.schedule.skips(r.step) for r in live],
        )

        def step(seg=seg, eng=eng, model=m.model):
            return forward_segments(model, [seg], eng.cache)[0]

        def unpacked(seg=seg, eng=eng):
            return step(seg, eng, plain)

        row = {"batch": b, "backend": args.backend, "skip": args.skip}
        with torch.inference_mode():
            want = step()
            torch._dynamo.reset()
            compiled = torch.compile(unpacked, fullgraph=True, backend=args.backend)
            t0 = time.perf_counter()
            try:
                got = compiled()
            except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"{b:>5} compile failed: {row['error']}")
                rows.append(row)
                continue
            row["compile_s"] = time.perf_counter() - t0
            row["max_abs_diff"] = float((got - want).abs().max())
            best = {"eager": 1e9, "unpacked": 1e9, "compiled": 1e9}
            for _ in range(args.repeats):
                for name, fn in (("eager", step), ("unpacked", unpacked), ("compiled", compiled)):
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - t) / args.steps)
        row.update(eager_ms=best["eager"] * 1e3, unpacked_ms=best["unpacked"] * 1e3, compiled_ms=best["compiled"] * 1e3)
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        rows.append(row)
        print(
            f"{b:>5} {row['eager_ms']:>9.2f} {row['unpacked_ms']:>12.2f} {row['compiled_ms']:>12.2f} "
            f"{row['speedup']:>7.2f}x {row['compile_s']:>10.1f} {row['max_abs_diff']:>11.2e}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
