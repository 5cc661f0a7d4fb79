"""skipray.metrics: a no-op without Ray; with Ray, the series reach Ray's Prometheus endpoint on loopback.

The Ray test runs in a subprocess (its own Ray, its own metrics port) so it never fights the
session's ``ray_local`` fixture. Run it under the shared lock:
``flock /tmp/skipray-ray.lock .venv/bin/python -m pytest -q tests/test_metrics.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from skipray.metrics import METRIC_NAMES

NO_RAY = textwrap.dedent(
    """
    import sys, time
    from skipray.metrics import EngineMetrics
    m = EngineMetrics("batch")
    t = time.perf_counter()
    for _ in range(10000):
        m.record_step([("a", 30, False)], 30, 1, 0, 0.1, t)
        m.record_request(0.5, 10, 20, "stop", ttft_s=0.01)
    per_call = (time.perf_counter() - t) / 20000
    assert not m.enabled
    assert "ray" not in sys.modules, "skipray.metrics imported ray"
    print(per_call)
    """
)

WITH_RAY = textwrap.dedent(
    """
    import json, os, sys, time, urllib.request
    import ray

    port = int(sys.argv[1])
    ray.init(
        num_cpus=1, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False,
        _metrics_export_port=port,
    )
    try:
        @ray.remote(num_cpus=0)
        class Recorder:
            def run(self):
                from skipray.metrics import EngineMetrics

                m = EngineMetrics("testactor", "tiny")
                m.record_arrival("r1", 100.0)
                m.record_step([("r1", 30, False)], 30, running=1, waiting=2, cache_usage=0.25,
                              step_start=100.5, now=101.0)                              # queue 0.5 s
                m.record_step([("r1", 10, False)], 30, 1, 0, 0.5, 101.0, now=101.2)   # ITL 0.2 s
                m.record_step([("r1", 10, True)], 30, 1, 0, 0.75, 101.2, now=101.5)   # ITL 0.3 s, done
                m.record_request(latency_s=1.5, prompt_tokens=5, generated_tokens=3, finish_reason="length",
                                 ttft_s=0.9, speedup=1.4)
                from skipray.core.requests import Completion

                b = EngineMetrics("testbatch", "tiny")
                b.record_batch([Completion(4, [1, 2, 3], [30, 20, 10], "stop"), Completion(2, [5], [30], "length")],
                               num_layers=30, max_rows=8, latency_s=0.5)
                return m.enabled and b.enabled

        rec = Recorder.remote()
        assert ray.get(rec.run.remote()) is True
        want = {"ray_skipray_layers_computed_total", "ray_skipray_e2e_request_latency_seconds_count",
                "ray_skipray_kv_cache_usage_perc"}
        deadline, text = time.time() + 45, ""
        while time.time() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                text = ""
            names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_skipray")}
            if want <= names:
                break
            time.sleep(1)
        samples = {}
        for line in text.splitlines():
            for comp in ("testactor", "testbatch"):
                if line.startswith("ray_skipray") and f'component="{comp}"' in line and 'model_name="tiny"' in line:
                    key = f"{comp}/{line.split('{')[0]}"
                    if "finished_reason=" in line:
                        key += "/" + line.split('finished_reason="')[1].split('"')[0]
                    samples[key] = samples.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        print("RESULT " + json.dumps(samples))
    finally:
        ray.shutdown()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_noop_and_cheap_without_ray():
    out = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 20e-6  # a no-op call costs microseconds


def test_metric_names_are_vllms_with_the_skipray_prefix():  # vllm:x -> skipray_x
    import re

    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for n in METRIC_NAMES:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", n) and n.startswith("skipray_")  # Ray drops names with ":"
    vllm = {
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "prompt_tokens",
        "generation_tokens",
        "request_success",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
    }
    assert {f"skipray_{n}" for n in vllm} <= set(METRIC_NAMES)


@pytest.mark.ray
@pytest.mark.slow
def test_metrics_reach_prometheus_endpoint(tmp_path):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    script = tmp_path / "record.py"
    script.write_text(WITH_RAY)
    out = subprocess.run(
        [sys.executable, str(script), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    samples = json.loads(line[-1][len("RESULT ") :])
    a = {k.split("/", 1)[1]: v for k, v in samples.items() if k.startswith("testactor/")}
    b = {k.split("/", 1)[1]: v for k, v in samples.items() if k.startswith("testbatch/")}
    # the serve path: three steps of one request, then its end
    assert a["ray_skipray_generation_tokens_total"] == 3 and a["ray_skipray_decode_steps_total"] == 3
    assert (a["ray_skipray_layers_computed_total"], a["ray_skipray_layers_skipped_total"]) == (50, 40)
    # (Ray's exported histogram sums are bucket midpoints, so the counts are what is checked)
    assert a["ray_skipray_request_queue_time_seconds_count"] == 1
    assert a["ray_skipray_inter_token_latency_seconds_count"] == 2
    assert a["ray_skipray_kv_cache_usage_perc"] == 0.75 and a["ray_skipray_num_requests_waiting"] == 0
    assert a["ray_skipray_request_success_total/length"] == 1 and a["ray_skipray_prompt_tokens_total"] == 5
    assert a["ray_skipray_time_to_first_token_seconds_count"] == 1
    assert a["ray_skipray_e2e_request_latency_seconds_count"] == 1
    assert a["ray_skipray_request_theoretical_speedup_count"] == 1
    # record_batch over two Completions: 2 requests, 6 prompt / 4 generated tokens, 90 run / 30 skipped
    assert (b["ray_skipray_request_success_total/stop"], b["ray_skipray_request_success_total/length"]) == (1, 1)
    assert b["ray_skipray_prompt_tokens_total"] == 6 and b["ray_skipray_generation_tokens_total"] == 4
    assert (b["ray_skipray_layers_computed_total"], b["ray_skipray_layers_skipped_total"]) == (90, 30)
    assert b["ray_skipray_decode_steps_total"] == 3 and b["ray_skipray_num_requests_running"] == 2
