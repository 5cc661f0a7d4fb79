"""Host syncs and dispatched ops per decode-only step, per kind of request, on the default model.

A decode step that makes the host wait for the device (a read of a tensor's values, a data-dependent shape, a copy
to or from pageable memory) cannot run ahead of the GPU; a CUDA graph cannot hold it at all. This counts them with
``skipray.diagnostics.HostSyncs`` (on a CPU: the reads a CUDA run would sync on) for one decode-only step of
``--batch`` rows that all ask for the same kind of sampling, and the ops dispatched (a proxy for kernel launches).

Run: .venv/bin/python bench/bench_syncs.py [--model default] [--batch 8] [--device cpu]
Writes bench/results/syncs.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KINDS = {
    "greedy": {},
    "greedy, log-probs": {"logprobs": 2},
    "sampled: seeded, top-p": {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    "sampled: top-k, penalties, log-probs": {
        "temperature": 0.8,
        "top_k": 40,
        "seed": 1,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.3,
        "logprobs": 2,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/syncs.json")
    a = ap.parse_args()
    import torch

    from skipray.core.engine import Engine, SamplingParams
    from skipray.diagnostics import SYNC_KINDS, decode_step_counts
    from skipray.loading import load
    from skipray.text import encode_prompt

    torch.set_num_threads(1)
    m = load(a.model, device=a.device)
    prompts = [encode_prompt(m.tokenizer, f"Tell me about the number {i}.", chat=True) for i in range(a.batch)]
    rows = []
    print(f"{'rows':>38} {'host syncs':>10} {'ops':>6}")
    for name, kw in KINDS.items():
        eng = Engine(m.model, m.schedule, max_batch=a.batch, max_len=256, eos_token_ids=m.eos_token_ids)
        counts = decode_step_counts(eng, prompts, SamplingParams(max_tokens=64, ignore_eos=True, **kw))
        row = {"rows": name, "syncs": sum(counts.get(k, 0) for k in SYNC_KINDS), **dict(counts)}
        rows.append(row)
        print(f"{name:>38} {row['syncs']:>10} {row.get('ops', 0):>6}")
    result = {"model": a.model, "device": a.device, "batch": a.batch, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
