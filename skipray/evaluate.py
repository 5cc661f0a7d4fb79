"""`skipray eval`: quality against speed for one or more skip schedules.

Contract: for each schedule, on the prompts of a Parquet file, it reports
* ROUGE-L F1 of the greedy skip output against the base model's greedy full-depth output (and
  against the data's ``reference`` column when present);
* teacher-forced top-1 agreement with the full-depth base model and the perplexity of the full-depth
  output under the skip model (both from the parallel training forward over that output);
* average layers per token, theoretical FLOP speedup and measured speedup (tokens/s against full
  depth on the same model, same prompts, same run).
It writes ``report.json``, ``report.md`` and ``quality_vs_speedup.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (the rouge-score package's default tokenization)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def parse_schedule(spec: str, num_layers: int):
    """'full' or 'MAX,MIN,DECAY[,WARMUP]' -> SkipSchedule."""
    from skipray.schedule import SkipSchedule

    if spec == "full":
        return SkipSchedule.full(num_layers)
    parts = [int(x) for x in spec.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"schedule {spec!r}: expected 'full' or MAX,MIN,DECAY[,WARMUP]")
    return SkipSchedule(num_layers, parts[0], parts[1], parts[2], warmup_layers=parts[3] if len(parts) == 4 else 1)


def generate_all(engine, prompts, schedule, max_new: int, batch: int) -> tuple[list[list[int]], float]:
    from skipray.engine import SamplingParams

    outs, t0 = [], time.perf_counter()
    for s in range(0, len(prompts), batch):
        outs += [c.token_ids for c in engine.generate(prompts[s : s + batch], SamplingParams(max_new_tokens=max_new), schedule)]
    return outs, time.perf_counter() - t0


@torch.no_grad()
def teacher_forced(student, teacher, prompt: list[int], response: list[int], schedule) -> tuple[float, float]:
    """(top-1 agreement with the full-depth teacher, perplexity of ``response`` under the student)."""
    from skipray.model import forward, full_plan, training_plan

    if len(response) < 2:
        return float("nan"), float("nan")
    tokens = torch.tensor([prompt + response])
    real = torch.ones_like(tokens, dtype=torch.bool)
    pos = torch.arange(tokens.shape[1])[None]
    P, T = len(prompt), tokens.shape[1]
    cols = slice(P - 1, T - 1)
    s = forward(student, tokens, pos, training_plan(schedule, P, T), real, logits_at=cols)[0].float()
    t = forward(teacher, tokens, pos, full_plan(teacher.num_layers), real, logits_at=cols)[0].float()
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(s, tokens[0, P:]).item()
    return agree, math.exp(nll)


def evaluate(model_spec: str, prompts_path: str, schedules: list[str], out: str, max_new: int = 64,
             limit: int = 0, batch: int = 16, base_spec: str = "smollm2-base", chat: bool = True) -> dict:
    from tqdm import tqdm

    from skipray.engine import Engine
    from skipray.io import read_table
    from skipray.loading import load
    from skipray.text import decode, encode_prompt

    table = read_table(prompts_path)
    texts = table.column("prompt").to_pylist()[: limit or None]
    refs = table.column("reference").to_pylist()[: len(texts)] if "reference" in table.column_names else None
    base = load(base_spec, device="cpu")
    student = load(model_spec, device="cpu") if model_spec != base_spec else base
    tok = base.tokenizer
    prompts = [encode_prompt(tok, t, chat=chat) for t in texts]
    base_engine = Engine(base.model, max_batch=batch, max_len=max(map(len, prompts)) + max_new, eos_token_ids=base.eos_token_ids)
    full_ids, _ = generate_all(base_engine, prompts, None, max_new, batch)
    full_txt = [decode(tok, ids) for ids in full_ids]
    engine = Engine(student.model, max_batch=batch, max_len=base_engine.cache.max_len, eos_token_ids=student.eos_token_ids)
    # speed reference: the student at full depth, the same prompts, forced to the same lengths
    rows = []
    for spec in tqdm(schedules, desc="schedules"):
        sched = parse_schedule(spec, student.model.num_layers) if spec != "trained" else student.schedule
        if sched is None:
            raise ValueError(f"{model_spec} records no trained schedule; pass MAX,MIN,DECAY[,WARMUP]")
        ids, secs = generate_all(engine, prompts, sched, max_new, batch)
        txt = [decode(tok, x) for x in ids]
        tf = [teacher_forced(student.model, base.model, p, r, sched) for p, r in zip(prompts, full_ids)]
        tf = [x for x in tf if not math.isnan(x[0])]
        speed = _measured_speedup(engine, prompts[:batch], sched, max_new)
        ntok = sum(map(len, ids))
        row = {
            "schedule": spec, "description": sched.describe(),
            "rouge_l_vs_full": sum(rouge_l(a, b) for a, b in zip(txt, full_txt)) / len(txt),
            "top1_agreement": sum(a for a, _ in tf) / max(len(tf), 1),
            "perplexity_of_full_output": sum(p for _, p in tf) / max(len(tf), 1),
            "avg_layers": sum(sum(sched.layers_per_token(len(x))) for x in ids) / max(ntok, 1),
            "theoretical_speedup": _theory(sched, student.model, prompts, max_new),
            "measured_speedup": speed, "tokens_per_s": ntok / secs, "examples": list(zip(texts[:3], txt[:3])),
        }
        if refs:
            row["rouge_l_vs_reference"] = sum(rouge_l(a, b or "") for a, b in zip(txt, refs)) / len(txt)
        rows.append(row)
    report = {"model": model_spec, "base": base_spec, "prompts": prompts_path, "n": len(texts),
              "max_new_tokens": max_new, "results": rows}
    write_report(report, Path(out))
    return report


def _theory(sched, model, prompts, max_new) -> float:
    from skipray.schedule import theoretical_speedup

    P = sum(map(len, prompts)) // len(prompts)
    return theoretical_speedup(sched, model.cost_model(), P, max_new)


def _measured_speedup(engine, prompts, sched, max_new) -> float:
    """Tokens/s with ``sched`` over tokens/s at full depth, both forced to ``max_new`` tokens."""
    from skipray.engine import SamplingParams
    from skipray.schedule import SkipSchedule

    eos, engine.eos_token_ids = engine.eos_token_ids, ()
    full = SkipSchedule.full(engine.model.num_layers)
    try:
        p = SamplingParams(max_new_tokens=max_new)
        t = {}
        for name, s in (("full", full), ("skip", sched), ("full2", full), ("skip2", sched)):
            t0 = time.perf_counter()
            engine.generate(prompts, p, s)
            t[name] = time.perf_counter() - t0
        return min(t["full"], t["full2"]) / min(t["skip"], t["skip2"])
    finally:
        engine.eos_token_ids = eos


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# skipray eval: {report['model']} on {report['prompts']} ({report['n']} prompts, "
             f"{report['max_new_tokens']} new tokens)", "",
             "| schedule | avg layers | theoretical speedup | measured speedup | ROUGE-L vs full | top-1 agreement | ppl of full output |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['description']} | {r['avg_layers']:.2f} | {r['theoretical_speedup']:.2f}x | "
                     f"{r['measured_speedup']:.2f}x | {r['rouge_l_vs_full']:.3f} | {r['top1_agreement']:.3f} | "
                     f"{r['perplexity_of_full_output']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["theoretical_speedup"] for r in report["results"]]
    ax.plot(xs, [r["rouge_l_vs_full"] for r in report["results"]], "o-", label="ROUGE-L vs full depth")
    ax.plot(xs, [r["top1_agreement"] for r in report["results"]], "s--", label="top-1 agreement")
    for r, x in zip(report["results"], xs):
        ax.annotate(r["schedule"], (x, r["rouge_l_vs_full"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("theoretical speedup (FLOPs)")
    ax.set_ylabel("quality")
    ax.set_ylim(0, 1.05)
    ax.set_title(Path(str(report["model"])).name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_speedup.png", dpi=120)
    plt.close(fig)


def cmd_eval(args: argparse.Namespace) -> int:
    rep = evaluate(args.model, args.prompts, args.schedule or ["full", "trained"], args.out, args.max_new_tokens,
                   args.limit, args.batch_size, args.base, args.chat)
    print((Path(args.out) / "report.md").read_text())
    return 0 if rep["results"] else 1


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality vs speed of skip schedules against full depth")
    p.add_argument("--model", default="default", help="model to evaluate (its trained schedule is 'trained')")
    p.add_argument("--base", default="smollm2-base", help="full-depth reference model")
    p.add_argument("--prompts", required=True, help="Parquet with 'prompt' (and optional 'reference')")
    p.add_argument("--schedule", action="append", help="'full', 'trained' or MAX,MIN,DECAY[,WARMUP]; repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_eval)
