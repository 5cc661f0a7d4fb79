"""The server's protection and honesty, on the FastAPI app in this process (uvicorn on loopback, no Ray):
API keys, limits checked before any work, an honest ``/health``, stream metadata, error hygiene,
draining, and a bounded fuzz run against the app's own OpenAPI description. Serve's replacement of a
sick replica is in tests/serve/test_serve.py.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import pytest
from test_serve import SKIP, free_port, make_tiny_dir

KEY = "sk-test-2f1e"


@contextmanager
def serving(model_dir, keys=(), **server_kw):
    """An OpenAIServer over the model in ``model_dir`` behind uvicorn on 127.0.0.1; yields (base URL, server)."""
    import uvicorn

    from skipray.core.engine import Engine
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load
    from skipray.serve.guard import ApiKeys
    from skipray.serve.routes import build_api
    from skipray.serve.server import OpenAIServer
    from skipray.text import detokenizer

    m = load(str(model_dir), device="cpu")
    sched = SkipSchedule(4, **SKIP)
    engine = Engine(
        m.model,
        sched,
        max_batch=4,
        max_len=256,
        eos_token_ids=m.eos_token_ids,
        max_waiting=8,
        detokenize=detokenizer(m.tokenizer),
    )
    kw = {"model_name": "tiny", "max_tokens_limit": 16, "default_max_tokens": 8, **server_kw}
    server = OpenAIServer(m.tokenizer, engine, sched, None, **kw)
    port = free_port()
    web = uvicorn.Server(
        uvicorn.Config(build_api(server, ApiKeys(list(keys))), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server, m.model
    finally:
        web.should_exit = True
        thread.join(10)
        server.loop.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def app(tiny):
    with serving(tiny, keys=(KEY, "sk-other")) as (base, server, _):
        yield {"base": base, "server": server}


def post(app, path, body=None, key=KEY, raw=None, **kw):
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    data = raw if raw is not None else json.dumps(body)
    return requests.post(
        app["base"] + path, data=data, headers={"Content-Type": "application/json", **headers}, timeout=60, **kw
    )


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


# -- API keys ------------------------------------------------------------------------------------------
def test_api_keys_guard_the_api_and_leave_health_open(app):
    import requests
    from openai import AuthenticationError, OpenAI

    for key in (None, "wrong", KEY + "x"):
        r = post(app, "/v1/chat/completions", CHAT, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in r.text
    assert post(app, "/tokenize", {"prompt": "hi"}, key=None).status_code == 401
    assert post(app, "/detokenize", {"tokens": [1]}, key=None).status_code == 401
    assert requests.get(app["base"] + "/v1/models", timeout=10).status_code == 401
    assert post(app, "/v1/chat/completions", CHAT).status_code == 200
    assert post(app, "/v1/chat/completions", CHAT, key="sk-other").status_code == 200  # any configured key
    for open_path in ("/health", "/version", "/openapi.json"):
        assert requests.get(app["base"] + open_path, timeout=10).status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=app["base"] + "/v1", api_key="nope", max_retries=0).models.list()
    assert OpenAI(base_url=app["base"] + "/v1", api_key=KEY, max_retries=0).models.retrieve("tiny").id == "tiny"


def test_api_keys_from_args_and_environment(monkeypatch):
    from skipray.serve.guard import ApiKeys, api_keys_from

    monkeypatch.setenv("SKIPRAY_API_KEY", " a1 ,b2,,")
    assert api_keys_from({"api_keys": ["c3"]}) == ["a1", "b2", "c3"]
    keys = ApiKeys(["a1", "b2"])
    assert (
        keys.allows("Bearer b2")
        and keys.allows("bearer a1")
        and not keys.allows("Bearer a")
        and not keys.allows(None)
        and not keys.allows("b2")
        and "a1" not in repr(keys)
    )
    assert ApiKeys([]).allows(None)


# -- limits before any work ------------------------------------------------------------------------------
def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(
    "path,raw",
    [
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": ' + nested(100_000) + "}",
        ),
        ("/v1/completions", '{"model": "tiny", "prompt": "Hi", "metadata": {"a": ' + nested(100_000) + "}}"),
        ("/v1/chat/completions", nested(100_000)),
        ("/tokenize", '{"prompt": "hi", "x": ' + nested(100_000) + "}"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [], "tools": ' + nested(65) + "}"),
    ],
)
def test_deep_json_is_a_400_never_a_500(app, path, raw):
    r = post(app, path, raw=raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep", r.text[:300]


def test_size_limits_are_checked_before_tokenizing(app):
    context = app["server"].context
    limits = app["server"].limits
    t0 = time.perf_counter()
    r = post(app, "/v1/completions", raw=b'{"model": "tiny", "prompt": "' + b"a" * (limits.max_body_bytes + 10) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    huge = "word " * (limits.max_prompt_chars_per_token * context // 5 + 10)
    r = post(app, "/v1/completions", {"model": "tiny", "prompt": huge, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - t0 < 20
    many = {"model": "tiny", "messages": [{"role": "user", "content": "x"}] * (limits.max_messages + 1)}
    assert post(app, "/v1/chat/completions", many).json()["error"]["param"] == "messages"
    stop = dict(CHAT, stop=["x" * (limits.max_stop_chars + 1)])
    assert post(app, "/v1/chat/completions", stop).json()["error"]["param"] == "stop"
    ids = {"model": "tiny", "prompt": [5] * (context + 1), "max_tokens": 1}
    assert post(app, "/v1/completions", ids).json()["error"]["code"] == "context_length_exceeded"


def test_health_answers_while_a_large_prompt_is_tokenized(app):
    """Tokenizing runs in a worker thread: the event loop answers /health meanwhile."""
    import requests

    prompt = "lorem ipsum dolor " * 30_000  # within the character bound, over the context: a 400 after tokenizing
    done = {}
    t = threading.Thread(
        target=lambda: done.setdefault("r", post(app, "/v1/completions", {"model": "tiny", "prompt": prompt}))
    )
    t.start()
    times = []
    while t.is_alive():
        t0 = time.perf_counter()
        assert requests.get(app["base"] + "/health", timeout=10).status_code == 200
        times.append(time.perf_counter() - t0)
    t.join()
    assert done["r"].status_code == 400 and max(times) < 1.0, (max(times), done["r"].text[:200])


# -- stream and field details ------------------------------------------------------------------------------
def test_stream_chunks_share_their_metadata_and_request_ids_are_echoed(app):
    r = post(
        app,
        "/v1/chat/completions",
        dict(CHAT, max_tokens=16, stream=True, stream_options={"include_usage": True}),
        stream=True,
    )
    chunks = [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: {")]
    assert len(chunks) >= 3
    meta = {(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}
    assert len(meta) == 1 and chunks[0]["system_fingerprint"].startswith("skipray-")
    assert r.headers["x-request-id"] == chunks[0]["id"]
    r = post(app, "/v1/chat/completions", CHAT, headers={"X-Request-Id": "client-7"})
    assert r.headers["x-request-id"] == "client-7" and r.json()["system_fingerprint"].startswith("skipray-")


def test_models_retrieve_and_unknown_model(app):
    import requests

    h = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(app["base"] + "/v1/models/tiny", headers=h, timeout=10).json()["id"] == "tiny"
    r = requests.get(app["base"] + "/v1/models/other", headers=h, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_logprob_bytes_are_each_tokens_own_bytes(app):
    from skipray.serve import responses as R
    from skipray.text import token_bytes, token_strings

    tok = app["server"].tokenizer
    text = "Café 🙂 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    raw = token_bytes(tok, ids)
    assert b"".join(raw) == text.encode() and any("\ufffd" in s for s in token_strings(tok, ids))
    assert all(b"\xef\xbf\xbd" not in b for b in raw)  # never U+FFFD's bytes for a partial character
    entry = R.chat_logprobs([R.TokenLogprob("\ufffd", -0.1, [("\ufffd", -0.1, raw[-1])], raw[-1])])["content"][0]
    assert entry["bytes"] == list(raw[-1]) == entry["top_logprobs"][0]["bytes"]
    r = post(app, "/v1/chat/completions", dict(CHAT, max_tokens=6, logprobs=True, top_logprobs=2)).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1 and all(isinstance(x["bytes"], list) and x["bytes"] for x in content)


# -- honest health, error hygiene, draining ------------------------------------------------------------------
def test_health_is_503_when_steps_keep_failing_or_stall(tiny, caplog):
    import requests

    with serving(tiny, max_failed_steps=2, health_stall_s=0.3) as (base, server, model):
        assert requests.get(base + "/health", timeout=10).status_code == 200
        real = model.embed
        model.embed = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost (the test's model)"))
        for _ in range(2):
            r = requests.post(
                base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30
            )
            assert r.status_code == 500 and "device lost" not in r.text and r.headers["x-request-id"] in r.text
        h = requests.get(base + "/health", timeout=10)
        assert h.status_code == 503 and "engine steps failed" in h.json()["error"]["message"]
        assert server.problem() is not None
        model.embed = real  # the device is back: one good step makes the replica healthy again
        assert (
            requests.post(
                base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30
            ).status_code
            == 200
        )
        assert requests.get(base + "/health", timeout=10).status_code == 200
        model.embed = lambda *a, **k: (time.sleep(1.0), real(*a, **k))[1]  # slow: a step takes a second
        t = threading.Thread(
            target=lambda: requests.post(
                base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1}, timeout=30
            )
        )
        t.start()
        time.sleep(0.6)
        h = requests.get(base + "/health", timeout=10)
        assert h.status_code == 503 and "no engine step has succeeded" in h.json()["error"]["message"]
        t.join()
        model.embed = real
        assert requests.get(base + "/health", timeout=10).status_code == 200  # the step finished: healthy


def test_draining_refuses_new_requests(tiny):
    import requests

    with serving(tiny) as (base, server, _):
        server.loop.drain()
        r = requests.post(base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert requests.get(base + "/health", timeout=10).status_code == 503


def test_scheduling_policy_is_checked():
    from skipray.serve.guard import ServeLimits

    with pytest.raises(ValueError, match="unknown limits"):
        ServeLimits.from_args({"limits": {"max_body": 1}})
    with pytest.raises(ValueError, match="positive integers"):
        ServeLimits.from_args({"limits": {"max_json_depth": 0}})
    assert ServeLimits.from_args({"limits": {"max_json_depth": 8}}).max_json_depth == 8


# -- fuzzed against the app's own OpenAPI description ------------------------------------------------------
def test_fuzzed_requests_never_get_a_5xx(app):
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis_jsonschema import from_schema
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    doc = requests.get(app["base"] + "/openapi.json", timeout=10).json()
    comps = doc["components"]["schemas"]
    routes = {"/v1/chat/completions": ChatCompletion, "/v1/completions": Completion}
    strategies = []
    for path in routes:
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = dict(comps[ref.rsplit("/", 1)[1]], components={"schemas": comps})
        strategies.append(st.tuples(st.just(path), from_schema(schema)))
    seen = {"n": 0}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.one_of(strategies))
    def check(case):
        path, body = case
        if isinstance(body, dict):
            body["stream"] = False
        r = post(app, path, body)
        seen["n"] += 1
        assert r.status_code < 500, (body, r.text[:300])
        data = r.json()
        if r.status_code == 200:
            routes[path].model_validate(data)
        else:
            assert set(data["error"]) >= {"message", "type", "param", "code"}

    check()
    assert seen["n"] >= 100


def test_structured_output_checks_are_time_bounded(tiny, monkeypatch):
    import requests

    from skipray.serve.guard import ServeLimits
    from skipray.structured import Constraints

    real = Constraints.for_spec

    def slow(self, spec):  # the test's stand-in for a schema that is costly to check
        if spec.get("regex") == "slow":
            time.sleep(2.5)
        return real(self, spec)

    monkeypatch.setattr(Constraints, "for_spec", slow)
    with serving(tiny, limits=ServeLimits(max_grammar_seconds=1)) as (base, _, _):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        t0 = time.perf_counter()
        r = requests.post(
            base + "/v1/chat/completions", json={**body, "structured_outputs": {"regex": "slow"}}, timeout=30
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "structured_output_too_complex"
        assert time.perf_counter() - t0 < 2.4
        deep = {"json": {"type": "object", "properties": {"a": json.loads(nested(80, "{}"))}}}
        r = requests.post(base + "/v1/chat/completions", json={**body, "structured_outputs": deep}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"  # the body's depth bound
        r = requests.post(
            base + "/v1/chat/completions", json={**body, "structured_outputs": {"regex": "[ab]{2}"}}, timeout=30
        )
        assert r.status_code == 200


def test_health_stays_fast_under_a_burst_of_chat_requests(app):
    """/health never waits behind generation: 40 concurrent chat requests (bounded), /health polled meanwhile
    (bench/bench_health.py measures 100 against the default model)."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 16}
    times, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.perf_counter()
            requests.get(app["base"] + "/health", timeout=30)
            times.append(time.perf_counter() - t0)
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda _: post(app, "/v1/chat/completions", body).status_code, range(40)))
    stop.set()
    t.join()
    assert set(codes) <= {200, 503} and 200 in codes
    assert len(times) >= 5 and sorted(times)[int(0.95 * len(times))] < 1.0, max(times)


def test_a_stream_cut_by_shutdown_ends_with_an_error_event(tiny):
    import requests

    with serving(tiny, max_tokens_limit=200) as (base, server, model):
        real = model.embed
        model.embed = lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1]  # a step takes a while
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with requests.post(base + "/v1/completions", json=body, timeout=60, stream=True) as r:
            lines = r.iter_lines(decode_unicode=True)
            first = next(ln for ln in lines if ln.startswith("data: {"))
            server.loop.drain()
            server.loop.close()  # the replica is going away
            rest = [ln for ln in lines if ln]
        assert json.loads(first[6:])["choices"] and '"error"' in rest[-2] and rest[-1] == "data: [DONE]"


def test_api_keys_hold_under_a_mount_prefix(app):
    """Serve keeps the route prefix in the path (and uvicorn --root-path): keys are checked below it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from skipray.serve.guard import ApiKeys
    from skipray.serve.routes import build_api

    outer = FastAPI()
    outer.mount("/p", build_api(app["server"], ApiKeys([KEY])))
    client = TestClient(outer)
    assert client.get("/p/v1/models").status_code == 401
    assert client.get("/p/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/p/health").status_code == 200


def test_requests_own_errors_never_make_the_replica_unhealthy(tiny):
    import requests

    with serving(tiny, max_failed_steps=2) as (base, server, _):
        # the grammar allows only "a" and bad_words bans it: every token is banned, the request's own error
        body = {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 4,
            "structured_outputs": {"choice": ["a"]},
            "bad_words": ["a"],
        }
        codes = [requests.post(base + "/v1/completions", json=body, timeout=30) for _ in range(3)]
        assert all(r.status_code == 400 and "every token is banned" in r.text for r in codes), codes[0].text
        assert requests.get(base + "/health", timeout=10).status_code == 200 and server.loop.failed_steps == 0
