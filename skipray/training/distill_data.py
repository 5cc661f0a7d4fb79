"""`skipray distill-data`: self-distillation data from the full-depth model, prompts included.

Contract:

* ``distill`` generates the full-depth model's answers to prompts (several sampled answers per prompt
  with ``samples > 1``) and records, at every generated position, the teacher's top-``k`` log-probs
  (the log-softmax of the logits that sampled the token). Training then reads the teacher from the
  data instead of rerunning 30 teacher layers per step. Rows: ``id``, ``prompt``, ``response``,
  ``prompt_ids``, ``response_ids``, ``chat``, ``finish_reason``, ``teacher_top_ids`` and
  ``teacher_top_logprobs`` (lists per response token, best first).
* ``self_prompts`` has the model write user prompts itself from its chat template: the template is
  cut right after the user turn's header and the model samples the user message (Magpie, Xu et al.
  2024, arXiv 2406.08464). Prompts are normalized, de-duplicated, and every prompt too close to an
  evaluation prompt or question (``exclude``) is dropped, so eval sets stay held out.
* With ``policy`` (a skipping schedule of a model that carries a skip adapter), the answers are
  on-policy rollouts: the skip model samples them under ``policy``, and the full-depth model (the same
  weights with the adapter off, so exactly the base model) scores every generated position in one
  teacher-forced pass, giving the same ``teacher_top_*`` columns (``teacher_topk``). Training on them
  corrects the student where its own outputs drift, e.g. repetition loops, which teacher samples never
  show it (on-policy distillation: GKD, Agarwal et al. 2024, arXiv 2306.13649, section 3).
* The CLI writes shards to an output directory (``part-*``: the given prompts, ``--shard-size`` at a
  time; ``self-*``: model-written prompts, made and answered a shard at a time) and skips shards
  already written, so an interrupted run resumes where it stopped and training can start on the
  shards that exist.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

SENTINEL = "\x00SKIPRAY_USER\x00"


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def user_header_ids(tokenizer, system: str | None = None) -> list[int]:
    """Token ids of the chat template up to where the user's message starts (the Magpie query)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": SENTINEL}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    if SENTINEL not in text:
        raise ValueError("the chat template does not render the user message verbatim")
    return list(tokenizer(text[: text.index(SENTINEL)], add_special_tokens=False)["input_ids"])


def too_close(prompt: str, held_out: Sequence[set[str]], threshold: float = 0.5) -> bool:
    """True when ``prompt`` shares at least ``threshold`` of its words (Jaccard) with a held-out text."""
    words = set(_norm(prompt).split())
    if not words:
        return True
    return any(len(words & h) / len(words | h) >= threshold for h in held_out)


def self_prompts(
    loaded,
    n: int,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    exclude: Iterable[str] = (),
    progress: bool = True,
    seen: set[str] | None = None,
    starts: Sequence[str] = (),
) -> list[str]:
    """Up to ``n`` distinct user prompts written by the model itself (Magpie, arXiv 2406.08464, section 2),
    none of them in ``seen`` or close to a text of ``exclude``. ``starts``: openings the model continues (row
    ``i`` of a batch takes ``starts[i % len(starts)]``), e.g. "Who", "What year" for short factual questions;
    the prompt keeps its opening."""
    from tqdm import tqdm

    from skipray.core.config import EngineConfig
    from skipray.core.engine import Engine, SamplingParams
    from skipray.text import decode

    tok = loaded.tokenizer
    query = user_header_ids(tok)
    held = [set(_norm(x).split()) for x in exclude]
    openings = [s.strip() for s in starts] or [""]
    queries = [query + (tok(o, add_special_tokens=False)["input_ids"] if o else []) for o in openings]
    config = EngineConfig(max_num_seqs=batch_size, max_model_len=max(map(len, queries)) + max_new_tokens)
    engine = Engine(loaded.model, config=config, eos_token_ids=loaded.eos_token_ids)
    seen = set() if seen is None else seen  # normalized prompts already taken (updated in place)
    out: list[str] = []
    bar = tqdm(total=n, desc="self-prompts", disable=not progress)
    tries = 0
    while len(out) < n and tries < 4 * n:
        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + tries + i)
            for i in range(batch_size)
        ]
        tries += batch_size
        rows = [i % len(openings) for i in range(batch_size)]
        for j, c in zip(rows, engine.generate([queries[j] for j in rows], params)):
            if c.finish_reason != "stop":  # cut off mid-sentence: not a whole prompt
                continue
            text = (openings[j] + decode(tok, c.token_ids)).strip()
            key = _norm(text)
            if len(key) < 12 or key in seen or too_close(text, held):
                continue
            seen.add(key)
            out.append(text)
            bar.update(1)
    bar.close()
    return out[:n]


@torch.no_grad()
def teacher_topk(
    model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], k: int, batch_size: int = 16
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """The full-depth model's top-``k`` (ids, log-probs) predicting each token of each response after its
    prompt: one teacher-forced forward per batch, adapter off (the base model). Per row: two lists of
    ``len(response)`` lists of ``k``, best first. Raises ``ValueError`` for an empty response."""
    from skipray.core.model import Segment, forward, full_plan
    from skipray.training.data import Example, collate

    if any(not r for r in responses):
        raise ValueError("teacher_topk needs non-empty responses")
    dev = next(model.parameters()).device
    out: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        b = collate([Example(list(prompts[i]), list(responses[i])) for i in chunk], pad_id=0).to(dev)
        P, T = b.prompt_len, b.tokens.shape[1]
        seg = Segment(b.tokens, b.positions, full_plan(model.num_layers), b.real, logits_at=slice(P - 1, T - 1))
        logits = forward(model, seg).float()
        vals, ids = torch.topk(torch.log_softmax(logits, -1), k, dim=-1)
        for j, i in enumerate(chunk):
            n = len(responses[i])
            out[i] = (ids[j, :n].tolist(), vals[j, :n].tolist())
    return out


def distill(
    loaded,
    prompts: list[str],
    chat: bool,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    samples: int = 1,
    topk: int = 0,
    policy=None,
) -> list[dict]:
    """Answers to ``prompts`` (``samples`` per prompt; seeds ``seed + row``), with the teacher's top-``topk``
    log-probs per response token when ``topk > 0``. Rows in prompt order, samples adjacent. Without
    ``policy`` the full-depth model answers (self-distillation); with a skipping ``SkipSchedule`` the skip
    model answers under it and the full model scores the answers (on-policy rollouts, module docstring).
    Raises ``ValueError`` for a ``policy`` without ``topk`` (the rollout would carry no teacher)."""
    from tqdm import tqdm

    from skipray.core.config import EngineConfig
    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule
    from skipray.text import decode, encode_prompt

    ids = [encode_prompt(loaded.tokenizer, p, chat=chat) for p in prompts for _ in range(samples)]
    texts = [p for p in prompts for _ in range(samples)]
    if policy is not None and not topk:
        raise ValueError("on-policy rollouts need topk > 0: the full model's scores are their training signal")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    schedule = policy or SkipSchedule.full(loaded.model.num_layers)
    config = EngineConfig(max_num_seqs=batch_size, max_model_len=max(map(len, ids)) + max_new_tokens)
    engine = Engine(loaded.model, schedule, config, loaded.eos_token_ids)
    rows: list[dict | None] = [None] * len(ids)
    bar = tqdm(total=len(ids), desc="distill", disable=not progress)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + i,
                logprobs=0 if policy else topk,
            )
            for i in chunk
        ]
        outs = engine.generate([ids[i] for i in chunk], params)
        if policy is not None:
            scored = teacher_topk(loaded.model, [ids[i] for i in chunk], [o.token_ids for o in outs], topk)
        for j, (i, out) in enumerate(zip(chunk, outs)):
            resp = out.token_ids
            rows[i] = {
                "prompt": texts[i],
                "response": decode(loaded.tokenizer, resp),
                "prompt_ids": ids[i],
                "response_ids": resp,
                "chat": chat,
                "finish_reason": out.finish_reason,
            }
            if policy is not None:
                rows[i]["teacher_top_ids"], rows[i]["teacher_top_logprobs"] = scored[j]
            elif topk:
                rows[i]["teacher_top_ids"] = [lp.top_ids for lp in out.logprobs]
                rows[i]["teacher_top_logprobs"] = [lp.top_logprobs for lp in out.logprobs]
        bar.update(len(chunk))
    bar.close()
    return rows  # type: ignore[return-value]


def _held_out_texts(paths: Sequence[str]) -> list[str]:
    from skipray.io import read_table

    texts: list[str] = []
    for p in paths:
        t = read_table(p)
        for col in ("prompt", "question"):
            if col in t.column_names:
                texts += [x for x in t.column(col).to_pylist() if x]
    return texts


def _write_shard(rows: list[dict], shard: Path, first_id: int, samples: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.Table.from_pylist([{"id": f"{first_id + i // samples}-{i % samples}", **r} for i, r in enumerate(rows)])
    tmp = shard.with_name(f"_{shard.name}.tmp")  # "_": never read as part of the dataset
    pq.write_table(out, tmp)
    tmp.replace(shard)


def cmd_distill(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skipray.io import read_table, write_table
    from skipray.loading import load

    loaded = load(args.model, device=args.device)
    prompts: list[str] = []
    if args.prompts:
        table = read_table(args.prompts, columns=None)
        if "prompt" not in table.column_names:
            raise ValueError(f"{args.prompts} has no 'prompt' column (columns: {table.column_names})")
        prompts = table.column("prompt").to_pylist()[: args.limit or None]
    if not prompts and not args.self_prompts:
        raise ValueError("no prompts: give --prompts, --self-prompts or both")
    policy = None
    if args.policy:  # on-policy rollouts of the loaded skip model
        from skipray.training.evaluate import parse_schedule

        policy = parse_schedule(args.policy, loaded.model.num_layers, loaded.schedule, args.model)
        if policy.is_full:
            raise ValueError("--policy must be a skipping schedule (full depth is what --policy omitted does)")
        if not args.topk:
            raise ValueError("--policy needs --topk K: the full model's top-K scores are the training signal")
    distill_args = (args.chat, args.max_new_tokens, args.batch_size, args.temperature, args.top_p)
    starts = [s for s in args.self_prompt_starts.split(",") if s.strip()]
    t0 = time.perf_counter()
    if args.out.endswith(".parquet") and not args.shard_size:  # one file
        if args.self_prompts:
            prompts += self_prompts(
                loaded, args.self_prompts, seed=args.seed, exclude=_held_out_texts(args.exclude), starts=starts
            )
        rows = distill(
            loaded, prompts, *distill_args, seed=args.seed, samples=args.samples, topk=args.topk, policy=policy
        )
        out = pa.Table.from_pylist([{"id": f"{i // args.samples}-{i % args.samples}", **r} for i, r in enumerate(rows)])
        write_table(out, args.out)
        n = sum(len(r["response_ids"]) for r in rows)
        print(f"[skipray] wrote {len(rows)} rows, {n} tokens in {time.perf_counter() - t0:.0f}s to {args.out}")
        return 0
    # a directory of shards, each written whole; a re-run skips the shards that exist
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = args.shard_size or 512
    n = 0
    for k, s in enumerate(range(0, len(prompts), size)):
        shard = out_dir / f"part-{k:05d}.parquet"
        if not shard.exists():
            rows = distill(
                loaded,
                prompts[s : s + size],
                *distill_args,
                seed=args.seed + s * args.samples,
                samples=args.samples,
                topk=args.topk,
                policy=policy,
            )
            _write_shard(rows, shard, s, args.samples)
            n += len(rows)
            print(f"[skipray] {shard.name}: {len(rows)} rows ({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.self_prompts:  # shards of model-written prompts, de-duplicated across shards
        exclude = _held_out_texts(args.exclude)
        seen = {_norm(p) for p in prompts}
        for k in range(-(-args.self_prompts // size)):
            shard = out_dir / f"self-{k:05d}.parquet"
            if shard.exists():
                seen |= {_norm(p) for p in pq.read_table(shard, columns=["prompt"]).column("prompt").to_pylist()}
                continue
            made = self_prompts(
                loaded, size, seed=args.seed + 10**6 * (k + 1), exclude=exclude, seen=seen, starts=starts
            )
            rows = distill(
                loaded,
                made,
                *distill_args,
                seed=args.seed + 10**6 * (k + 1),
                samples=args.samples,
                topk=args.topk,
                policy=policy,
            )
            _write_shard(rows, shard, k * size, args.samples)
            n += len(rows)
            print(
                f"[skipray] {shard.name}: {len(rows)} rows from model-written prompts "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    print(f"[skipray] wrote {n} new rows to {out_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill-data", help="generate a self-distillation training set at full depth")
    p.add_argument("--prompts", help="Parquet with a 'prompt' column (local or s3://)")
    p.add_argument("--self-prompts", type=int, default=0, help="also have the model write N prompts (Magpie)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="Parquet of held-out prompts/questions: model-written prompts close to them are dropped",
    )
    p.add_argument(
        "--self-prompt-starts",
        default="",
        help="comma-separated openings the model-written prompts continue (e.g. 'Who,What year,Which country'):"
        " short factual questions",
    )
    p.add_argument("--out", required=True, help="a .parquet file, or a directory of resumable shards")
    p.add_argument("--shard-size", type=int, default=0, help="prompts per shard (directory output)")
    p.add_argument("--model", default="smollm2-base")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=1, help="answers per prompt (use with --temperature > 0)")
    p.add_argument("--topk", type=int, default=0, help="store the teacher's top-K log-probs per response token")
    p.add_argument(
        "--policy",
        default=None,
        help="on-policy rollouts: the --model skip adapter answers under this schedule ('trained', "
        "skip flags such as min-layers=12, or a .json file) and the full model scores them (needs --topk)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_distill)
