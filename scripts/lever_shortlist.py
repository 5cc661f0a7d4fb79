"""The lm_head lever, measured offline: a frequency-ranked vocabulary shortlist with a per-row fallback.

FR-Spec (arXiv 2502.14856) projects only onto the ``K`` most frequent tokens. Used for decoding rather
than drafting, a row must fall back to the full head when the shortlist is not confident, or greedy
output changes. This script measures, teacher-forced on the full model's greedy answers to the held-out
prompts, for each ``K`` and confidence threshold ``tau`` (fall back when the shortlist's own softmax
gives its top token less than ``tau``):

* ``changed``: the share of positions whose greedy token differs from the full head's;
* ``fallback``: the share of positions that run the full head as well;
* ``head_cost``: the head's FLOPs per token over the full head's, ``(K + fallback * V) / V`` (the
  shortlist's matmul always runs; a fallback row runs the full head too);
* ``speedup``: the schedule's theoretical speedup over 64 tokens with that head cost
  (``skipray.core.schedule.theoretical_speedup``'s FLOP model, the head term scaled).

Both the base model at full depth and the skip model under its schedule are measured. The shortlist is
counted from the response tokens of the training data (``--data``, ``response_ids``), never from the
held-out prompts. Usage:
    python scripts/lever_shortlist.py --model runs/skipfast --data runs/data/self128 \
        --out docs/eval/lever-shortlist.json [--limit 64]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import time
from pathlib import Path

import torch

SIZES = (2048, 4096, 8192, 16384)
TAUS = (0.0, 0.3, 0.5, 0.7, 0.9)


def frequency_ranked(data: str, vocab: int) -> torch.Tensor:
    """Token ids by falling frequency in the data's ``response_ids``; ids never seen follow, by id."""
    import pyarrow.parquet as pq

    count: collections.Counter = collections.Counter()
    for f in sorted(glob.glob(str(Path(data) / "**" / "*.parquet"), recursive=True)):
        for r in pq.read_table(f, columns=["response_ids"]).column("response_ids").to_pylist():
            count.update(r)
    seen = [t for t, _ in count.most_common() if t < vocab]
    rest = sorted(set(range(vocab)) - set(seen))
    return torch.tensor(seen + rest)


def measure(logits: torch.Tensor, ranked: torch.Tensor) -> list[dict]:
    """``logits (N, V)`` of N positions -> one row per (K, tau)."""
    full = logits.argmax(-1)
    rows = []
    for k in SIZES:
        ids = ranked[:k]
        short = logits[:, ids]
        conf, pick = short.softmax(-1).max(-1)
        short_tok = ids[pick]
        for tau in TAUS:
            fb = conf < tau
            tok = torch.where(fb, full, short_tok)
            rows.append(
                {
                    "K": k,
                    "tau": tau,
                    "changed": (tok != full).float().mean().item(),
                    "fallback": fb.float().mean().item(),
                    "head_cost": (k + fb.float().mean().item() * logits.shape[-1]) / logits.shape[-1],
                }
            )
    return rows


def speedup(schedule, cost, prompt_len: int, new_tokens: int, head_cost: float) -> float:
    """``theoretical_speedup`` with the skip run's head FLOPs scaled by ``head_cost``."""
    full = skip = 0.0
    for i in range(new_tokens - 1):
        ctx = prompt_len + i + 1
        full += schedule.num_layers * cost.layer_flops(ctx) + 2.0 * cost.head_params
        skip += schedule.num_active(i) * cost.layer_flops(ctx) + 2.0 * cost.head_params * head_cost
    return full / skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the skip model (its trained schedule is measured)")
    ap.add_argument("--base", default="smollm2-base")
    ap.add_argument("--data", required=True, help="training data: Parquet with response_ids")
    ap.add_argument("--prompts", default="examples/heldout_prompts.parquet")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule
    from skipray.io import read_table
    from skipray.loading import load
    from skipray.text import encode_prompt
    from skipray.training.evaluate import _logits

    t0 = time.time()
    base, skip = load(a.base, device="cpu"), load(a.model, device="cpu")
    ranked = frequency_ranked(a.data, base.model.hf.lm_head.weight.shape[0])
    texts = read_table(a.prompts).column("prompt").to_pylist()[: a.limit or None]
    prompts = [encode_prompt(base.tokenizer, t, chat=True) for t in texts]
    eng = Engine(base.model, max_batch=16, max_len=max(map(len, prompts)) + a.max_new_tokens, eos_token_ids=())
    outs = []
    for s in range(0, len(prompts), 16):
        outs += [c.token_ids for c in eng.generate(prompts[s : s + 16], SamplingParams(max_tokens=a.max_new_tokens))]
    report = {"model": a.model, "data": a.data, "prompts": a.prompts, "n": len(prompts), "results": {}}
    cost = base.model.cost_model()
    P = sum(map(len, prompts)) // len(prompts)
    with torch.no_grad():
        for name, m, sched in (("full depth", base.model, None), ("skip", skip.model, skip.schedule)):
            logits = torch.cat([_logits(m, p, o, sched) for p, o in zip(prompts, outs)])
            rows = measure(logits, ranked)
            s = sched or SkipSchedule.full(base.model.num_layers)
            for r in rows:
                r["speedup_64"] = speedup(s, cost, P, a.max_new_tokens, r["head_cost"])
            report["results"][name] = {"schedule": s.to_dict(), "positions": logits.shape[0], "rows": rows}
    report["seconds"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    for name, res in report["results"].items():
        print(f"\n{name} ({res['positions']} positions)")
        print("| K | tau | greedy tokens changed | fallback | head FLOPs | speedup over 64 |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            print(
                f"| {r['K']} | {r['tau']} | {r['changed']:.2%} | {r['fallback']:.1%} | {r['head_cost']:.2f} | "
                f"{r['speedup_64']:.2f}x |"
            )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
