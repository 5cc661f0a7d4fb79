"""Latency of ``/health`` while a burst of chat requests hits the Serve app.

Contract: ``python bench/bench_health.py [--model default] [--burst 100] [--max-tokens 64] [--threads 1]``
starts a local Ray (2 CPUs) and the skipray Serve app (``skipray.serve.app``, the packaged config's
defaults: 16 cache rows, 16 waiting), polls ``GET /health`` every 50 ms from its own thread, first for 3 s
with no load, then while ``--burst`` concurrent chat requests (``max_tokens`` each, temperature 0) are
sent at once and answered (generated, or shed with a 503 error object), and prints the latency
percentiles of ``/health`` in both phases and the burst's status codes; writes
``bench/results/health_burst.json``. Loopback only; every request loop is bounded by the burst size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def poll(url: str, stop: threading.Event, out: list) -> None:
    import requests

    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            code = requests.get(url, timeout=30).status_code
        except requests.RequestException:
            code = 0
        out.append((time.perf_counter() - t0, code))
        time.sleep(0.05)


def stats(samples: list) -> dict:
    lat = sorted(t for t, _ in samples)
    if not lat:
        return {"n": 0}
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    return {
        "n": len(lat),
        "p50_ms": 1e3 * statistics.median(lat),
        "p95_ms": 1e3 * pick(0.95),
        "max_ms": 1e3 * lat[-1],
        "codes": sorted({c for _, c in samples}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "health_burst.json"))
    a = ap.parse_args()
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import requests
    from ray import serve

    from skipray.env import worker_env
    from skipray.serve.app import build_app
    from skipray.serve.cli import load_config

    ray.init(
        num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, runtime_env={"env_vars": worker_env()}
    )
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = dict(load_config(None)["applications"][0]["args"], model=a.model, torch_threads=a.threads)
    serve.run(build_app(app_args, {"ray_actor_options": {"num_cpus": 1}}), name="skipray", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        quiet, busy, stop = [], [], threading.Event()
        t = threading.Thread(target=poll, args=(f"{base}/health", stop, quiet))
        t.start()
        time.sleep(3)
        stop.set()
        t.join()
        stop = threading.Event()
        t = threading.Thread(target=poll, args=(f"{base}/health", stop, busy))
        body = {
            "model": app_args.get("model_name", "skipray"),
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about the history of bridges."}],
        }

        def chat(_):
            try:
                return requests.post(f"{base}/v1/chat/completions", json=body, timeout=600).status_code
            except requests.RequestException:
                return 0

        t0 = time.perf_counter()
        t.start()
        with ThreadPoolExecutor(a.burst) as pool:
            codes = list(pool.map(chat, range(a.burst)))
        burst_s = time.perf_counter() - t0
        stop.set()
        t.join()
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "model": a.model,
        "burst": a.burst,
        "max_tokens": a.max_tokens,
        "threads": a.threads,
        "burst_seconds": burst_s,
        "status_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
        "health_quiet": stats(quiet),
        "health_during_burst": stats(busy),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs",
    }
    print(f"{'phase':<18}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}  codes")
    for name in ("health_quiet", "health_during_burst"):
        s = result[name]
        print(
            f"{name:<18}{s['n']:>6}{s.get('p50_ms', 0):>10.1f}{s.get('p95_ms', 0):>10.1f}{s.get('max_ms', 0):>10.1f}"
            f"  {s.get('codes')}"
        )
    print(f"burst of {a.burst} chat requests: {result['status_codes']} in {burst_s:.1f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
