"""Serve throughput benchmark: continuous batching on Ray Serve vs the direct engine and vs @serve.batch.

Contract: ``python bench/bench_serve.py [--model default] [--duration 30] [--max-tokens 64 | 8,128]`` measures

* ``direct``: the static-batch ``Engine.generate`` over 16 prompts in this process (no Ray, no HTTP);
* ``engine only``: the ``ContinuousEngine`` in this process with 16 requests always in flight (no Ray,
  no HTTP): what continuous batching itself costs, apart from Serve;
* ``continuous``: the skipray Serve app (``skipray.serve.app``) at 1, 4 and 16 concurrent clients;
* ``static``: a Serve deployment that groups requests with ``@serve.batch`` (max 16) and runs each
  group through ``Engine.generate`` to completion (a new request waits for the running batch);

prints a table of generated tokens/s and p50 latency, and writes ``bench/results/serve.json``. Clients
are HTTP (``requests``), non-streaming, on loopback; Ray runs locally with 2 CPUs. The direct engine and
every replica use the same ``--threads`` torch threads (default 1: on this 2-core box the clients, the
HTTP proxy and the replica share the cores, and oversubscribed OpenMP threads slow torch down by 5-20x).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

PROMPTS = [f"Write a short story about a {w} who learns to fly." for w in
           ("cat", "dog", "robot", "fish", "tree", "teacher", "river", "child",
            "lamp", "cloud", "horse", "baker", "clock", "stone", "king", "bird")]


def direct(model_spec: str, max_tokens: list[int], threads: int) -> dict:
    import torch

    from skipray.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.text import encode_prompt

    torch.set_num_threads(threads)
    m = load(model_spec, device="cpu")
    ids = [encode_prompt(m.tokenizer, p, chat=False) for p in PROMPTS]
    eng = Engine(m.model, m.schedule, max_batch=16, max_len=256, eos_token_ids=m.eos_token_ids)
    eng.generate(ids[:2], SamplingParams(max_new_tokens=4))  # warm-up
    n, calls, t0 = 0, [], time.perf_counter()
    while time.perf_counter() - t0 < 20 or len(calls) < 2:  # whole batches, >= 20 s, like a load level
        t = time.perf_counter()
        params = [SamplingParams(max_new_tokens=max_tokens[k % len(max_tokens)]) for k in range(len(ids))]
        n += sum(len(o.token_ids) for o in eng.generate(ids, params))
        calls.append(time.perf_counter() - t)
    dt = time.perf_counter() - t0
    return {"mode": "direct", "clients": 16, "tokens": n, "seconds": dt, "tok_s": n / dt,
            "p50_s": statistics.median(calls)}


def engine_only(model_spec: str, max_tokens: list[int], threads: int, duration: float = 20.0) -> dict:
    """``ContinuousEngine`` without Serve or HTTP: 16 requests always in flight (a finished one is
    replaced at once by the next prompt), as 16 closed-loop clients would keep it; generated tokens/s."""
    import torch

    from skipray.engine import SamplingParams
    from skipray.loading import load
    from skipray.scheduler import ContinuousEngine
    from skipray.text import encode_prompt

    torch.set_num_threads(threads)
    m = load(model_spec, device="cpu")
    ids = [encode_prompt(m.tokenizer, p, chat=False) for p in PROMPTS]
    eng = ContinuousEngine(m.model, m.schedule, max_batch=16, max_len=256, eos_token_ids=m.eos_token_ids)
    sent = 0

    def submit() -> None:
        nonlocal sent
        eng.add_request(ids[sent % 16], SamplingParams(max_new_tokens=max_tokens[sent % len(max_tokens)]))
        sent += 1

    for _ in range(16):
        submit()
    tokens, done, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        for ev in eng.step():
            tokens += ev.token_id is not None
            if ev.finish_reason is not None:
                done += 1
                submit()
    dt = time.perf_counter() - t0
    return {"mode": "engine only", "clients": 16, "requests": done, "tokens": tokens, "seconds": dt,
            "tok_s": tokens / dt, "p50_s": None}


def static_app(model_spec: str, max_tokens_cap: int, threads: int):
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    class StaticServer:
        def __init__(self) -> None:
            import torch

            from skipray.engine import Engine
            from skipray.loading import load

            torch.set_num_threads(threads)
            self.m = load(model_spec, device="cpu")
            self.engine = Engine(self.m.model, self.m.schedule, max_batch=16, max_len=256,
                                 eos_token_ids=self.m.eos_token_ids)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
        async def run(self, items: list[tuple[list[int], int]]) -> list[dict]:
            from skipray.engine import SamplingParams

            outs = self.engine.generate([i for i, _ in items], [SamplingParams(max_new_tokens=n) for _, n in items])
            return [{"usage": {"completion_tokens": len(o.token_ids), "avg_layers": o.avg_layers}} for o in outs]

        async def __call__(self, request: Request) -> dict:
            from skipray.text import encode_prompt

            body = await request.json()
            ids = encode_prompt(self.m.tokenizer, body["prompt"])
            return await self.run((ids, min(int(body["max_tokens"]), max_tokens_cap)))

    return StaticServer.bind()


def load_run(url: str, clients: int, duration: float, max_tokens: list[int], model: str) -> dict:
    import requests

    lat, toks, errors, by_len = [], [], [], {}
    lock = threading.Lock()
    stop_at = time.time() + duration

    def worker(k: int) -> None:
        with requests.Session() as s:
            i = 0
            while time.time() < stop_at:
                n = max_tokens[(k + i) % len(max_tokens)]
                body = {"model": model, "prompt": PROMPTS[(k + i) % 16], "temperature": 0, "max_tokens": n}
                t0 = time.perf_counter()
                r = s.post(url, json=body, timeout=600)
                with lock:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                    else:
                        lat.append(time.perf_counter() - t0)
                        by_len.setdefault(n, []).append(lat[-1])
                        toks.append(r.json()["usage"]["completion_tokens"])
                i += 1

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "tokens": sum(toks),
            "seconds": wall, "tok_s": sum(toks) / wall, "p50_s": statistics.median(lat) if lat else None,
            "p50_by_max_tokens": {n: statistics.median(v) for n, v in sorted(by_len.items())}}


def fmt(r: dict) -> str:
    return ", ".join(f"{n}: {v:.2f}s" for n, v in r["p50_by_max_tokens"].items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per level")
    ap.add_argument("--max-tokens", default="64",
                    help="max_tokens per request; a comma list (e.g. 8,128) cycles through mixed lengths")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the direct engine and each replica")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    max_tokens = [int(x) for x in args.max_tokens.split(",")]

    rows = [direct(args.model, max_tokens, threads=args.threads)]
    print(f"direct engine, batch 16: {rows[0]['tok_s']:.1f} tok/s", flush=True)
    rows.append(engine_only(args.model, max_tokens, threads=args.threads))
    print(f"continuous engine without Serve, 16 in flight: {rows[1]['tok_s']:.1f} tok/s", flush=True)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from skipray.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        app_args = {"model": args.model, "model_name": "m", "max_batch": 16, "max_len": 256, "max_waiting": 64,
                    "torch_threads": args.threads}
        serve.run(build_app(app_args, {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64}),
                  name="continuous", route_prefix="/c")
        for n in levels:
            r = load_run(f"{base}/c/v1/completions", n, args.duration, max_tokens, "m")
            rows.append(dict(r, mode="continuous"))
            print(f"continuous, {n:2d} clients: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f}s, "
                  f"p50 by max_tokens {fmt(r)}", flush=True)
        serve.delete("continuous")
        serve.run(static_app(args.model, 256, args.threads), name="static", route_prefix="/s")
        for n in levels:
            r = load_run(f"{base}/s", n, args.duration, max_tokens, "m")
            rows.append(dict(r, mode="static"))
            print(f"static,     {n:2d} clients: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f}s, "
                  f"p50 by max_tokens {fmt(r)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    d = rows[0]["tok_s"]
    print(f"\n{'mode':<11}{'clients':>8}{'tok/s':>9}{'vs direct':>11}{'p50 s':>8}{'errors':>8}")
    for r in rows:
        print(f"{r['mode']:<11}{r['clients']:>8}{r['tok_s']:>9.1f}{r['tok_s'] / d:>10.2f}x"
              f"{(r['p50_s'] or 0):>8.2f}{r.get('errors', 0):>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "max_tokens": max_tokens, "duration_s": args.duration,
                               "threads": args.threads,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
