"""guidellm (the vLLM project's benchmark client) against ``skipray serve``: a short concurrent run, zero errors.

Contract: ``python bench/bench_guidellm.py [--guidellm PATH] [--model default] [--streams 8]
[--prompt-tokens 64] [--output-tokens 32] [--max-requests 64] [--max-seconds 60]
[--request-format /v1/chat/completions] [--out bench/results/guidellm.json]``

1. saves the model's tokenizer (``skipray.loading.resolve`` + ``save_pretrained``) to a temporary directory:
   guidellm needs a local tokenizer to make synthetic prompts of a given token length, and no hub is asked;
2. starts ``skipray serve --host 127.0.0.1 --port <free port> --model M`` (the packaged Serve config, one
   replica of 16 rows; autoscaling stays at one replica below 12 requests per replica) in its own process
   group and waits for ``GET /health`` to answer 200;
3. runs ``guidellm run`` (guidellm 0.8.x's CLI) with the ``openai_http`` backend and guidellm's default
   request shape: streaming chat completions with ``stream_options: {include_usage, continuous_usage_stats}``,
   ``max_completion_tokens`` and ``ignore_eos: true``; a ``concurrent`` profile of ``--streams`` streams,
   ``synthetic_text`` data, and stops at ``--max-requests`` requests or ``--max-seconds`` seconds,
   whichever comes first; guidellm writes its JSON report to the temporary directory;
4. reads the report with ``parse_report`` (requests completed / errored / incomplete, output tokens/s, TTFT
   and ITL medians, concurrency), waits (at most 20 s) until the server's log holds an access line for each
   request, stops the server (SIGTERM; what Ray leaves of its process group is then ended), counts the HTTP
   statuses the server logged, prints a table and writes ``--out``. Exit status 1 when guidellm failed or
   any request errored or was left incomplete; 2 when no guidellm executable is found.

guidellm runs from its OWN virtual environment, so that its dependencies never move the project's pins
(guidellm 0.8.1 needs torch, transformers and datasets of its own). Install it next to the project, a CPU
torch first (an unpinned torch from PyPI pulls a multi-GB CUDA build; PyTorch's CPU index has the CPU one,
and on the project's build machines ``pip install torch==2.13.0`` finds a local CPU wheel)::

    python -m venv ../guidellm-venv
    ../guidellm-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    ../guidellm-venv/bin/pip install guidellm==0.8.1

and pass ``--guidellm ../guidellm-venv/bin/guidellm`` (default: ``guidellm`` on PATH). The server and
the tokenizer export run with this interpreter (the project's); guidellm gets ``HF_HUB_OFFLINE=1`` and
no ``PYTHONPATH``. Everything stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ACCESS_LINE = re.compile(r"\b(GET|POST) (/\S*) (\d{3}) ")  # a Serve replica's access log line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tokenizer(model: str, out_dir: Path) -> Path:
    """The tokenizer of skipray model spec ``model`` (``default``: SmolLM2-135M from its local GGUF) saved as
    a Hugging Face tokenizer directory that guidellm's ``huggingface_auto`` tokenizer loads offline."""
    os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
    from transformers import AutoTokenizer

    from skipray.loading import resolve

    base, _ = resolve(model)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    return out_dir


def guidellm_command(
    exe: str,
    target: str,
    model_name: str,
    tokenizer: Path,
    report: Path,
    streams: int,
    prompt_tokens: int,
    output_tokens: int,
    max_requests: int,
    max_seconds: float,
    request_format: str = "/v1/chat/completions",
) -> list[str]:
    """``guidellm run`` (0.8.x) arguments: one concurrent benchmark, synthetic prompts, a JSON report."""
    return [
        exe,
        "run",
        "--backend",
        f"kind=openai_http,target={target},model={model_name},request_format={request_format}",
        "--profile",
        f"kind=concurrent,streams={streams}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--constraint",
        f"kind=max_requests,count={max_requests}",
        "--constraint",
        f"kind=max_duration,seconds={max_seconds:g}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]


def _stat(metrics: dict, name: str, status: str, kind: str) -> float | None:
    return ((metrics.get(name) or {}).get(status) or {}).get(kind)


def parse_report(report: dict) -> list[dict]:
    """One row per benchmark of a guidellm 0.8.x JSON report (``benchmarks[].metrics``): request counts,
    throughput over all requests (``total``, as guidellm's console table shows it) and latency over the
    completed ones (``successful``)."""
    rows = []
    for b in report["benchmarks"]:
        m = b["metrics"]
        totals = m["request_totals"]
        strategy = b["config"]["strategy"]
        rows.append(
            {
                "strategy": strategy.get("type_"),
                "streams": strategy.get("streams"),
                "duration_s": b.get("duration"),
                "requests_completed": totals["successful"],
                "requests_errored": totals["errored"],
                "requests_incomplete": totals["incomplete"],
                "requests_total": totals["total"],
                "prompt_tokens_median": _stat(m, "prompt_token_count", "successful", "median"),
                "output_tokens_median": _stat(m, "output_token_count", "successful", "median"),
                "output_tokens_completed": _stat(m, "output_token_count", "successful", "total_sum"),
                "output_tok_s": _stat(m, "output_tokens_per_second", "total", "mean"),
                "requests_s": _stat(m, "requests_per_second", "total", "mean"),
                "concurrency_median": _stat(m, "request_concurrency", "total", "median"),
                "concurrency_mean": _stat(m, "request_concurrency", "total", "mean"),
                "ttft_ms_median": _stat(m, "time_to_first_token_ms", "successful", "median"),
                "ttft_ms_p95": ((_stat(m, "time_to_first_token_ms", "successful", "percentiles")) or {}).get("p95"),
                "itl_ms_median": _stat(m, "inter_token_latency_ms", "successful", "median"),
                "tpot_ms_median": _stat(m, "time_per_output_token_ms", "successful", "median"),
                "latency_s_median": _stat(m, "request_latency", "successful", "median"),
            }
        )
    return rows


def server_statuses(log: str) -> dict[str, int]:
    """``"POST /v1/chat/completions 200": n`` counts from the replica access lines in a server log."""
    return dict(sorted(Counter(" ".join(x) for x in ACCESS_LINE.findall(log)).items()))


def start_server(model: str, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: env.get(k, v) for k, v in OFFLINE.items()})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "skipray.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--model", model]
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``GET /health`` answered 200; ``RuntimeError`` when the server exits or time runs out."""
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"skipray serve exited with {proc.returncode} before it was ready")
        try:
            if requests.get(f"{base}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(2)
    raise RuntimeError(f"skipray serve was not ready after {timeout:.0f} s")


def wait_for_log(log_path: Path, requests: int, timeout: float = 20.0) -> None:
    """Until the server log holds ``requests`` POST access lines (or ``timeout`` seconds)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        lines = server_statuses(log_path.read_text(errors="replace"))
        if sum(n for k, n in lines.items() if k.startswith("POST ")) >= requests:
            return
        time.sleep(1)


def stop_server(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM (``skipray serve`` shuts Serve and Ray down), then end what is left of its process group
    (Ray's agents can outlive the driver)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group start_new_session made: only this server's processes
        except ProcessLookupError:
            return
        time.sleep(3)


def guidellm_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120, env=guidellm_env())
    return (out.stdout or out.stderr).strip().split()[-1] if out.returncode == 0 else "unknown"


def guidellm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **OFFLINE}


def fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guidellm", default="guidellm", help="guidellm executable, from its own venv (default: PATH)")
    ap.add_argument("--model", default="default", help="skipray model spec for the server and the tokenizer")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams (guidellm's concurrent profile)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="synthetic prompt length in tokens")
    ap.add_argument("--output-tokens", type=int, default=32, help="tokens per answer (guidellm sends ignore_eos)")
    ap.add_argument("--max-requests", type=int, default=64, help="stop after this many requests")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="... or after this many seconds")
    ap.add_argument(
        "--request-format",
        default="/v1/chat/completions",
        choices=["/v1/chat/completions", "/v1/completions"],
        help="guidellm's request_format (default: its own default, chat)",
    )
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    ap.add_argument("--report", default=None, help="also copy guidellm's own JSON report here")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "guidellm.json"))
    a = ap.parse_args()

    exe = shutil.which(a.guidellm) or a.guidellm
    if not Path(exe).exists():
        print(f"guidellm not found ({a.guidellm}); install it in its own venv (see this script's docstring)")
        return 2
    version = guidellm_version(exe)
    with tempfile.TemporaryDirectory(prefix="skipray-guidellm-") as tmp:
        tmp = Path(tmp)
        tokenizer = save_tokenizer(a.model, tmp / "tokenizer")
        port, log_path, report_path = free_port(), tmp / "serve.log", tmp / "report.json"
        base = f"http://127.0.0.1:{port}"
        cmd = guidellm_command(
            exe,
            base,
            "skipray",
            tokenizer,
            report_path,
            a.streams,
            a.prompt_tokens,
            a.output_tokens,
            a.max_requests,
            a.max_seconds,
            a.request_format,
        )
        proc = start_server(a.model, port, log_path)
        try:
            ready_s = wait_ready(base, proc, a.startup_timeout)
            print(f"skipray serve ready on {base} after {ready_s:.0f} s; guidellm {version}:", flush=True)
            print(" ".join(cmd), flush=True)
            t0 = time.monotonic()
            run = subprocess.run(
                cmd, cwd=tmp, env=guidellm_env(), capture_output=True, text=True, timeout=a.max_seconds + 300
            )
            wall = time.monotonic() - t0
            report = json.loads(report_path.read_text()) if run.returncode == 0 and report_path.exists() else None
            if report is not None:  # Ray forwards the replica's access lines a moment late: wait for them all
                wait_for_log(log_path, sum(r["requests_total"] for r in parse_report(report)))
        finally:
            stop_server(proc)
        log = log_path.read_text(errors="replace")
        if report is None:
            print(run.stdout[-4000:], run.stderr[-4000:], log[-2000:], sep="\n")
            print(f"guidellm failed (exit {run.returncode})")
            return 1
        if a.report:
            shutil.copy(report_path, a.report)
    rows = parse_report(report)
    statuses = server_statuses(log)

    print(
        f"\n{'benchmark':<14}{'ok':>5}{'err':>5}{'inc':>5}{'out tok/s':>11}{'req/s':>7}"
        f"{'TTFT p50 ms':>13}{'ITL p50 ms':>12}{'concurrency':>13}"
    )
    for r in rows:
        print(
            f"{r['strategy']}@{r['streams']:<3}{r['requests_completed']:>5}{r['requests_errored']:>5}"
            f"{r['requests_incomplete']:>5}{fmt(r['output_tok_s']):>11}{fmt(r['requests_s'], '.2f'):>7}"
            f"{fmt(r['ttft_ms_median']):>13}{fmt(r['itl_ms_median']):>12}{fmt(r['concurrency_median']):>13}"
        )
    print(f"server HTTP statuses: {statuses}")
    errors = sum(r["requests_errored"] + r["requests_incomplete"] for r in rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = [Path(c).name if i == 0 else c for i, c in enumerate(cmd)]  # the executable without its venv path
    out.write_text(
        json.dumps(
            {
                "guidellm_version": version,
                "model": a.model,
                "request_format": a.request_format,
                "streams": a.streams,
                "prompt_tokens": a.prompt_tokens,
                "output_tokens": a.output_tokens,
                "max_requests": a.max_requests,
                "max_seconds": a.max_seconds,
                "guidellm_command": " ".join(shown).replace(str(tmp), "$TMP"),
                "guidellm_wall_s": wall,
                "server_ready_s": ready_s,
                "server_statuses": statuses,
                "rows": rows,
                "zero_errors": errors == 0,
                "date": time.strftime("%Y-%m-%d"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
