"""`skipray calibrate`: find the order in which a model's layers should stop running.

Contract: from calibration sequences (prompt + the full-depth model's own answer, teacher-forced),
``block_influence_order`` ranks layers by block influence, 1 - cos(input, output) of a layer's hidden
states on answer tokens (ShortGPT, Men et al. 2024, arXiv 2403.03853, section 3): least influential
first. ``greedy_kl_order`` drops, one layer at a time, the layer whose removal costs the least
KL(full depth || skipped) on the answer tokens, with the prompt at full depth (the SkipDecode
setting: prompt prefilled at full depth once into a KV cache; answers teacher-forced through the
remaining layers). Both return a complete ``drop_order`` (every layer; layers listed late are the
last to go), so any schedule depth can use it. ``zero_shot_agreement`` scores a schedule by
teacher-forced top-1 agreement with full depth, the measure printed per order. The CLI writes a
schedule file (``SkipSchedule.to_dict`` JSON with ``drop_order``) that ``train``, ``eval``,
``generate``, the Serve app and the batch job accept via ``--schedule-file``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F


def _batch(seqs: Sequence[tuple[list[int], list[int]]], length: int):
    """Left-padded prompts (shared width P) followed by ``length`` answer tokens per row."""
    from skipray.core.runner import pad_prompts

    tokens, real = pad_prompts([p + r[:length] for p, r in seqs])
    P = tokens.shape[1] - length
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return tokens, real, positions, P


@torch.inference_mode()
def block_influence_order(model, seqs, length: int = 32) -> tuple[list[int], list[float]]:
    """Layers by block influence on answer tokens, least first (arXiv 2403.03853, eq. 1); and the scores.

    Runs the Hugging Face model at full depth once, reading each decoder layer's input and output."""
    tokens, real, positions, P = _batch(seqs, length)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(l):
        def fn(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            seen[l] = (x[:, P:].float(), y[:, P:].float())

        return fn

    handles = [layer.register_forward_hook(hook(l), with_kwargs=True) for l, layer in enumerate(model.layers)]
    try:
        model.hf(input_ids=tokens, attention_mask=real.long(), position_ids=positions)
    finally:
        for h in handles:
            h.remove()
    scores = [float((1 - F.cosine_similarity(*seen[l], dim=-1)).mean()) for l in range(model.num_layers)]
    return sorted(range(model.num_layers), key=lambda l: scores[l]), scores


def answer_scorer(model, seqs, length: int):
    """Prefill ``seqs``' prompts at full depth into a cache once; -> ``score(plan)``: the answers' teacher-forced
    log-probs ``(B, length, vocab)`` (float32) through the layers or blocks ``plan`` runs (the SkipDecode setting)."""
    from skipray.core.model import Segment, forward, full_plan

    tokens, real, positions, P = _batch(seqs, length)
    cache = model.new_cache(tokens.shape[0], P + length)
    prompt = Segment(
        tokens[:, :P], positions[:, :P], full_plan(model.num_layers), real[:, :P], logits_at=slice(P - 1, P)
    )
    forward(model, prompt, cache=cache)

    def score(plan) -> torch.Tensor:
        answer = Segment(tokens[:, P:], positions[:, P:], plan, real[:, P:], start=P)
        return F.log_softmax(forward(model, answer, cache=cache).float(), -1)

    return score


@torch.inference_mode()
def greedy_kl_order(
    model, seqs, length: int = 32, min_layers: int = 1, progress: bool = True, start: Sequence[int] = ()
) -> tuple[list[int], list[float]]:
    """Greedy drop order by teacher-forced KL with a full-depth prompt; and the KL after each drop.
    ``start``: layers already dropped, in order (continue a search that stopped at a gentler depth)."""
    from tqdm import tqdm

    from skipray.core.model import step_plan

    L = model.num_layers
    logp_of = answer_scorer(model, seqs, length)

    def answer_logp(active: Sequence[int]) -> torch.Tensor:
        return logp_of(step_plan(active, L))

    teacher = answer_logp(range(L))
    p_t = teacher.exp()
    order: list[int] = list(start)
    kls: list[float] = []
    bar = tqdm(total=L - min_layers - len(order), desc="greedy KL", disable=not progress)
    while L - len(order) > min_layers:
        best_layer: int | None = None
        best_kl = 0.0
        for cand in (l for l in range(L) if l not in order):
            active = [l for l in range(L) if l not in order and l != cand]
            kl = float((p_t * (teacher - answer_logp(active))).sum(-1).mean())
            if best_layer is None or kl < best_kl:
                best_layer, best_kl = cand, kl
        order.append(best_layer)
        kls.append(best_kl)
        bar.update(1)
        bar.set_postfix(layer=best_layer, kl=f"{best_kl:.3f}")
    bar.close()
    order += [l for l in range(L) if l not in order]  # the last layers standing, never dropped above min
    return order, kls


def unit_plan(dropped: set[int], num_layers: int) -> list:
    """The plan of a pass that skips the sublayer ``dropped`` units (``2l`` attention, ``2l + 1`` MLP of layer
    ``l``) on every row and column."""
    from skipray.core.model import LayerRun, SplitRun

    every = LayerRun(slice(None), None)
    plan = []
    for l in range(num_layers):
        attn, mlp = (None if u in dropped else every for u in (2 * l, 2 * l + 1))
        plan.append(every if attn and mlp else None if not (attn or mlp) else SplitRun(attn, mlp))
    return plan


@torch.inference_mode()
def greedy_kl_units(
    model, seqs, length: int = 32, min_layers: float = 1.0, attn_share: float = 0.25, progress: bool = True
) -> tuple[list[int], list[float]]:
    """Sublayer drop order: greedily drops the attention or MLP block (unit ``2l`` or ``2l + 1``) whose removal
    costs the least teacher-forced KL per layer equivalent saved (an attention block weighs ``attn_share`` of a
    layer, an MLP the rest), prompt at full depth, until at most ``min_layers`` layer equivalents are left;
    -> (every unit, dropped ones first; the KL after each drop)."""
    from tqdm import tqdm

    L = model.num_layers
    logp_of = answer_scorer(model, seqs, length)

    def answer_logp(dropped: set[int]) -> torch.Tensor:
        return logp_of(unit_plan(dropped, L))

    def weight(u: int) -> float:
        return attn_share if u % 2 == 0 else 1.0 - attn_share

    teacher = answer_logp(set())
    p_t = teacher.exp()
    order: list[int] = []
    kls: list[float] = []
    left, kl_now = float(L), 0.0
    bar = tqdm(desc="greedy KL (sublayers)", disable=not progress)
    while left > min_layers + 1e-9:
        best: tuple[float, int, float] | None = None  # (KL added per layer equivalent, unit, KL)
        for u in (u for u in range(2 * L) if u not in order):
            kl = float((p_t * (teacher - answer_logp({*order, u}))).sum(-1).mean())
            score = (kl - kl_now) / weight(u)
            if best is None or score < best[0]:
                best = (score, u, kl)
        _, unit, kl_now = best
        order.append(unit)
        kls.append(kl_now)
        left -= weight(unit)
        bar.update(1)
        bar.set_postfix(unit=unit, left=f"{left:.2f}", kl=f"{kl_now:.3f}")
    bar.close()
    return order + [u for u in range(2 * L) if u not in order], kls


@torch.no_grad()
def zero_shot_agreement(model, seqs, schedule, length: int = 32) -> float:
    """Teacher-forced top-1 agreement of ``schedule`` with full depth on the answer tokens."""
    from skipray.core.model import Segment, forward, full_plan, training_plan

    tokens, real, positions, P = _batch(seqs, length)
    T = tokens.shape[1]
    cols = slice(P - 1, T - 1)
    s = forward(model, Segment(tokens, positions, training_plan(schedule, P, T), real, logits_at=cols))
    t = forward(model, Segment(tokens, positions, full_plan(model.num_layers), real, logits_at=cols))
    return float((s.argmax(-1) == t.argmax(-1)).float().mean())


def calibration_sequences(path: str, n: int, length: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt_ids, response_ids) pairs with at least ``length`` answer tokens (``distill-data`` output)."""
    from skipray.io import read_table

    t = read_table(path, columns=["prompt_ids", "response_ids"])
    pairs = [
        (list(p), list(r))
        for p, r in zip(t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist())
        if len(r) >= length
    ]
    if len(pairs) < n:
        raise ValueError(f"{path}: only {len(pairs)} answers have >= {length} tokens; need {n}")
    return pairs[:n]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load

    torch.manual_seed(0)
    m = load(args.model, device=args.device)
    model = m.model
    model.build_inference_weights()  # every pass here is without gradients: fused, prepacked products
    seqs = calibration_sequences(args.data, args.n + args.heldout, args.length)
    calib, held = seqs[: args.n], seqs[args.n :]
    t0 = time.perf_counter()
    report: dict = {}
    share = args.attn_share or model.attention_share()
    base = SkipSchedule(
        model.num_layers,
        args.max_layers,
        args.min_layers,
        args.decay_tokens,
        warmup_layers=args.warmup_layers,
        shape=args.shape,
        power=args.power,
        sublayers=args.sublayers,
        attn_share=share,
    )
    orders = {"skipdecode": list(base.order)}
    scores: list[float] = []
    if args.sublayers:  # units: 2l attention, 2l + 1 MLP of layer l
        if args.method != "greedy-kl":
            raise ValueError("--sublayers searches by greedy KL (block influence ranks whole layers)")
        if args.from_order:  # a whole-layer order, each layer's MLP dropping before its attention
            prev = json.loads(Path(args.from_order).read_text())
            orders["expanded"] = [u for l in prev["drop_order"] for u in (2 * l + 1, 2 * l)]
        orders["greedy-kl"], report["greedy_kl"] = greedy_kl_units(
            model, calib, args.length, min_layers=args.search_min_layers or args.min_layers, attn_share=share
        )
    else:
        bi, scores = block_influence_order(model, calib, args.length)
        orders["block-influence"] = bi
    if args.method == "greedy-kl" and not args.sublayers:
        start: list[int] = []
        if args.from_order:  # the searched part of an earlier order: its first L - min_layers drops
            prev = json.loads(Path(args.from_order).read_text())
            start = prev["drop_order"][: model.num_layers - prev["min_layers"]]
        orders["greedy-kl"], kls = greedy_kl_order(
            model, calib, args.length, start=start, min_layers=args.search_min_layers or args.min_layers
        )
        report["greedy_kl"] = kls
    report.update(
        {
            "model": args.model,
            "data": args.data,
            "n": args.n,
            "length": args.length,
            "block_influence": scores,
            "orders": orders,
            "schedule": base.describe(),
            "agreement": {},
        }
    )
    print(f"zero-shot teacher-forced agreement, {base.describe()}, {len(held)} held-out answers:")
    for name, order in orders.items():
        sched = base.with_drop_order(None if name == "skipdecode" else order)
        report["agreement"][name] = agree = zero_shot_agreement(model, held, sched, args.length)
        print(f"  {name:16s} {agree:.3f}  order {order}")
    chosen = args.method
    out = base.with_drop_order(orders[chosen]).to_dict()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    Path(args.out).with_suffix(".report.json").write_text(json.dumps(report, indent=2))
    print(f"[skipray] {chosen} order written to {args.out} ({time.perf_counter() - t0:.0f}s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="find a drop order for a model from calibration data")
    p.add_argument("--data", required=True, help="Parquet from `skipray distill-data` (prompt_ids, response_ids)")
    p.add_argument("--out", required=True, help="schedule file to write (JSON)")
    p.add_argument("--model", default="smollm2-base")
    p.add_argument("--method", choices=["greedy-kl", "block-influence"], default="greedy-kl")
    p.add_argument("--n", type=int, default=12, help="calibration answers")
    p.add_argument("--heldout", type=int, default=32, help="answers to score the orders on")
    p.add_argument("--length", type=int, default=32, help="answer tokens per sequence")
    p.add_argument("--max-layers", type=int, required=True)
    p.add_argument("--min-layers", type=int, required=True)
    p.add_argument("--decay-tokens", type=int, default=64)
    p.add_argument("--warmup-layers", type=int, default=1, help="for the SkipDecode order it is compared with")
    p.add_argument("--shape", choices=["linear", "power"], default="linear")
    p.add_argument("--power", type=float, default=2.0, help="exponent of the power shape")
    p.add_argument(
        "--search-min-layers",
        type=int,
        default=None,
        help="depth the greedy search goes down to (default: --min-layers)",
    )
    p.add_argument(
        "--from-order",
        help="a schedule file from an earlier greedy search: continue it deeper (with --sublayers: compare its"
        " layer order expanded to units)",
    )
    p.add_argument(
        "--sublayers", action="store_true", help="search the order of attention and MLP blocks (units) by greedy KL"
    )
    p.add_argument(
        "--attn-share", type=float, default=None, help="an attention block's FLOP share (default: the model's)"
    )
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_calibrate)
