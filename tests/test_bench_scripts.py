"""The benchmark scripts stay runnable: each imports and parses its own ``--help`` (none is run here;
they time the real model for minutes; see README "Benchmarks"), the shipped adapters record how
they were made in a form that runs from the project root, and bench_guidellm.py reads guidellm's report
(on a fixture: CI does not install guidellm)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_bench_script_help(script):
    if script == "bench_linear.py":  # no flags: import it and check its entry point instead
        code = (
            f"import sys; sys.path.insert(0, {str(BENCH)!r}); import bench_linear; assert callable(bench_linear.main)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        return
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


@pytest.mark.parametrize("package", ["smollm2-skip", "smollm2-skip-2x", "smollm2-skip-fast"])
def test_shipped_adapters_record_commands_relative_to_the_project(package):
    import json
    import shlex

    meta = json.loads((BENCH.parent / "skipray" / "assets" / package / "skipray.json").read_text())
    args = shlex.split(meta["command"])
    assert args[:2] == ["skipray", "train"], meta["command"]
    assert not [a for a in args if a.startswith("/")], meta["command"]
    assert meta["made_by"] == "scripts/train_default.sh"


def test_package_adapter_makes_commands_project_relative(tmp_path):
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    try:
        from package_adapter import project_command
    finally:
        sys.path.pop(0)
    cmd = "/opt/x/.venv/bin/skipray train --data /elsewhere/runs/data/self128 --out /proj/runs/a --lr 2e-4"
    assert project_command(cmd, Path("/proj")) == "skipray train --data runs/data/self128 --out runs/a --lr 2e-4"


def _stats(median: float, mean: float | None = None, total_sum: float | None = None, p95: float | None = None) -> dict:
    return {
        "median": median,
        "mean": median if mean is None else mean,
        "total_sum": total_sum,
        "percentiles": {"p95": p95},
    }


def test_bench_guidellm_reads_a_guidellm_report_and_builds_its_command(tmp_path):
    """bench/bench_guidellm.py without guidellm (CI does not install it): its report parser on a guidellm
    0.8.1 report cut down to the fields it reads, the server-log status count and the ``guidellm run`` args."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_guidellm as g
    finally:
        sys.path.pop(0)
    m = {
        "request_totals": {"successful": 63, "errored": 1, "incomplete": 0, "total": 64},
        "prompt_token_count": {"successful": _stats(94.0)},
        "output_token_count": {"successful": _stats(32.0, total_sum=2016.0)},
        "output_tokens_per_second": {"successful": _stats(30.0, 35.9), "total": _stats(30.0, 36.4)},
        "requests_per_second": {"total": _stats(0.2, 1.12)},
        "request_concurrency": {"total": _stats(8.0, 7.97)},
        "time_to_first_token_ms": {"successful": _stats(3374.1, p95=4511.6)},
        "inter_token_latency_ms": {"successful": _stats(107.2)},
        "time_per_output_token_ms": {"successful": _stats(204.8)},
        "request_latency": {"successful": _stats(6.55)},
        "image": {"tokens": {"input": None}},  # fields it does not read are ignored
    }
    report = {
        "metadata": {"guidellm_version": "0.8.1"},
        "benchmarks": [{"config": {"strategy": {"type_": "concurrent", "streams": 8}}, "duration": 56.2, "metrics": m}],
    }
    (row,) = g.parse_report(report)
    assert (row["strategy"], row["streams"], row["duration_s"]) == ("concurrent", 8, 56.2)
    assert (row["requests_completed"], row["requests_errored"], row["requests_total"]) == (63, 1, 64)
    assert row["output_tok_s"] == 36.4  # over all requests, the mean (guidellm's console figure)
    assert (row["ttft_ms_median"], row["ttft_ms_p95"], row["itl_ms_median"]) == (3374.1, 4511.6, 107.2)
    assert (row["concurrency_median"], row["output_tokens_completed"], row["latency_s_median"]) == (8.0, 2016.0, 6.55)
    del m["time_per_output_token_ms"]  # a metric the server could not give (no streaming): None, not a KeyError
    assert g.parse_report(report)[0]["tpot_ms_median"] is None

    log = (
        "(ServeReplica:skipray:SkipServer pid=9) INFO 2026-12-07 12:06:01,844 skipray_SkipServer a b -- "
        "POST /v1/chat/completions 200 2776.0ms\n"
        "(ServeReplica:skipray:SkipServer pid=9) INFO ... -- POST /v1/chat/completions 200 12.0ms\n"
        "(ServeReplica:skipray:SkipServer pid=9) INFO ... -- POST /v1/chat/completions 400 2.0ms\n"
        "(ServeReplica:skipray:SkipServer pid=9) INFO ... -- GET /health 200 1.0ms\n"
    )
    assert g.server_statuses(log) == {
        "GET /health 200": 1,
        "POST /v1/chat/completions 200": 2,
        "POST /v1/chat/completions 400": 1,
    }

    cmd = g.guidellm_command(
        "gl", "http://127.0.0.1:9", "skipray", tmp_path / "tok", tmp_path / "r.json", 8, 64, 32, 64, 60
    )
    assert cmd[:2] == ["gl", "run"]
    args = dict(zip(cmd[2::2], cmd[3::2]))  # flag -> value; --constraint appears twice
    assert args["--backend"] == (
        "kind=openai_http,target=http://127.0.0.1:9,model=skipray,request_format=/v1/chat/completions"
    )
    assert args["--profile"] == "kind=concurrent,streams=8"
    assert args["--data"] == "kind=synthetic_text,prompt_tokens=64,output_tokens=32"
    assert args["--tokenizer"] == f"kind=huggingface_auto,model={tmp_path / 'tok'}"
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--constraint"] == [
        "kind=max_requests,count=64",
        "kind=max_duration,seconds=60",
    ]
    assert args["--output"] == f"kind=json,path={tmp_path / 'r.json'}"
