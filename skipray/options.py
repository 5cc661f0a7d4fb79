"""Command-line options shared by `skipray generate`, `skipray eval`, the Ray Data job and the server.

Contract: ``add_schedule_args`` / ``add_sampling_args`` add the flags; ``schedule_from_flags`` reads a
``schedule_file`` among skip flags and hands the rest to ``skipray.core.schedule.resolve_schedule`` (the one
rule for every entry point: the CLI, the Serve app's config, the batch processor's config);
``schedule_from_args`` does so for the command line and prints the warning, if any, to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from skipray.core.schedule import SCHEDULE_FLAGS, SkipSchedule, resolve_schedule


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
        "--sublayers",
        action="store_true",
        default=None,
        help="attention and MLP blocks drop separately (--drop-order then lists units: 2l attention, 2l+1 MLP)",
    )
    g.add_argument("--attn-share", type=float, help="with --sublayers: an attention block's share of a layer's FLOPs")
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


def schedule_from_flags(flags: Mapping[str, Any] | None, num_layers: int, trained: SkipSchedule | None):
    """Skip flags as a mapping (``resolve_schedule``'s, plus ``schedule_file``: a schedule JSON the other
    flags override, read here) -> ``resolve_schedule``'s ``(schedule, warning or None)``. Raises what
    ``read_schedule_file`` and ``resolve_schedule`` raise."""
    flags = dict(flags or {})
    file = flags.pop("schedule_file", None)
    start = read_schedule_file(file, num_layers) if file else None
    return resolve_schedule(flags, num_layers, trained, start)


def schedule_from_args(args: argparse.Namespace, num_layers: int, trained: SkipSchedule | None) -> SkipSchedule:
    """The schedule the command-line flags ask for (``resolve_schedule``'s rule); warns on stderr."""
    flags = {k: getattr(args, k, None) for k in ("full", "schedule_file", *SCHEDULE_FLAGS)}
    schedule, warning = schedule_from_flags(flags, num_layers, trained)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return schedule
