"""The probes of scripts/gpu_check.sh: fused attention, decode steps replayed as CUDA graphs against eager ones,
and a short decode benchmark that counts host syncs and dispatched ops per step.

Contract: ``python scripts/gpu_probes.py --device cuda|cpu [--model default] [--out FILE]`` prints one line per
probe and writes the results as JSON (default ``bench/results/gpu_check_<device>.json``). The GPU-only probes
print ``skipped: no GPU`` on the CPU. Every probe reports what it found, failures included: it exits 0 unless
the benchmark itself cannot run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def attention_probe(device: str) -> dict:
    """Which fused SDPA kernels accept the default model's decode attention: with an additive mask and
    ``enable_gqa`` (how the engine calls it today) and with K/V expanded and no mask."""
    if device != "cuda":
        return {"status": "skipped: no GPU"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, kvh, d, s = 8, 9, 3, 64, 256
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for form, call in (
            ("mask+gqa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)),
            (
                "expanded",
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
                ),
            ),
        ):
            try:
                with sdpa_kernel([backend]):
                    call()
                out[f"{name} {form}"] = "ok"
            except RuntimeError as e:
                out[f"{name} {form}"] = f"refused: {str(e).splitlines()[0][:120]}"
    return out


def graph_probe(model, schedule, prompts, params, device: str) -> dict:
    """Decode steps replayed as CUDA graphs (``enforce_eager=False``: static shapes, ``skipray.core.graphs``)
    against eager steps on the same prompts: the same greedy tokens, and seconds per ``generate`` (best of two)."""
    if device != "cuda":
        return {"status": "skipped: no GPU"}
    from skipray.core.engine import Engine

    out: dict = {}
    tokens = {}
    for name, eager in (("eager", True), ("graphs", False)):
        try:
            eng = Engine(model, schedule, max_batch=8, max_len=256, enforce_eager=eager)
            best = 1e9
            for _ in range(2):  # the first run captures the graphs
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                done = eng.generate(prompts, params)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            tokens[name] = [c.token_ids for c in done]
            out[name] = {"seconds": best, "tokens_per_s": sum(len(t) for t in tokens[name]) / best}
            if not eager:
                out["graphs_captured"] = len(eng.runner.graphs.graphs)
        except Exception as e:  # noqa: BLE001 - the probe reports why
            out[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    out["same_tokens"] = len(tokens) == 2 and tokens["eager"] == tokens["graphs"]
    return out


def decode_bench(engine, prompts, params, device: str, steps: int = 8) -> dict:
    """Seconds per decode-only step and host syncs / ops per step (``skipray.diagnostics``)."""
    from skipray.diagnostics import decode_step_counts

    counts = decode_step_counts(engine, prompts, params)
    engine.step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    engine.reset()
    return {"batch": len(prompts), "ms_per_step": 1e3 * per_step, **dict(counts)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from skipray.core.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.text import encode_prompt

    result: dict = {"device": a.device, "model": a.model, "date": time.strftime("%Y-%m-%d")}
    if a.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    result["attention"] = attention_probe(a.device)
    print(f"fused attention: {result['attention']}")
    m = load(a.model, device=a.device)
    prompts = [encode_prompt(m.tokenizer, f"Tell me about the number {i}.", chat=True) for i in range(8)]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    engine = Engine(m.model, m.schedule, max_batch=8, max_len=256, eos_token_ids=m.eos_token_ids)
    result["cuda_graph"] = graph_probe(m.model, m.schedule, prompts, params, a.device)
    print(f"decode steps as CUDA graphs against eager: {result['cuda_graph']}")
    result["decode"] = [decode_bench(engine, prompts[:b], params, a.device) for b in (1, 8)]
    from skipray.diagnostics import SYNC_KINDS

    for r in result["decode"]:
        kinds = ", ".join(f"{k} {r.get(k, 0)}" for k in SYNC_KINDS)
        syncs = sum(r.get(k, 0) for k in SYNC_KINDS)
        print(
            f"decode step, batch {r['batch']}: {r['ms_per_step']:.2f} ms, host syncs {syncs} ({kinds}), "
            f"ops {r.get('ops', 0)}"
        )
    out = Path(a.out or f"bench/results/gpu_check_{a.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
