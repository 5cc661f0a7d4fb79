"""`skipray train`: the command line over ``skipray.training.train`` and ``skipray.training.train_ray``.

Contract: ``register(subparsers)`` adds the ``train`` subcommand; ``config_from_args(args)`` turns its
flags (schedule flags over an optional ``--schedule-file``) into a ``TrainConfig`` and raises
``ValueError`` when neither gives the schedule's ``--max-layers`` and ``--min-layers``;
``cmd_train(args) -> int`` trains in this process (``train``) or, with ``--workers N > 1``, on ``N``
Ray Train workers (``train_distributed``), then prints where the result was saved.
"""

from __future__ import annotations

import argparse

from skipray.core.schedule import SCHEDULE_FLAGS
from skipray.training.train import TrainConfig, train
from skipray.training.train_ray import train_distributed


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    sched = {k: getattr(args, k) for k in SCHEDULE_FLAGS if getattr(args, k) is not None}
    if args.schedule_file:
        from skipray.options import read_schedule_file

        sched = {**read_schedule_file(args.schedule_file).to_dict(), **sched}
        sched.pop("num_layers")
    elif args.max_layers is None or args.min_layers is None:
        raise ValueError("give --max-layers and --min-layers, or --schedule-file")
    else:
        sched.setdefault("decay_tokens", 64)
    fields = {f for f in TrainConfig.__dataclass_fields__}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(schedule=sched, **kw)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.workers > 1:
        train_distributed(cfg, workers=args.workers, resume=args.resume, use_gpu=args.use_gpu)
    else:
        train(cfg, resume=args.resume)
    print(f"[skipray] saved to {cfg.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="skip-aware fine-tuning (distillation from the full-depth model)")
    p.add_argument("--data", required=True, help="Parquet: prompt_ids+response_ids, prompt+response, or text")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-base")
    p.add_argument("--schedule-file", help="schedule JSON (e.g. from `skipray calibrate`); flags below override it")
    p.add_argument("--max-layers", type=int)
    p.add_argument("--min-layers", type=int)
    p.add_argument("--decay-tokens", type=int)
    p.add_argument("--warmup-layers", type=int)
    p.add_argument("--shape", choices=["linear", "power"])
    p.add_argument("--power", type=float, help="exponent of the power shape")
    p.add_argument(
        "--drop-order",
        type=lambda v: [int(x) for x in v.split(",")],
        help="comma-separated layers in the order they stop running (default: SkipDecode's)",
    )
    p.add_argument(
        "--sublayers",
        action="store_true",
        default=None,
        help="attention and MLP blocks drop separately (--drop-order then lists units: 2l attention, 2l+1 MLP)",
    )
    p.add_argument("--attn-share", type=float, help="with --sublayers: an attention block's share of a layer's FLOPs")
    p.add_argument(
        "--divergence",
        choices=["forward", "reverse", "jsd"],
        help="teacher-student divergence: forward KL (default), reverse KL or Jensen-Shannon",
    )
    p.add_argument("--full-finetune", action="store_true", help="train all weights instead of a LoRA adapter")
    for name, typ in (
        ("lora-r", int),
        ("lora-alpha", int),
        ("lr", float),
        ("steps", int),
        ("batch-size", int),
        ("grad-accum", int),
        ("warmup-steps", int),
        ("kl-weight", float),
        ("ce-weight", float),
        ("clip", float),
        ("max-len", int),
        ("save-every", int),
        ("seed", int),
        ("early-tokens", int),
        ("early-weight", float),
    ):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--init-adapter", help="LoRA adapter directory to start from (same targets; a lower rank grows to --lora-r)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers on Ray Train")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (nccl)")
    p.set_defaults(func=cmd_train)
