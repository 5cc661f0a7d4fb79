"""CPU peer: llama.cpp (through llama-cpp-python) beside skipray on the same GGUF file, in one run.

Both engines decode the same token ids (the chat-encoded held-out prompts of ``bench_engine.py``),
greedy, ``--new-tokens`` new tokens with EOS ignored (every row makes them all), one thread each
(``--threads``, default torch's thread count), best of ``--repeats``:

* ``llama.cpp``: the GGUF file itself (``skipray.loading.default_gguf()``, SmolLM2-135M-Instruct in
  Q4_1), at batch 1 and at ``--batch`` prompts. The batched run is llama.cpp's own batched decoding
  through the low-level API, as its ``batched`` example does: one sequence id per prompt, one
  ``llama_decode`` for all prompts' tokens, then one per step for every row (the high-level
  ``llama_cpp.Llama`` generates one sequence at a time; it batches only embeddings).
* ``skipray``: the same file de-quantized (``smollm2-base``) at full depth in fp32 and bf16, and the
  shipped default (its skip adapter) at its trained schedule, fp32 and bf16.

Reported per engine and batch: end-to-end tokens/s (prompt pass included), decode tokens/s (from the
first generated token on) and the time to the first token; the weight bytes each reads; and how many
leading tokens llama.cpp's greedy output shares with skipray fp32 full depth (Q4_1 arithmetic is not
fp32's, so long greedy texts drift apart; a short shared prefix is expected, none would be a bug).

llama-cpp-python is an optional benchmark dependency, never a test or CI one. It builds llama.cpp from
source (a few minutes; version checked with ``pip index versions llama-cpp-python``):

    .venv/bin/pip install "llama-cpp-python==0.3.36"       # or: pip install -e ".[bench]"

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_llamacpp.py [--batch 32] [--new-tokens 64] [--repeats 2]
     [--quick: a smoke run, batch 1 and 2, 4 tokens] [--no-llamacpp: skipray rows only]
Writes bench/results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

INSTALL = 'pip install "llama-cpp-python==0.3.36"'


def import_llama_cpp():
    """The ``llama_cpp`` module, or exit with how to install it."""
    try:
        import llama_cpp
    except ImportError:
        sys.exit(
            f"bench_llamacpp: llama-cpp-python is not installed. It is an optional benchmark dependency that "
            f"builds llama.cpp from source (a few minutes): {INSTALL}  (or run with --no-llamacpp)"
        )
    try:
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp logs every load and context to stderr otherwise
    except ImportError:
        pass
    return llama_cpp


class LlamaCpp:
    """Greedy batched generation over token ids with llama.cpp's low-level API (one context per batch size)."""

    def __init__(self, path: str, threads: int) -> None:
        self.L = L = import_llama_cpp()
        L.llama_backend_init()
        params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.weight_bytes = int(L.llama_model_size(self.model))
        self.threads = threads

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
        """-> (generated ids per prompt, seconds to the first generated token, seconds in all)."""
        import numpy as np

        L, n = self.L, len(prompts)
        cp = L.llama_context_default_params()
        cp.n_seq_max = n
        per_seq = -(-(max(map(len, prompts)) + new_tokens) // 256) * 256  # llama.cpp pads contexts to 256
        cp.n_ctx = n * per_seq
        cp.n_batch = max(512, sum(map(len, prompts)), n)
        cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        batch = L.llama_batch_init(cp.n_batch, 0, 1)
        try:

            def decode(items: list[tuple[int, int, int, bool]]) -> list[int]:
                """Tokens (id, position, sequence, wants logits) in one llama_decode; -> argmax per wanted."""
                for i, (tok, pos, seq, out) in enumerate(items):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, int(out)
                batch.n_tokens = len(items)
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                return [
                    int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())
                    for i, it in enumerate(items)
                    if it[3]
                ]

            t0 = time.perf_counter()
            first = decode(
                [(tok, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, tok in enumerate(ids)]
            )
            t_first = time.perf_counter() - t0
            out = [[t] for t in first]
            for step in range(new_tokens - 1):
                nxt = decode([(out[s][-1], len(ids) + step, s, True) for s, ids in enumerate(prompts)])
                for s, t in enumerate(nxt):
                    out[s].append(t)
            return out, t_first, time.perf_counter() - t0
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def close(self) -> None:
        self.L.llama_model_free(self.model)


def time_skipray(engine, prompts, new_tokens: int, schedule, repeats: int):
    """Best-of-``repeats`` (ids, seconds to the first token, seconds in all) of ``engine.stream``."""
    from skipray.core.engine import SamplingParams

    best = None
    for _ in range(repeats):
        ids = [[] for _ in prompts]
        t0, first = time.perf_counter(), None
        for ev in engine.stream(prompts, SamplingParams(max_tokens=new_tokens), schedule):
            first = first or time.perf_counter()
            ids[ev.index].append(ev.token_id)
        run = (ids, first - t0, time.perf_counter() - t0)
        best = run if best is None or run[2] < best[2] else best
    return best


def row(
    name: str, batch: int, n: int, first_s: float, total_s: float, weight_bytes: int, extra: dict | None = None
) -> dict:
    decode = batch * (n - 1) / (total_s - first_s) if n > 1 and total_s > first_s else None
    return {
        "engine": name,
        "batch": batch,
        "new_tokens": n,
        "tok_s": batch * n / total_s,
        "decode_tok_s": decode,
        "ttft_s": first_s,
        "seconds": total_s,
        "weight_mb": weight_bytes / 1e6,
        **(extra or {}),
    }


def shared_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main() -> int:
    from skipray.env import apply

    apply()  # as skipray's entry points run (before torch allocates)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="prompts in the throughput run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="threads for both engines (default: torch's)")
    ap.add_argument("--gguf", default=None, help="GGUF file for llama.cpp (default: skipray.loading.default_gguf())")
    ap.add_argument("--no-llamacpp", action="store_true", help="skipray rows only")
    ap.add_argument("--quick", action="store_true", help="smoke run: batches 1 and 2, 4 new tokens, one repeat")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "llamacpp.json"))
    args = ap.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.repeats = 2, 4, 1
    if not args.no_llamacpp:
        import_llama_cpp()  # fail before minutes of skipray runs

    import torch
    from bench_engine import prompts_for

    from skipray.core.engine import Engine
    from skipray.loading import default_gguf, load

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    n, batches = args.new_tokens, [1, args.batch]
    rows, ref = [], {}
    for name, spec, dtype, skip in [
        ("skipray fp32, full depth", "smollm2-base", torch.float32, False),
        ("skipray bf16, full depth", "smollm2-base", torch.bfloat16, False),
        ("skipray fp32, default model and schedule", "default", torch.float32, True),
        ("skipray bf16, default model and schedule", "default", torch.bfloat16, True),
    ]:
        m = load(spec, device="cpu", dtype=dtype)
        schedule = m.schedule if skip else None
        engine = Engine(m.model, schedule, max_batch=args.batch, max_len=256)
        prompts = prompts_for(m.tokenizer, args.batch)
        time_skipray(engine, prompts[:2], 2, schedule, 1)  # warm-up: packs the weights
        wb = sum(p.numel() * p.element_size() for p in m.model.hf.parameters())
        for b in batches:
            ids, first, total = time_skipray(engine, prompts[:b], n, schedule, args.repeats)
            extra = {"schedule": (schedule or m.schedule).describe() if skip else "full depth"}
            rows.append(row(name, b, n, first, total, wb, extra))
            if name.startswith("skipray fp32, full"):
                ref[b] = ids
            print(
                f"{name:<42} batch {b:>3}: {rows[-1]['tok_s']:8.1f} tok/s, decode {rows[-1]['decode_tok_s'] or 0:8.1f} "
                f"tok/s, first token {first:.3f}s",
                flush=True,
            )
        del m, engine
        gc.collect()
    if not args.no_llamacpp:
        path = args.gguf or default_gguf()
        llm = LlamaCpp(path, threads)
        try:
            prompts = prompts_for(load("smollm2-base", device="cpu").tokenizer, args.batch)
            llm.generate(prompts[:2], 2)  # warm-up
            for b in batches:
                best = None
                for _ in range(args.repeats):
                    run = llm.generate(prompts[:b], n)
                    best = run if best is None or run[2] < best[2] else best
                ids, first, total = best
                same = [shared_prefix(a, r) for a, r in zip(ids, ref.get(b, []))]
                extra = {"gguf": str(path), "shared_prefix_with_skipray_fp32": sum(same) / max(len(same), 1)}
                rows.append(row("llama.cpp (GGUF as shipped)", b, n, first, total, llm.weight_bytes, extra))
                print(
                    f"{'llama.cpp (GGUF as shipped)':<42} batch {b:>3}: {rows[-1]['tok_s']:8.1f} tok/s, decode "
                    f"{rows[-1]['decode_tok_s'] or 0:8.1f} tok/s, first token {first:.3f}s, "
                    f"{extra['shared_prefix_with_skipray_fp32']:.1f} leading tokens shared with skipray fp32",
                    flush=True,
                )
        finally:
            llm.close()

    print(f"\n{n} new tokens, greedy, {threads} thread(s)")
    print(f"{'engine':<42}{'batch':>6}{'tok/s':>9}{'decode tok/s':>14}{'first token s':>15}{'weights MB':>12}")
    for r in rows:
        print(
            f"{r['engine']:<42}{r['batch']:>6}{r['tok_s']:>9.1f}{r['decode_tok_s'] or 0:>14.1f}"
            f"{r['ttft_s']:>15.3f}{r['weight_mb']:>12.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"threads": threads, "new_tokens": n, "batches": batches, "repeats": args.repeats, "rows": rows}, indent=2
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # bench_engine's prompts
    raise SystemExit(main())
