"""The batch job on the Serve app's own replicas: Ray Data LLM's ``ServeDeploymentProcessorConfig`` with
skipray's request models against the running skipray app (handle methods ``completions`` / ``chat``),
and online requests keeping priority while the batch runs (latency on loopback; it needs spare cores).
Local Ray (conftest).

Run under the shared lock:
``flock /tmp/skipray-ray.lock .venv/bin/python -m pytest -q tests/serve/test_serve_batch.py``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
from test_serve import SKIP, free_port, make_tiny_dir

pytestmark = pytest.mark.ray

APP = "shared"
ARGS = {
    "model_name": "tiny",
    "schedule": SKIP,
    "max_batch": 16,
    "max_len": 256,
    "max_waiting": 16,
    "max_tokens_limit": 200,
    "default_max_tokens": 32,
    "max_offline_rows": 4,
}
MIN_CORES = 8  # the latency test measures priority, not a CPU fight: see its skip reason
OPTIONS = {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 48, "max_queued_requests": 64}


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    import sys

    import ray.cloudpickle
    from ray import serve

    from skipray.serve.app import build_app

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # completion_row runs in Ray Data's tasks
    tiny = make_tiny_dir(tmp_path_factory.mktemp("tiny"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(dict(ARGS, model=str(tiny)), OPTIONS), name=APP, route_prefix="/shared")
    yield {"base": f"http://127.0.0.1:{port}/shared"}
    serve.shutdown()


def processor(batch_size: int = 4, **kw):
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    from skipray.serve.protocol import ChatRequest, CompletionRequest

    config = ServeDeploymentProcessorConfig(
        deployment_name="SkipServer",
        app_name=APP,
        batch_size=batch_size,
        concurrency=1,
        dtype_mapping={"CompletionRequest": CompletionRequest, "ChatRequest": ChatRequest},
        should_continue_on_error=True,
    )
    return build_processor(
        config, preprocess_map_kwargs={"num_cpus": 0.1}, postprocess_map_kwargs={"num_cpus": 0.1}, **kw
    )


def completion_row(row: dict) -> dict:
    if row["kind"] == "chat":
        return {
            "method": "chat",
            "dtype": "ChatRequest",
            "request_kwargs": {
                "model": "tiny",
                "messages": [{"role": "user", "content": row["text"]}],
                "max_tokens": row["max_tokens"],
                "temperature": 0.0,
            },
        }
    return {
        "method": "completions",
        "dtype": "CompletionRequest",
        "request_kwargs": {"model": "tiny", "prompt": row["text"], "max_tokens": row["max_tokens"], "temperature": 0.0},
    }


def test_batch_job_on_the_serve_replicas(app):
    import ray

    rows = [
        {
            "n": i,
            "kind": "chat" if i % 2 else "text",
            "text": f"Tell me about owl number {i}.",
            "max_tokens": 0 if i == 5 else 3 + i % 3,
        }
        for i in range(8)
    ]
    p = processor(preprocess=completion_row)
    out = {r["n"]: r for r in p(ray.data.from_items(rows)).take_all()}
    assert sorted(out) == list(range(8))
    bad = out.pop(5)  # max_tokens 0: the server's 400 is an error row, not a failed job
    assert "max_tokens" in bad["__inference_error__"]
    for n, r in out.items():
        assert r["__inference_error__"] == "" and r["object"] == ("chat.completion" if n % 2 else "text_completion")
        choice = r["choices"][0]
        text = choice["message"]["content"] if n % 2 else choice["text"]
        assert isinstance(text, str) and choice["finish_reason"] in ("stop", "length")
        assert 1 <= r["usage"]["completion_tokens"] <= 3 + n % 3 and r["usage"]["avg_layers"] > 0


def _online_latencies(base: str, n: int, stop: threading.Event | None = None) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post(
                f"{base}/v1/completions",
                json={"model": "tiny", "prompt": f"Online request {i}.", "max_tokens": 16, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t0)
            if stop is not None and stop.is_set():
                break
    return out


@pytest.mark.slow
@pytest.mark.skipif(
    (os.cpu_count() or 1) < MIN_CORES,
    reason=(
        f"needs {MIN_CORES}+ cores: with fewer, the batch's own processes (Ray Data's executor, its actor and "
        "tasks) take the CPU the server needs; on a busy 2-core machine even GET /v1/models went from 6 to 43 ms"
    ),
)
def test_online_requests_keep_priority_while_the_batch_runs(app):
    import ray

    _online_latencies(app["base"], 3)  # warm up
    alone = statistics.median(_online_latencies(app["base"], 15))
    rows = [{"n": i, "kind": "text", "text": f"Write a long story about owl {i}.", "max_tokens": 48} for i in range(96)]
    result: dict = {}

    def batch() -> None:
        t0 = time.perf_counter()
        result["rows"] = processor(batch_size=8, preprocess=completion_row)(ray.data.from_items(rows)).take_all()
        result["seconds"] = time.perf_counter() - t0

    t = threading.Thread(target=batch)
    t.start()
    time.sleep(8)  # the batch is under way (its rows hold the offline rows)
    during = _online_latencies(app["base"], 15)
    still_running = t.is_alive()
    t.join(600)
    busy = statistics.median(during)
    print(
        f"\n[shared replicas] online p50 alone {alone:.3f}s, with the batch running {busy:.3f}s "
        f"({busy / alone:.2f}x); batch of {len(rows)} rows in {result.get('seconds', 0):.1f}s"
    )
    assert still_running, "the batch ended before the online requests: no overlap measured"
    assert len(result["rows"]) == len(rows) and all(r["__inference_error__"] == "" for r in result["rows"])
    assert busy <= 1.5 * alone, (alone, busy)
