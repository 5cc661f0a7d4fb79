"""The report files of ``skipray eval``: ``report.json``, ``report.md`` (two tables: quality and speed per
schedule; long answers by length) and ``quality_vs_speedup.png`` (matplotlib, Agg backend).

Contract: ``write_report(report, out)`` writes the three files into ``out`` (created) from the dict
``skipray.training.evaluate.evaluate`` returns; it reads the per-schedule keys that ``evaluate`` writes and
shows ``-`` for a figure a row lacks.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# skipray eval: {report['model']} on {report['prompts']} ({report['n']} prompts, "
        f"{report['max_new_tokens']} new tokens; facts: {report.get('questions')})",
        "",
        "| schedule | avg layers | theoretical speedup | measured speedup | fact retention | ROUGE-L ids vs full "
        "| ROUGE-L words vs full | teacher-forced agreement | on-policy agreement | ppl under full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, fmt=".3f"):
        return "-" if x is None else format(x, fmt)

    for r in report["results"]:
        facts = "-" if r.get("fact_retention") is None else f"{r['fact_retention']:.1%} of {r['facts_known_by_full']}"
        lines.append(
            f"| {r['description']} | {r['avg_layers']:.2f} | {r['theoretical_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x | {facts} | {f(r.get('rouge_l_ids_vs_full'))} | "
            f"{f(r['rouge_l_vs_full'])} | {f(r['top1_agreement'])} | {f(r.get('on_policy_agreement'))} | "
            f"{f(r.get('perplexity_under_full'), '.2f')} |"
        )
    lines += [
        "",
        f"Long answers ({report.get('rep_tokens', '-')} greedy tokens): repetition and drift",
        "",
        "| schedule | rep-3 | rep-3 at full depth | ROUGE-L ids vs full | on-policy agreement "
        "| theoretical speedup over 8 / 16 / 64 / 128 tokens | measured (decode steps only) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        by = r.get("theoretical_speedup_by_length") or {}
        lines.append(
            f"| {r['description']} | {f(r.get('rep3'))} | {f(r.get('rep3_full'))} | "
            f"{f(r.get('rouge_l_ids_vs_full_long'))} | {f(r.get('on_policy_agreement_long'))} | "
            + " / ".join(f"{by[k]:.2f}x" for k in ("8", "16", "64", "128") if k in by)
            + " | "
            + " / ".join(f"{v:.2f}x" for v in (r.get("measured_speedup_by_length") or {}).values())
            + " |"
        )
    split = [r for r in report["results"] if r.get("fact_retention_by_position")]
    if split:
        keys = list(dict.fromkeys(k for r in split for k in r["fact_retention_by_position"]))
        first = split[0]["fact_retention_by_position"]
        lines += [
            "",
            "Fact retention by the number of generated tokens the full model takes to complete its answer",
            "",
            "| schedule | " + " | ".join(f"{k} ({first.get(k, {}).get('questions', 0)})" for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for r in split:
            by = r["fact_retention_by_position"]
            cells = [f"{by[k]['retained']:.1%}" if k in by else "-" for k in keys]
            lines.append(f"| {r['description']} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["theoretical_speedup"] for r in report["results"]]
    ax.plot(xs, [r["rouge_l_vs_full"] for r in report["results"]], "o-", label="ROUGE-L vs full depth")
    ax.plot(xs, [r["top1_agreement"] or 0 for r in report["results"]], "s--", label="top-1 agreement")
    ax.plot(xs, [r.get("fact_retention") or 0 for r in report["results"]], "^:", label="fact retention")
    for r, x in zip(report["results"], xs):
        ax.annotate(r["schedule"], (x, r["rouge_l_vs_full"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("theoretical speedup (FLOPs)")
    ax.set_ylabel("quality")
    ax.set_ylim(0, 1.05)
    ax.set_title(Path(str(report["model"])).name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_speedup.png", dpi=120)
    plt.close(fig)
