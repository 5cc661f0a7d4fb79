"""Serve throughput benchmark: continuous batching on Ray Serve vs the direct engine and vs @serve.batch.

Contract: ``python bench/bench_serve.py [--model default] [--duration 30] [--max-tokens 64 | 8,128]
[--skip-mix [JSON]] [--runs 3] [--max-num-batched-tokens N[,M..]] [--ignore-eos]`` measures

* ``direct``: the static-batch ``Engine.generate`` over 16 prompts in this process (no Ray, no HTTP);
* ``engine only``: the ``Engine`` in this process with 16 requests always in flight (no Ray,
  no HTTP): what continuous batching itself costs, apart from Serve;
* ``continuous``: the skipray Serve app (``skipray.serve.app``) at 1, 4 and 16 concurrent clients;
* ``static``: a Serve deployment that groups requests with ``@serve.batch`` (max 16) and runs each
  group through ``Engine.generate`` to completion (a new request waits for the running batch);
* with ``--skip-mix``: ``engine only`` and ``continuous`` (at the largest client count) again with
  every other request carrying its own skip schedule (the ``skip`` field; JSON flags, default: the
  model's schedule with ``decay_tokens + 1``, a distinct schedule of nearly the same depth, so the
  difference measures how the engine handles two schedules in one batch, not extra layers);
  ``mix_vs_single`` in the output is the mixed run's tokens/s over the single-schedule run's;
* ``--runs N`` repeats every measurement N times and reports the median (all runs are in the JSON);
* ``--max-num-batched-tokens N[,M..]`` turns on chunked prefill with that per-iteration token budget
  (the Serve arg of the same name; ``0``: off): ``engine only`` uses the first value, ``continuous``
  runs once per value, side by side (``0,256``: without and with chunking in one run);
* ``--max-batch N[,M..]``: the continuous deployment's ``max_batch`` (cache rows, so the most requests
  decoding at once, vLLM's ``max_num_seqs``; default 16), one deployment per value and per
  ``--max-num-batched-tokens`` value, side by side: on a CPU every row costs time in every step, so
  fewer rows trade short requests' wait for long requests' speed;
* ``--priority-long``: the continuous runs send the longest class with ``priority: -1`` (vLLM's request
  priority; admitted before the default 0), so with ``--max-batch`` below the client count long
  requests never queue behind short ones;
* ``--ignore-eos``: every request runs to its ``max_tokens`` (vLLM's ``ignore_eos``), so that in
  ``--max-tokens 16,128`` the long class really is long;
* ``--only continuous`` skips the direct engine and the static deployment (quicker A/B runs);

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

PROMPTS = [
    f"Write a short story about a {w} who learns to fly."
    for w in (
        "cat",
        "dog",
        "robot",
        "fish",
        "tree",
        "teacher",
        "river",
        "child",
        "lamp",
        "cloud",
        "horse",
        "baker",
        "clock",
        "stone",
        "king",
        "bird",
    )
]


def direct(model_spec: str, max_tokens: list[int], threads: int, ignore_eos: bool = False) -> dict:
    import torch

    from skipray.core.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.text import encode_prompt

    torch.set_num_threads(threads)
    m = load(model_spec, device="cpu")
    ids = [encode_prompt(m.tokenizer, p, chat=False) for p in PROMPTS]
    eng = Engine(m.model, m.schedule, max_batch=16, max_len=256, eos_token_ids=m.eos_token_ids)
    eng.generate(ids[:2], SamplingParams(max_tokens=4))  # warm-up
    n, calls, t0 = 0, [], time.perf_counter()
    while time.perf_counter() - t0 < 20 or len(calls) < 2:  # whole batches, >= 20 s, like a load level
        t = time.perf_counter()
        params = [
            SamplingParams(max_tokens=max_tokens[k % len(max_tokens)], ignore_eos=ignore_eos) for k in range(len(ids))
        ]
        n += sum(len(o.token_ids) for o in eng.generate(ids, params))
        calls.append(time.perf_counter() - t)
    dt = time.perf_counter() - t0
    return {
        "mode": "direct",
        "clients": 16,
        "tokens": n,
        "seconds": dt,
        "tok_s": n / dt,
        "p50_s": statistics.median(calls),
    }


def engine_only(
    model_spec: str,
    max_tokens: list[int],
    threads: int,
    duration: float = 20.0,
    mix: dict | None = None,
    batched_tokens: int | None = None,
    ignore_eos: bool = False,
) -> dict:
    """``Engine`` without Serve or HTTP: 16 requests always in flight (a finished one is
    replaced at once by the next prompt), as 16 closed-loop clients would keep it; generated tokens/s.
    ``mix``: skip flags of a second schedule that every other request uses."""
    import torch

    from skipray.core.engine import Engine, SamplingParams
    from skipray.loading import load
    from skipray.text import encode_prompt

    torch.set_num_threads(threads)
    m = load(model_spec, device="cpu")
    ids = [encode_prompt(m.tokenizer, p, chat=False) for p in PROMPTS]
    eng = Engine(
        m.model,
        m.schedule,
        max_batch=16,
        max_len=256,
        eos_token_ids=m.eos_token_ids,
        max_num_batched_tokens=batched_tokens,
    )
    schedules = [eng.schedule] if mix is None else [eng.schedule, mix_schedule(m, mix)]
    sent = 0

    def submit() -> None:
        nonlocal sent
        eng.add_request(
            ids[sent % 16],
            SamplingParams(max_tokens=max_tokens[sent % len(max_tokens)], ignore_eos=ignore_eos),
            schedules[sent % len(schedules)],
        )
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
    return {
        "mode": "engine only" + (" (2 schedules)" if mix else ""),
        "clients": 16,
        "requests": done,
        "tokens": tokens,
        "seconds": dt,
        "tok_s": tokens / dt,
        "p50_s": None,
    }


def mix_flags(model_spec: str, given: str) -> dict:
    """The second schedule's skip flags: ``given`` JSON, or ``"auto"``: the model's own schedule with
    ``decay_tokens + 1`` (nearly the same depth; full depth minus one layer when it has none)."""
    if given != "auto":
        return json.loads(given)
    from skipray.loading import load

    m = load(model_spec, device="cpu")
    if m.schedule is None or m.schedule.is_full:
        L = m.model.num_layers
        return {"max_layers": L, "min_layers": L - 1, "decay_tokens": 64}
    return {"decay_tokens": m.schedule.decay_tokens + 1}


def mix_schedule(m, flags: dict):
    import argparse

    from skipray.options import schedule_from_args

    return schedule_from_args(argparse.Namespace(**flags), m.model.num_layers, m.schedule)


def median_of(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's tokens/s alongside."""
    best = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    return dict(best, runs_tok_s=[r["tok_s"] for r in runs])


def static_app(model_spec: str, max_tokens_cap: int, threads: int):
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    class StaticServer:
        def __init__(self) -> None:
            import torch

            from skipray.core.engine import Engine
            from skipray.loading import load

            torch.set_num_threads(threads)
            self.m = load(model_spec, device="cpu")
            self.engine = Engine(
                self.m.model, self.m.schedule, max_batch=16, max_len=256, eos_token_ids=self.m.eos_token_ids
            )

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
        async def run(self, items: list[tuple[list[int], int, bool]]) -> list[dict]:
            from skipray.core.engine import SamplingParams

            outs = self.engine.generate(
                [i for i, _, _ in items], [SamplingParams(max_tokens=n, ignore_eos=e) for _, n, e in items]
            )
            return [{"usage": {"completion_tokens": len(o.token_ids), "avg_layers": o.avg_layers}} for o in outs]

        async def __call__(self, request: Request) -> dict:
            from skipray.text import encode_prompt

            body = await request.json()
            ids = encode_prompt(self.m.tokenizer, body["prompt"])
            return await self.run((ids, min(int(body["max_tokens"]), max_tokens_cap), bool(body.get("ignore_eos"))))

    return StaticServer.bind()


def load_run(
    url: str,
    clients: int,
    duration: float,
    max_tokens: list[int],
    model: str,
    mix: dict | None = None,
    ignore_eos: bool = False,
    priority_long: bool = False,
) -> dict:
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
                if ignore_eos:
                    body["ignore_eos"] = True
                if priority_long and n == max(max_tokens):
                    body["priority"] = -1  # vLLM's request priority: admitted before the default 0
                if mix is not None and (k + i) % 2:
                    body["skip"] = mix
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
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "tokens": sum(toks),
        "seconds": wall,
        "tok_s": sum(toks) / wall,
        "p50_s": statistics.median(lat) if lat else None,
        "p50_by_max_tokens": {n: statistics.median(v) for n, v in sorted(by_len.items())},
    }


def fmt(r: dict) -> str:
    return ", ".join(f"{n}: {v:.2f}s" for n, v in r["p50_by_max_tokens"].items())


def main() -> int:
    from skipray.env import apply, worker_env

    apply()  # as skipray's entry points run (before torch allocates)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per level")
    ap.add_argument(
        "--max-tokens",
        default="64",
        help="max_tokens per request; a comma list (e.g. 8,128) cycles through mixed lengths",
    )
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the direct engine and each replica")
    ap.add_argument(
        "--skip-mix",
        nargs="?",
        const="auto",
        default=None,
        metavar="JSON",
        help="also run with every other request on a second skip schedule (JSON skip flags; "
        "without a value: the model's schedule with decay_tokens + 1)",
    )
    ap.add_argument("--runs", type=int, default=1, help="repeat each measurement and report the median")
    ap.add_argument(
        "--ignore-eos",
        action="store_true",
        help="requests run to their max_tokens (vLLM's ignore_eos), so a length class means its length",
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        default=None,
        metavar="N[,M]",
        help="chunked prefill in the continuous engine: tokens per iteration (>= 16); default: off",
    )
    ap.add_argument(
        "--max-batch",
        default="16",
        metavar="N[,M]",
        help="the continuous deployment's max_batch (rows decoding at once); a comma list sweeps it",
    )
    ap.add_argument(
        "--priority-long",
        action="store_true",
        help="continuous runs: the longest max_tokens class is sent with priority -1 (admitted first)",
    )
    ap.add_argument(
        "--only",
        choices=["all", "continuous"],
        default="all",
        help="'continuous': skip the direct engine and the static @serve.batch deployment",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    max_tokens = [int(x) for x in args.max_tokens.split(",")]
    mix = mix_flags(args.model, args.skip_mix) if args.skip_mix is not None else None
    repeat = lambda fn: median_of([fn() for _ in range(args.runs)])  # noqa: E731

    chunks = [None if x in ("0", "none") else int(x) for x in (args.max_num_batched_tokens or "0").split(",")]
    chunk, eos = chunks[0], args.ignore_eos
    batches = [int(x) for x in args.max_batch.split(",")]
    rows = []
    if args.only == "all":
        rows.append(repeat(lambda: direct(args.model, max_tokens, threads=args.threads, ignore_eos=eos)))
        print(f"direct engine, batch 16: {rows[0]['tok_s']:.1f} tok/s", flush=True)
    rows.append(
        repeat(lambda: engine_only(args.model, max_tokens, threads=args.threads, batched_tokens=chunk, ignore_eos=eos))
    )
    print(f"continuous engine without Serve, 16 in flight: {rows[-1]['tok_s']:.1f} tok/s", flush=True)
    if mix is not None:
        rows.append(
            repeat(
                lambda: engine_only(
                    args.model, max_tokens, threads=args.threads, mix=mix, batched_tokens=chunk, ignore_eos=eos
                )
            )
        )
        rows[-1]["mix_vs_single"] = rows[-1]["tok_s"] / rows[-2]["tok_s"]
        print(
            f"continuous engine without Serve, 2 schedules ({mix}): {rows[-1]['tok_s']:.1f} tok/s "
            f"({rows[-1]['mix_vs_single']:.2f}x the single schedule)",
            flush=True,
        )

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from skipray.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        num_cpus=2,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env()},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for chunk, rows_cap in [(c, b) for c in chunks for b in batches]:  # one deployment each, side by side
            app_args = {
                "model": args.model,
                "model_name": "m",
                "max_batch": rows_cap,
                "max_len": 256,
                "max_waiting": 64,
                "torch_threads": args.threads,
                "max_num_batched_tokens": chunk,
            }
            serve.run(
                build_app(app_args, {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64}),
                name="continuous",
                route_prefix="/c",
            )
            mode = "continuous" if chunk is None else f"continuous, chunked {chunk}"
            mode += ("" if rows_cap == 16 else f", max_batch {rows_cap}") + (
                ", long first" if args.priority_long else ""
            )
            for n in levels:
                r = repeat(
                    lambda n=n: load_run(
                        f"{base}/c/v1/completions",
                        n,
                        args.duration,
                        max_tokens,
                        "m",
                        ignore_eos=eos,
                        priority_long=args.priority_long,
                    )
                )
                rows.append(dict(r, mode=mode, max_num_batched_tokens=chunk, max_batch=rows_cap))
                print(
                    f"{mode}, {n:2d} clients: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f}s, "
                    f"p50 by max_tokens {fmt(r)}",
                    flush=True,
                )
            if mix is not None:
                single = rows[-1]
                r = repeat(
                    lambda: load_run(
                        f"{base}/c/v1/completions", levels[-1], args.duration, max_tokens, "m", mix, ignore_eos=eos
                    )
                )
                rows.append(dict(r, mode=f"{mode} (2 schedules)", mix_vs_single=r["tok_s"] / single["tok_s"]))
                print(
                    f"{mode}, {levels[-1]:2d} clients, 2 schedules: {r['tok_s']:.1f} tok/s "
                    f"({rows[-1]['mix_vs_single']:.2f}x the single schedule), p50 {r['p50_s']:.2f}s",
                    flush=True,
                )
            serve.delete("continuous")
        if args.only == "all":
            serve.run(static_app(args.model, 256, args.threads), name="static", route_prefix="/s")
        for n in levels if args.only == "all" else []:
            r = repeat(lambda n=n: load_run(f"{base}/s", n, args.duration, max_tokens, "m", ignore_eos=eos))
            rows.append(dict(r, mode="static"))
            print(
                f"static,     {n:2d} clients: {r['tok_s']:.1f} tok/s, p50 {r['p50_s']:.2f}s, "
                f"p50 by max_tokens {fmt(r)}",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()

    d = rows[0]["tok_s"]  # the direct engine's (the continuous engine's own with --only continuous)
    print(f"\n{'mode':<40}{'clients':>8}{'tok/s':>9}{'vs direct':>11}{'p50 s':>8}{'errors':>8}  p50 by max_tokens")
    for r in rows:
        print(
            f"{r['mode']:<40}{r['clients']:>8}{r['tok_s']:>9.1f}{r['tok_s'] / d:>10.2f}x"
            f"{(r['p50_s'] or 0):>8.2f}{r.get('errors', 0):>8}  {fmt(r) if r.get('p50_by_max_tokens') else ''}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "max_tokens": max_tokens,
                "duration_s": args.duration,
                "threads": args.threads,
                "runs": args.runs,
                "skip_mix": mix,
                "max_num_batched_tokens": chunks,
                "max_batch": batches,
                "priority_long": args.priority_long,
                "ignore_eos": eos,
                "only": args.only,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
