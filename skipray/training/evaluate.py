"""`skipray eval`: quality against speed for one or more skip schedules.

Contract: for each schedule, on held-out prompts (Parquet ``prompt``) and, with ``--questions``, on
held-out short-answer questions (``question``, ``answers``), greedy with the chat template, it reports
* fact retention: of the questions the base model at full depth answers right (an accepted answer
  appears, lower-cased, in its first ``question_tokens`` tokens), the share the schedule still does, also
  split by how many generated tokens the full model takes to complete its answer (facts are decided
  there: a schedule keeps the answers it completes at full depth);
* ROUGE-L F1 of the greedy output against the base model's greedy full-depth output, over token ids
  and over words (and against the data's ``reference`` column when present);
* teacher-forced top-1 agreement with full depth and the perplexity of the full-depth output under the
  skip forward (the parallel training forward over the full model's output);
* on-policy agreement (the share of the skip model's own greedy tokens that equal the full model's
  argmax after the same prefix) and the perplexity of the skip output under the full model;
* average layers per token, theoretical FLOP speedup (lm_head counted) and measured speedup (static
  batches on this machine, EOS ignored, best of two), and both over the first 8, 16, 64 and 128
  generated tokens (the by-length figures count the decode steps only, as the theoretical one does);
* the decay of long answers, over ``rep_tokens`` (128) greedy tokens: rep-3 (the share of an answer's
  3-gram positions whose 3-gram of token ids occurred earlier in the same answer, up to EOS, EOS
  excluded, averaged over answers) beside full depth's on the same prompts, and ROUGE-L over token ids
  and on-policy agreement over those tokens. The 64-token figures are the first ``max_new`` tokens of
  the same greedy answers.
Reference rows ``ref:bf16`` and ``ref:t0.3`` (the base model in bf16; sampled at temperature 0.3) put
a noise floor beside every figure: greedy text diverges for good after one different token.
It writes ``report.json``, ``report.md`` and ``quality_vs_speedup.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from skipray.training.eval_report import write_report
from skipray.training.text_metrics import answer_position, answered, by_position, lcs_f1, rep_n, rouge_l


def parse_schedule(spec: str, num_layers: int, trained=None, model: str = "the model"):
    """A schedule spec -> SkipSchedule, through ``skipray.core.schedule.resolve_schedule``:

    * ``full``; ``trained`` (``trained``, the schedule ``model`` records);
    * skip flags by their CLI names, comma-separated, overriding the trained schedule (full depth for an
      untrained model), e.g. ``min-layers=13`` or ``max-layers=24,min-layers=12,decay-tokens=10,shape=power``;
    * a schedule file (``.json``, from ``skipray calibrate`` or a model's ``skipray.json``);
    * ``MAX,MIN,DECAY[,WARMUP]``: short for ``max-layers=MAX,min-layers=MIN,decay-tokens=DECAY[,warmup-layers=
      WARMUP]`` over a plain linear schedule with SkipDecode's drop order (not the trained one).

    Raises ``ValueError`` for 'trained' when ``trained`` is None, and for a malformed spec or flag."""
    from skipray.core.schedule import SkipSchedule, resolve_schedule

    if spec == "trained":
        if trained is None:
            raise ValueError(f"{model} records no trained schedule; pass skip flags such as min-layers=12")
        return trained
    if spec == "full":
        return SkipSchedule.full(num_layers)
    if spec.endswith(".json"):
        from skipray.options import read_schedule_file

        return read_schedule_file(spec, num_layers)
    parts = spec.split(",")
    if all("=" in p for p in parts):
        flags = {}
        for p in parts:
            key, value = p.split("=", 1)
            key = key.strip().lstrip("-").replace("-", "_")
            flags[key] = value if key == "shape" else float(value) if key == "power" else int(value)
        return resolve_schedule(flags, num_layers, trained).schedule
    if len(parts) not in (3, 4) or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(
            f"schedule {spec!r}: expected 'full', 'trained', skip flags (min-layers=12,...), a .json schedule "
            "file or MAX,MIN,DECAY[,WARMUP]"
        )
    names = ("max_layers", "min_layers", "decay_tokens", "warmup_layers")
    flags = dict(zip(names, map(int, parts)))
    return resolve_schedule(flags, num_layers, trained, start=SkipSchedule.full(num_layers)).schedule


def generate_all(
    engine, prompts, schedule, max_new: int, batch: int, temperature: float = 0.0, seed: int = 0
) -> tuple[list[list[int]], float]:
    from skipray.core.engine import SamplingParams

    outs, t0 = [], time.perf_counter()
    for s in range(0, len(prompts), batch):
        params = [
            SamplingParams(max_tokens=max_new, temperature=temperature, seed=seed + s + i)
            for i in range(len(prompts[s : s + batch]))
        ]
        outs += [c.token_ids for c in engine.generate(prompts[s : s + batch], params, schedule)]
    return outs, time.perf_counter() - t0


def _logits(model, prompt: list[int], response: list[int], schedule=None) -> torch.Tensor:
    """Logits predicting each ``response`` token after ``prompt``: full depth, or ``schedule`` with its adapter."""
    from skipray.core.model import Segment, forward, full_plan, training_plan
    from skipray.training.train import adapter_mask

    tokens = torch.tensor([prompt + response])
    real = torch.ones_like(tokens, dtype=torch.bool)
    P, T = len(prompt), tokens.shape[1]
    pos = torch.arange(T)[None]
    if schedule is None or schedule.is_full:
        plan, adapter = full_plan(model.num_layers), None
    else:
        plan, adapter = training_plan(schedule, P, T), adapter_mask(schedule, 1, P, T)
    return forward(model, Segment(tokens, pos, plan, real, logits_at=slice(P - 1, T - 1), adapter=adapter))[0].float()


@torch.no_grad()
def teacher_forced(student, teacher, prompt: list[int], response: list[int], schedule) -> tuple[float, float]:
    """On the full model's own output: (top-1 agreement of the skip forward with full depth, perplexity of
    ``response`` under the skip forward)."""
    if len(response) < 2:
        return float("nan"), float("nan")
    s = _logits(student, prompt, response, schedule)
    t = _logits(teacher, prompt, response)
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(s, torch.tensor(response)).item()
    return agree, math.exp(nll)


@torch.no_grad()
def on_policy(teacher, prompt: list[int], output: list[int]) -> tuple[float, float]:
    """On the skip model's own greedy output: (share of its tokens equal to the full model's argmax after the
    same prefix, perplexity of the output under the full model)."""
    if not output:
        return float("nan"), float("nan")
    t = _logits(teacher, prompt, output)
    agree = (t.argmax(-1) == torch.tensor(output)).float().mean().item()
    return agree, math.exp(torch.nn.functional.cross_entropy(t, torch.tensor(output)).item())


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


REFERENCES = {"ref:bf16": "the base model in bfloat16, greedy", "ref:t0.3": "the base model sampled at temperature 0.3"}


def evaluate(
    model_spec: str,
    prompts_path: str,
    schedules: list[str],
    out: str,
    max_new: int = 64,
    limit: int = 0,
    batch: int = 16,
    base_spec: str = "smollm2-base",
    chat: bool = True,
    questions_path: str | None = None,
    question_tokens: int = 32,
    question_limit: int = 0,
    dtype: str = "float32",
    rep_tokens: int = 128,
) -> dict:
    """Quality and speed per schedule (or reference row) against the base model's greedy full-depth output
    (fp32). ``dtype``: the evaluated model's (``bfloat16``: the skip model as a bf16 deployment runs it)."""
    from tqdm import tqdm

    from skipray.core.config import EngineConfig
    from skipray.core.engine import Engine
    from skipray.core.schedule import SkipSchedule
    from skipray.io import read_table
    from skipray.loading import load
    from skipray.text import decode, encode_prompt

    table = read_table(prompts_path)
    texts = table.column("prompt").to_pylist()[: limit or None]
    refs = table.column("reference").to_pylist()[: len(texts)] if "reference" in table.column_names else None
    base = load(base_spec, device="cpu")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    same = model_spec == base_spec and dtype == "float32"
    student = base if same else load(model_spec, device="cpu", dtype=getattr(torch, dtype))
    tok = base.tokenizer
    prompts = [encode_prompt(tok, t, chat=chat) for t in texts]
    qs, accepted = [], []
    if questions_path:
        qt = read_table(questions_path)
        qs = [encode_prompt(tok, q, chat=chat) for q in qt.column("question").to_pylist()[: question_limit or None]]
        accepted = qt.column("answers").to_pylist()[: len(qs)]
    long = max(max_new, rep_tokens)  # one greedy run per schedule: its first max_new tokens are the short answers
    config = EngineConfig(max_num_seqs=batch, max_model_len=max(map(len, prompts + qs)) + max(long, question_tokens))
    eos = base.eos_token_ids
    base_engine = Engine(base.model, config=config, eos_token_ids=eos)
    full_long, _ = generate_all(base_engine, prompts, None, long, batch)
    full_ids = [x[:max_new] for x in full_long]
    rep3_full = _mean(rep_n(x, eos) for x in full_long)
    full_txt = [decode(tok, ids) for ids in full_ids]
    full_q_ids, _ = generate_all(base_engine, qs, None, question_tokens, batch)
    full_q = [decode(tok, x) for x in full_q_ids]
    known = [i for i, (t, a) in enumerate(zip(full_q, accepted)) if answered(t, a)]
    positions = [answer_position(full_q_ids[i], accepted[i], lambda x: decode(tok, x)) for i in known]
    engine = Engine(student.model, config=config, eos_token_ids=student.eos_token_ids)
    rows = []
    for spec in tqdm(schedules, desc="schedules"):
        temperature, gen_engine, sched = 0.0, engine, None
        if spec == "ref:bf16":
            bf16 = load(base_spec, device="cpu", dtype=torch.bfloat16)
            gen_engine = Engine(bf16.model, config=config, eos_token_ids=bf16.eos_token_ids)
            sched = SkipSchedule.full(base.model.num_layers)
        elif spec == "ref:t0.3":
            temperature, gen_engine, sched = 0.3, base_engine, SkipSchedule.full(base.model.num_layers)
        else:
            sched = parse_schedule(spec, student.model.num_layers, student.schedule, model_spec)
        ids_long, secs = generate_all(gen_engine, prompts, sched, long, batch, temperature)
        ids = [x[:max_new] for x in ids_long]
        txt = [decode(tok, x) for x in ids]
        q_ids, _ = generate_all(gen_engine, qs, sched, question_tokens, batch, temperature)
        q_txt = [decode(tok, x) for x in q_ids]
        kept = [answered(q_txt[i], accepted[i]) for i in known]
        if spec in REFERENCES:
            tf = []  # the reference rows are the base model itself: nothing to teacher-force
        else:
            tf = [teacher_forced(student.model, base.model, p, r, sched) for p, r in zip(prompts, full_ids)]
        op = [on_policy(base.model, p, x) for p, x in zip(prompts, ids)]
        op_long = [on_policy(base.model, p, x) for p, x in zip(prompts, ids_long)] if long > max_new else op
        ntok = sum(map(len, ids))
        lengths = sorted({n for n in (8, 16, 64, 128) if n <= long} | {max_new})
        measured = (
            dict.fromkeys([*lengths, *(-n for n in lengths)], 1.0)
            if spec in REFERENCES
            else _measured_speedup(engine, prompts[:batch], sched, lengths)
        )
        row = {
            "schedule": spec,
            "description": REFERENCES.get(spec) or sched.describe(),
            "schedule_dict": sched.to_dict(),
            "rouge_l_vs_full": sum(rouge_l(a, b) for a, b in zip(txt, full_txt)) / len(txt),
            "rouge_l_ids_vs_full": sum(lcs_f1(a, b) for a, b in zip(ids, full_ids)) / len(ids),
            "fact_retention": sum(kept) / len(known) if known else None,
            "facts_known_by_full": len(known),
            "fact_retention_by_position": by_position(positions, kept),
            "facts_asked": len(qs),
            "top1_agreement": _mean(a for a, _ in tf),
            "perplexity_of_full_output": _mean(p for _, p in tf),
            "on_policy_agreement": _mean(a for a, _ in op),
            "perplexity_under_full": _mean(p for _, p in op),
            "avg_layers": sum(sum(sched.layers_per_token(len(x))) for x in ids) / max(ntok, 1),
            "theoretical_speedup": _theory(sched, student.model, prompts, max_new),
            "measured_speedup": measured[max_new],
            "tokens_per_s": sum(map(len, ids_long)) / secs,
            "rep_tokens": long,
            "rep3": _mean(rep_n(x, eos) for x in ids_long),
            "rep3_full": rep3_full,
            "rouge_l_ids_vs_full_long": sum(lcs_f1(a, b) for a, b in zip(ids_long, full_long)) / len(ids_long),
            "on_policy_agreement_long": _mean(a for a, _ in op_long),
            "theoretical_speedup_by_length": {
                str(n): _theory(sched, student.model, prompts, n) for n in (8, 16, 64, 128)
            },
            "measured_speedup_by_length": {str(n): measured[-n] for n in (8, 16, 64, 128) if -n in measured},
            "examples": list(zip(texts[:3], txt[:3])),
        }
        if refs:
            row["rouge_l_vs_reference"] = sum(rouge_l(a, b or "") for a, b in zip(txt, refs)) / len(txt)
        rows.append(row)
    report = {
        "model": model_spec,
        "dtype": dtype,
        "base": base_spec,
        "prompts": prompts_path,
        "n": len(texts),
        "questions": questions_path,
        "max_new_tokens": max_new,
        "rep_tokens": long,
        "question_tokens": question_tokens,
        "results": rows,
    }
    write_report(report, Path(out))
    return report


def _theory(sched, model, prompts, max_new) -> float:
    from skipray.core.schedule import theoretical_speedup

    P = sum(map(len, prompts)) // len(prompts)
    return theoretical_speedup(sched, model.cost_model(), P, max_new)


def _measured_speedup(engine, prompts, sched, lengths) -> dict[int, float]:
    """Measured speedup of ``sched`` over full depth per answer length, EOS ignored, best of two runs each.

    ``n -> time_full(n) / time_skip(n)`` counts the whole request (the prompt's full-depth pass included);
    ``-n -> (time_full(n) - time_full(1)) / (time_skip(n) - time_skip(1))`` counts only the decode steps
    (steps ``0 .. n-2``), the same steps ``theoretical_speedup`` counts."""
    from skipray.core.engine import SamplingParams
    from skipray.core.schedule import SkipSchedule

    eos, engine.eos_token_ids = engine.eos_token_ids, ()
    full = SkipSchedule.full(engine.model.num_layers)
    ns = sorted({1, *lengths})
    t = {"full": {n: float("inf") for n in ns}, "skip": {n: float("inf") for n in ns}}
    try:
        for _ in range(2):
            for name, s in (("full", full), ("skip", sched)):
                for n in ns:
                    t0 = time.perf_counter()
                    engine.generate(prompts, SamplingParams(max_tokens=n), s)
                    t[name][n] = min(t[name][n], time.perf_counter() - t0)
    finally:
        engine.eos_token_ids = eos
    out = {n: t["full"][n] / t["skip"][n] for n in lengths}
    for n in lengths:
        if n > 1:
            out[-n] = (t["full"][n] - t["full"][1]) / max(t["skip"][n] - t["skip"][1], 1e-9)
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    rep = evaluate(
        args.model,
        args.prompts,
        args.schedule or ["full", "trained"],
        args.out,
        args.max_new_tokens,
        args.limit,
        args.batch_size,
        args.base,
        args.chat,
        args.questions,
        args.question_tokens,
        args.question_limit,
        args.dtype,
        args.rep_tokens,
    )
    print((Path(args.out) / "report.md").read_text())
    return 0 if rep["results"] else 1


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality vs speed of skip schedules against full depth")
    p.add_argument("--model", default="default", help="model to evaluate (its trained schedule is 'trained')")
    p.add_argument("--base", default="smollm2-base", help="full-depth reference model")
    p.add_argument("--prompts", required=True, help="Parquet with 'prompt' (and optional 'reference')")
    p.add_argument(
        "--schedule",
        action="append",
        help="'full', 'trained', skip flags by their CLI names (min-layers=13,decay-tokens=10), a schedule .json "
        "file, MAX,MIN,DECAY[,WARMUP] (short for the first flags), or a reference row "
        "'ref:bf16' / 'ref:t0.3' (the base model in bf16 / sampled at 0.3); repeatable",
    )
    p.add_argument("--questions", help="Parquet of short-answer questions (question, answers) for fact retention")
    p.add_argument("--question-tokens", type=int, default=32, help="tokens generated per question")
    p.add_argument("--question-limit", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--rep-tokens",
        type=int,
        default=128,
        help="greedy tokens per answer for the long-answer figures (rep-3, ROUGE-L, on-policy agreement)",
    )
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the evaluated model's dtype (the full-depth reference stays fp32)",
    )
    p.set_defaults(func=cmd_eval)
