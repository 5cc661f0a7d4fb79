"""The `skipray` command line: generate (and train, distill-data, eval, serve where installed).

Contract: argument parsing and printing only; the work is done by the library modules, imported
lazily so that `skipray --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_generate(args: argparse.Namespace) -> int:
    from skipray.core.config import EngineConfig
    from skipray.core.engine import Engine
    from skipray.core.requests import SamplingParams
    from skipray.loading import load
    from skipray.options import schedule_from_args
    from skipray.text import decode, detokenizer, encode_prompt

    t0 = time.perf_counter()
    import torch

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    m = load(args.model, device=args.device, dtype=dtype)
    schedule = schedule_from_args(args, m.model.num_layers, m.schedule)
    prompts = [encode_prompt(m.tokenizer, p, chat=args.chat) for p in args.prompt]
    params = SamplingParams(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or (),
    )
    config = EngineConfig(
        max_num_seqs=len(prompts),
        max_model_len=max(map(len, prompts)) + args.max_new_tokens,
        max_tokens=args.max_new_tokens,
    )
    engine = Engine(
        m.model, schedule, config, m.eos_token_ids, cache_schedule=schedule, detokenize=detokenizer(m.tokenizer)
    )  # the cache sized for the schedule
    t1 = time.perf_counter()
    outs = engine.generate(prompts, params)
    t2 = time.perf_counter()
    for prompt, out in zip(args.prompt, outs):
        text = decode(m.tokenizer, out.token_ids, args.stop)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": text,
                        "token_ids": out.token_ids,
                        "num_prompt_tokens": out.prompt_len,
                        "layers_per_token": out.layers_per_token,
                        "avg_layers": round(out.avg_layers, 3),
                        "finish_reason": out.finish_reason,
                    }
                )
            )
        else:
            print(f"### {prompt}\n{text}\n")
    n = sum(len(o.token_ids) for o in outs)
    print(
        f"[skipray] {schedule.describe()} | {n} tokens in {t2 - t1:.2f}s ({n / max(t2 - t1, 1e-9):.1f} tok/s), "
        f"load {t1 - t0:.1f}s, model {m.source}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from skipray.options import add_sampling_args, add_schedule_args

    parser = argparse.ArgumentParser(prog="skipray", description="Skip decoding for causal LMs, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument(
        "--model",
        default="default",
        help="'default' (~1.5x skip adapter), 'default-2x', 'default-fast', 'smollm2-base', a model dir or .gguf file",
    )
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU, where skipray's "
        "prepacked fp32 kernels ran as fast as bfloat16 in our benchmark)",
    )
    add_schedule_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    from skipray.serve import cli as serve_cli
    from skipray.training import calibrate, distill_data, evaluate, train_cli

    for module in (train_cli, distill_data, calibrate, evaluate, serve_cli):  # subcommands register themselves
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from skipray.env import apply

    apply()  # before torch allocates: huge pages for the weights (skipray.env)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"skipray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
