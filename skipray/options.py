"""Command-line options shared by `skipray generate`, `skipray eval`, the Ray Data job and the server.

Contract: ``add_schedule_args`` / ``add_sampling_args`` add the flags; ``schedule_from_args`` turns them
into a ``SkipSchedule`` for a given model, applying the rule: a model's default schedule is the one it
was trained for; a model not trained for skipping defaults to full depth, and asking it to skip warns.
"""

from __future__ import annotations

import argparse
import sys

from skipray.core.schedule import SkipSchedule


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("skip schedule (default: the one the model was trained for, else full depth)")
    g.add_argument("--full", action="store_true", help="run every layer for every token")
    g.add_argument("--max-layers", type=int, help="layers run at the first generation step")
    g.add_argument("--min-layers", type=int, help="layers run once the schedule has decayed")
    g.add_argument("--decay-tokens", type=int, help="generation steps over which depth falls")
    g.add_argument("--warmup-layers", type=int, help="lowest layers that always run (default 1)")
    g.add_argument("--shape", choices=["linear", "power"], help="decay shape (default linear)")
    g.add_argument("--power", type=float, help="exponent of the power shape: n(i) = max - (max-min)(i/decay)^power")
    g.add_argument(
        "--drop-order",
        type=lambda v: [int(x) for x in v.split(",")],
        help="comma-separated layers in the order they stop running (default: SkipDecode's)",
    )
    g.add_argument(
        "--schedule-file",
        help="a schedule JSON (from `skipray calibrate`, or a model's skipray.json); "
        "the flags above override its fields",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


SCHEDULE_FLAGS = ("max_layers", "min_layers", "decay_tokens", "warmup_layers", "shape", "power", "drop_order")


def read_schedule_file(path: str, num_layers: int | None = None) -> SkipSchedule:
    """A ``SkipSchedule`` from JSON: its ``to_dict`` form, or a ``skipray.json`` holding one under ``schedule``.
    Raises ``ValueError`` on unknown keys or a schedule made for another depth than ``num_layers``."""
    import json
    from pathlib import Path

    d = json.loads(Path(path).read_text())
    d = d.get("schedule", d) if isinstance(d.get("schedule"), dict) else d
    s = SkipSchedule.from_dict(d)
    if num_layers is not None and s.num_layers != num_layers:
        raise ValueError(f"{path}: schedule is for {s.num_layers} layers, the model has {num_layers}")
    return s


def schedule_from_args(args: argparse.Namespace, num_layers: int, trained: SkipSchedule | None) -> SkipSchedule:
    if getattr(args, "full", False):
        return SkipSchedule.full(num_layers)
    given = {k: getattr(args, k, None) for k in SCHEDULE_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    start = read_schedule_file(args.schedule_file, num_layers) if getattr(args, "schedule_file", None) else trained
    if not given and start is not None:
        schedule = start
    elif not given:
        return SkipSchedule.full(num_layers)
    else:
        schedule = SkipSchedule.from_dict(_override(start, given, num_layers))
    if trained is None and not schedule.is_full:
        msg = (
            "this model was not trained for skipping: its output under a skip schedule will be poor "
            "(train it with `skipray train`, or use --full)"
        )
        print(f"warning: {msg}", file=sys.stderr)
    return schedule


def _override(start: SkipSchedule | None, given: dict, num_layers: int) -> dict:
    base = (
        start.to_dict()
        if start
        else {
            "num_layers": num_layers,
            "max_layers": num_layers,
            "min_layers": num_layers,
            "decay_tokens": 64,
            "warmup_layers": 1,
            "shape": "linear",
        }
    )
    base.update(given, num_layers=num_layers)
    if "max_layers" in given and "min_layers" not in given:
        base["min_layers"] = min(base["min_layers"], base["max_layers"])
    return base
