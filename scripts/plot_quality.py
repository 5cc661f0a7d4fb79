"""Quality against theoretical speedup over every `skipray eval` report kept in docs/eval/.

Usage: .venv/bin/python scripts/plot_quality.py [docs/eval] [docs/quality_vs_speedup.png]
One point per (report, schedule row): fact retention and ROUGE-L over token ids against full depth,
labelled with the report's name (model, training budget) and the row's drop order; the reference rows
(base in bf16, base sampled at temperature 0.3) are drawn as horizontal noise floors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def order_name(row: dict) -> str:
    """The row's drop order and schedule shape, e.g. 'calibrated order, 30->11/22 p6'."""
    d = row.get("schedule_dict") or {}
    shape = f"{d.get('max_layers')}->{d.get('min_layers')}/{d.get('decay_tokens')}"
    if d.get("shape") == "power":
        shape += f" p{d.get('power'):g}"
    if d.get("drop_order") is None:
        return f"SkipDecode order, warm-up {d.get('warmup_layers', '?')}, {shape}"
    return f"calibrated order, {shape}"


def main(src: str = "docs/eval", out: str = "docs/quality_vs_speedup.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted(Path(src).glob("*.json"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    floors: dict[str, dict[str, float]] = {}
    for path in reports:
        rep = json.loads(path.read_text())
        rows = rep.get("results") if isinstance(rep, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "schedule" in r for r in rows):
            continue  # not a `skipray eval` report (e.g. an offline lever's measurements)
        for row in rows:
            if row["schedule"].startswith("ref:"):
                floors.setdefault(
                    row["schedule"], {"facts": row.get("fact_retention"), "rouge": row.get("rouge_l_ids_vs_full")}
                )
                continue
            if row["theoretical_speedup"] <= 1.0001:
                continue
            x = row["theoretical_speedup"]
            label = f"{path.stem}: {order_name(row)}"
            for ax, key in zip(axes, ("fact_retention", "rouge_l_ids_vs_full")):
                if row.get(key) is not None:
                    ax.scatter(x, row[key], s=22)
                    ax.annotate(label, (x, row[key]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    for ax, key, title in zip(
        axes,
        ("facts", "rouge"),
        ("fact retention (questions the full model answers)", "ROUGE-L over token ids vs full depth"),
    ):
        for name, f in floors.items():
            if f.get(key) is not None:
                ax.axhline(f[key], ls=":", lw=1, color="gray")
                ax.annotate(name, (ax.get_xlim()[0], f[key]), fontsize=6, color="gray")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("theoretical speedup (FLOPs, lm_head counted)")
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"{len(reports)} reports -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
