"""`skipray distill-data`: turn a Parquet of prompts into a self-distillation training set.

Contract: reads ``prompt`` (and optional ``id``) from a Parquet file (local or ``s3://``), generates
the full-depth model's responses in length-sorted batches, and writes Parquet with ``id``, ``prompt``,
``response``, ``prompt_ids``, ``response_ids`` and ``chat``. The ids are stored so that training sees
exactly the tokens the model produced (re-tokenizing text can split differently).
"""

from __future__ import annotations

import argparse
import time


def distill(
    loaded, prompts: list[str], chat: bool, max_new_tokens: int, batch_size: int,
    temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = True,
) -> list[dict]:
    from tqdm import tqdm

    from skipray.engine import Engine, SamplingParams
    from skipray.schedule import SkipSchedule
    from skipray.text import decode, encode_prompt

    ids = [encode_prompt(loaded.tokenizer, p, chat=chat) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    engine = Engine(loaded.model, SkipSchedule.full(loaded.model.num_layers), max_batch=batch_size,
                    max_len=max(map(len, ids)) + max_new_tokens, eos_token_ids=loaded.eos_token_ids)
    rows: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="distill", disable=not progress)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed + i) for i in chunk]
        for i, out in zip(chunk, engine.generate([ids[i] for i in chunk], params)):
            resp = out.token_ids
            rows[i] = {"prompt": prompts[i], "response": decode(loaded.tokenizer, resp), "prompt_ids": ids[i],
                       "response_ids": resp, "chat": chat, "finish_reason": out.finish_reason}
        bar.update(len(chunk))
    bar.close()
    return rows  # type: ignore[return-value]


def cmd_distill(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from skipray.io import read_table, write_table
    from skipray.loading import load

    table = read_table(args.prompts, columns=None)
    if "prompt" not in table.column_names:
        raise ValueError(f"{args.prompts} has no 'prompt' column (columns: {table.column_names})")
    prompts = table.column("prompt").to_pylist()
    if args.limit:
        prompts = prompts[: args.limit]
    ids = table.column("id").to_pylist()[: len(prompts)] if "id" in table.column_names else list(range(len(prompts)))
    loaded = load(args.model, device=args.device)
    t0 = time.perf_counter()
    rows = distill(loaded, prompts, args.chat, args.max_new_tokens, args.batch_size, args.temperature,
                   args.top_p, args.seed)
    out = pa.Table.from_pylist([{"id": str(i), **r} for i, r in zip(ids, rows)])
    write_table(out, args.out)
    n = sum(len(r["response_ids"]) for r in rows)
    print(f"[skipray] wrote {len(rows)} rows, {n} tokens in {time.perf_counter() - t0:.0f}s to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill-data", help="generate a self-distillation training set at full depth")
    p.add_argument("--prompts", required=True, help="Parquet with a 'prompt' column (local or s3://)")
    p.add_argument("--out", required=True, help="output Parquet file (local or s3://)")
    p.add_argument("--model", default="smollm2-base")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_distill)
