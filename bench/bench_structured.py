"""Structured output's cost: tokens/s at batch 16 with and without a JSON schema, side by side in one run.

Contract: ``OMP_NUM_THREADS=1 python bench/bench_structured.py [--model default] [--batch 16] [--max-tokens 64]
[--rounds 3]`` builds one engine of the shipped default, then alternates ``--rounds`` times between the same
16 chat prompts generated freely and constrained to a JSON schema (``skipray.structured``; greedy, the model's
schedule), and prints generated tokens/s (best round of each) and the schema's slowdown; writes
``bench/results/structured.json``. With the schema, answers end when the JSON is complete, so tokens/s (not
wall time) is the comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from skipray.env import apply as apply_env

apply_env()

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "maxItems": 3},
    },
    "required": ["city", "country", "population_millions", "facts"],
    "additionalProperties": False,
}
CITIES = [
    "Paris",
    "Tokyo",
    "Lagos",
    "Lima",
    "Oslo",
    "Cairo",
    "Delhi",
    "Quito",
    "Rome",
    "Seoul",
    "Accra",
    "Hanoi",
    "Dhaka",
    "Doha",
    "Kyiv",
    "Riga",
]


def main() -> None:
    import torch

    from skipray.core.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.structured import Constraints
    from skipray.text import encode_prompt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/structured.json")
    a = ap.parse_args()
    m = load(a.model, device="cpu")
    prompts = [
        encode_prompt(
            m.tokenizer,
            f"Describe {CITIES[i % len(CITIES)]} as JSON with city, country, population_millions and facts.",
            chat=True,
        )
        for i in range(a.batch)
    ]
    engine = Engine(m.model, m.schedule, max_batch=a.batch, max_len=320, eos_token_ids=m.eos_token_ids)
    constraints = Constraints(m.tokenizer, m.model.vocab_size, m.eos_token_ids)
    modes = {
        "free": SamplingParams(max_tokens=a.max_tokens),
        "json schema": SamplingParams(max_tokens=a.max_tokens, structured=constraints.for_spec({"json": SCHEMA})),
    }
    best, valid = dict.fromkeys(modes, 0.0), 0
    for _ in range(a.rounds):
        for name, params in modes.items():
            t = time.perf_counter()
            outs = engine.generate(prompts, params)
            tok_s = sum(len(c.token_ids) for c in outs) / (time.perf_counter() - t)
            best[name] = max(best[name], tok_s)
            if name == "json schema":
                texts = [
                    m.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in outs if c.finish_reason == "stop"
                ]
                valid = sum(1 for x in texts if isinstance(json.loads(x), dict))
    slowdown = 1 - best["json schema"] / best["free"]
    result = {
        "model": a.model,
        "batch": a.batch,
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
        "threads": torch.get_num_threads(),
        "tok_s": best,
        "slowdown": slowdown,
        "json_answers_complete_and_parsed": valid,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"batch {a.batch}, {a.max_tokens} max tokens, best of {a.rounds} rounds, {result['threads']} threads")
    for name, v in best.items():
        print(f"{name:>12}: {v:7.1f} tokens/s")
    print(f"schema slowdown: {100 * slowdown:.1f}% ({valid} of {a.batch} answers complete JSON in the last round)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
