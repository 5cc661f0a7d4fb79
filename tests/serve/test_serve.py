"""The Serve app end to end on a local Ray: OpenAI client (plain + streaming), 4xx errors, disconnects,
backpressure, autoscaling 1 -> 2 -> 1 and a 16-client load test (the last two marked slow), and the
request cases of issue 12 (cases from public bug reports against other OpenAI-compatible servers).
tests/serve/test_serve_openai.py runs the same app without Ray for client libraries and fault injection.

Run under the shared lock: ``flock /tmp/skipray-ray.lock .venv/bin/python -m pytest -q tests/serve/test_serve.py``.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.ray

SKIP = {"max_layers": 4, "min_layers": 2, "decay_tokens": 8, "warmup_layers": 1}
TINY_ARGS = {
    "model_name": "tiny",
    "schedule": SKIP,
    "max_batch": 16,
    "max_len": 256,
    "max_waiting": 16,
    "max_tokens_limit": 200,
    "default_max_tokens": 32,
}
SMALL = {"ray_actor_options": {"num_cpus": 0.25}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_dir(path):
    """A 4-layer random Llama with the real SmolLM2 tokenizer (vocab 49152): cheap to serve."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from skipray.loading import convert_gguf, default_gguf

    src = convert_gguf(default_gguf())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in src.iterdir():
        if f.name not in ("config.json", "generation_config.json") and not f.name.endswith(".safetensors"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from skipray.serve.app import build_app

    tiny = make_tiny_dir(tmp_path_factory.mktemp("tiny"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(dict(TINY_ARGS, model=str(tiny)), SMALL), name="tiny", route_prefix="/tiny")
    yield {"base": f"http://127.0.0.1:{port}", "tiny": tiny, "port": port}
    serve.shutdown()


def client(base: str, prefix: str = "/tiny", **kw):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}{prefix}/v1", api_key="none", max_retries=0, timeout=120, **kw)


def local_engine_text(tiny, prompt: str, max_tokens: int) -> str:
    """The same request through the direct (static-batch) Engine, for comparison."""
    from skipray.core.engine import Engine, SamplingParams
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load
    from skipray.text import decode, encode_prompt

    m = load(str(tiny), device="cpu")
    sched = SkipSchedule(m.model.num_layers, **SKIP)
    ids = encode_prompt(m.tokenizer, prompt)
    out = Engine(m.model, sched, max_batch=1, max_len=256, eos_token_ids=m.eos_token_ids).generate(
        [ids], SamplingParams(max_tokens=max_tokens)
    )[0]
    return decode(m.tokenizer, out.token_ids)


def test_health_and_models(server):
    import requests

    r = requests.get(f"{server['base']}/tiny/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client(server["base"]).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_plain_and_stream_equal_engine(server):
    c = client(server["base"])
    prompt = "The quick brown fox"
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    from skipray.core.schedule import SkipSchedule

    assert r.model_extra is not None
    assert r.usage.model_extra["avg_layers"] == pytest.approx(SkipSchedule(4, **SKIP).average_layers(12), abs=1e-3)
    assert r.choices[0].text == local_engine_text(server["tiny"], prompt, 12)
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_plain_and_stream(server):
    c = client(server["base"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 10
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].object == "chat.completion.chunk"


def test_raw_sse_ends_with_done_and_skip_extension(server):
    import requests

    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": 5,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    with requests.post(f"{server['base']}/tiny/v1/completions", json=body, timeout=60, stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    full = requests.post(
        f"{server['base']}/tiny/v1/completions",
        timeout=60,
        json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "skip": {"full": True}},
    ).json()
    assert full["usage"]["avg_layers"] == 4
    custom = requests.post(
        f"{server['base']}/tiny/v1/completions",
        timeout=60,
        json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "skip": {"max_layers": 3, "min_layers": 3}},
    ).json()
    assert custom["usage"]["avg_layers"] == pytest.approx((4 + 3 * 4) / 5)


BAD = [
    ({"prompt": "x", "max_tokens": 3}, 400),  # missing model
    ({"model": "tiny", "max_tokens": 3}, 400),  # missing prompt
    ({"model": "tiny", "prompt": "x", "max_tokens": "three"}, 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": -2}, 400),
    ({"model": "tiny", "prompt": "x", "max_tokens": 201}, 400),  # over max_tokens_limit
    ({"model": "tiny", "prompt": "word " * 300, "max_tokens": 10}, 400),  # longer than the context
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400),
    ({"model": "tiny", "prompt": "x", "skip": {"min_layers": 9}}, 400),
    ({"model": "tiny", "prompt": "x", "skip": {"bogus": 1}}, 400),
    ({"model": "nope", "prompt": "x"}, 404),
    ([1, 2], 400),
]


@pytest.mark.parametrize("body,status", BAD)
def test_bad_input_is_4xx_openai_error(server, body, status):
    import requests

    r = requests.post(f"{server['base']}/tiny/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_malformed_json_chat_and_unknown_route(server):
    import requests

    base = server["base"]
    r = requests.post(
        f"{base}/tiny/v1/chat/completions", data=b"{not json", timeout=30, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = requests.post(f"{base}/tiny/v1/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(
        f"{base}/tiny/v1/chat/completions",
        timeout=30,
        json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
    )
    assert r.status_code == 400
    r = requests.get(f"{base}/tiny/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_on_4xx(server):
    import openai

    with pytest.raises(openai.BadRequestError):
        client(server["base"]).completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client(server["base"]).completions.create(model="gpt-4", prompt="x", max_tokens=3)


# -- issue 12: one bad request never hurts another; OpenAI clients get what they ask for ----------------
def post(server, path: str, body, **kw):
    import requests

    return requests.post(f"{server['base']}/tiny{path}", json=body, timeout=60, **kw)


def test_tiny_temperature_is_greedy_and_spares_its_batch_mate(server):
    """temperature 1e-45 answered 500 and failed the request decoding beside it; it is greedy now."""
    prompt, out = "The quick brown fox", {}

    def long_stream():
        with post(
            server,
            "/v1/completions",
            {"model": "tiny", "prompt": prompt, "max_tokens": 150, "temperature": 0, "stream": True},
            stream=True,
        ) as r:
            out["status"] = r.status_code
            out["lines"] = []
            for ln in r.iter_lines(decode_unicode=True):
                if ln:
                    out["lines"].append(ln)

    t = threading.Thread(target=long_stream)
    t.start()
    deadline = time.time() + 60
    while not out.get("lines") and t.is_alive() and time.time() < deadline:
        time.sleep(0.005)
    tiny = post(
        server,
        "/v1/completions",
        {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1e-45},
    )
    t.join()
    greedy = post(
        server, "/v1/completions", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    )
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]"
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in out["lines"][:-1])
    assert text == local_engine_text(server["tiny"], prompt, 150)


def test_max_completion_tokens_bounds_the_reply_and_wins(server):
    msgs = [{"role": "user", "content": "Count from 1 to 100."}]
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_completion_tokens": 4}).json()
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["finish_reason"] == "length"
    r = post(
        server,
        "/v1/chat/completions",
        {"model": "tiny", "messages": msgs, "max_tokens": 10, "max_completion_tokens": 4},
    ).json()
    assert r["usage"]["completion_tokens"] == 4
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_completion_tokens": 201})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"


def test_content_parts_equal_the_plain_string(server):
    def chat(content):
        return post(
            server,
            "/v1/chat/completions",
            {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": content}]},
        )

    plain, parts = chat("Hi").json(), chat([{"type": "text", "text": "Hi"}]).json()
    assert parts["choices"][0]["message"] == plain["choices"][0]["message"]
    assert parts["usage"] == plain["usage"]
    two = chat([{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]).json()
    assert two["choices"][0]["message"] == chat("Hi\nthere").json()["choices"][0]["message"]
    img = chat([{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}])
    assert img.status_code == 400 and "text only" in img.json()["error"]["message"]
    assert img.json()["error"]["param"] == "messages[0].content[1]"


NULLS = {
    k: None
    for k in (
        "temperature",
        "top_p",
        "n",
        "stream",
        "stop",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "user",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "stream_options",
        "response_format",
        "tools",
        "tool_choice",
        "skip",
        "top_k",
        "metadata",
        "store",
        "service_tier",
    )
}


def test_null_means_default(server):
    msgs = [{"role": "user", "content": "Hi", "name": None}]
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "temperature": None})
    assert r.status_code == 200, r.text
    nulls = post(server, "/v1/chat/completions", dict(NULLS, model="tiny", messages=msgs, temperature=0)).json()
    plain = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "temperature": 0}).json()
    assert nulls["choices"] == plain["choices"] and nulls["usage"] == plain["usage"]
    assert plain["usage"]["completion_tokens"] == TINY_ARGS["default_max_tokens"]
    done = post(
        server,
        "/v1/completions",
        {
            "model": "tiny",
            "prompt": "x",
            "max_tokens": 3,
            "echo": None,
            "suffix": None,
            "best_of": None,
            "stop": None,
            "temperature": None,
        },
    )
    assert done.status_code == 200, done.text


@pytest.mark.parametrize(
    "field,value",
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("response_format", "json"),
        ("n", 99),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3),
        ("logit_bias", {"100": 500}),
        ("logit_bias", {"token": 1}),
        ("tool_choice", "required"),
        ("reasoning_effort", "low"),
        ("min_tokens", -1),
        ("guided_regex", 5),
        ("min_p", 1.5),
    ],
)
def test_fields_that_would_change_the_answer_get_a_400_naming_them(server, field, value):
    r = post(
        server,
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, field: value},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_fields_that_change_nothing_are_accepted(server):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "temperature": 0,
        "user": "u1",
        "store": False,
        "metadata": {"k": "v"},
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "n": 1,
        "tools": [],
        "logit_bias": {},
        "response_format": {"type": "text"},
        "parallel_tool_calls": True,
        "service_tier": "auto",
        "stream_options": {"include_usage": True},
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    for bad in ({"suffix": " end"}, {"best_of": 2}):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, **bad})
        assert r.status_code == 400, (bad, r.text)


def test_logprobs_and_echo(server):
    chat = post(
        server,
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(x["top_logprobs"]) == 3 for x in content)
    assert all(x["logprob"] == pytest.approx(x["top_logprobs"][0]["logprob"]) for x in content)  # greedy
    assert "".join(x["token"] for x in content) == chat["choices"][0]["message"]["content"]
    comp = post(
        server, "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    ).json()["choices"][0]
    lp = comp["logprobs"]
    assert len(lp["tokens"]) == 4 and len(lp["token_logprobs"]) == 4 and lp["text_offset"][0] == 0
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and "".join(lp["tokens"]) == comp["text"]
    echo = post(
        server, "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 4, "temperature": 0, "echo": True}
    ).json()["choices"][0]
    assert echo["text"] == "Once" + comp["text"] and echo["logprobs"] is None


def test_stream_usage_only_with_include_usage(server):
    def sse(extra):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "stream": True,
            "temperature": 0,
            **extra,
        }
        with post(server, "/v1/chat/completions", body, stream=True) as r:
            return [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True) if ln and ln != "data: [DONE]"]

    plain = sse({})
    assert all("usage" not in ch for ch in plain)
    with_usage = sse({"stream_options": {"include_usage": True}})
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 5
    assert all(ch["usage"] is None for ch in with_usage[:-1])
    assert [ch["choices"] for ch in with_usage[:-1]] == [ch["choices"] for ch in plain]


def test_tokenize_detokenize_version(server):
    import requests

    tok = post(server, "/tokenize", {"model": "tiny", "prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 256
    assert post(server, "/detokenize", {"model": "tiny", "tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    msgs = [{"role": "user", "content": "Hi"}]
    chat = post(server, "/tokenize", {"messages": msgs}).json()
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 2}).json()
    assert chat["count"] == r["usage"]["prompt_tokens"]
    assert post(server, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert post(server, "/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    from skipray import __version__

    assert requests.get(f"{server['base']}/tiny/version", timeout=30).json() == {"version": __version__}


def test_backpressure_sheds_load_fast(server):
    import requests
    from ray import serve

    from skipray.serve.app import build_app

    args = dict(TINY_ARGS, model=str(server["tiny"]), max_batch=1, max_waiting=1)
    opts = {"ray_actor_options": {"num_cpus": 0.25}}  # the deployment's own max_ongoing_requests: the app decides
    serve.run(build_app(args, opts), name="tight", route_prefix="/tight")
    try:
        body = {"model": "tiny", "prompt": "a b c", "max_tokens": 200, "temperature": 0}

        def call(_):
            t0 = time.perf_counter()
            r = requests.post(f"{server['base']}/tight/v1/completions", json=body, timeout=120)
            return r.status_code, time.perf_counter() - t0, r.text

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, codes
        # every shed request gets an OpenAI error object from the replica itself, never the proxy's plain text
        assert all(json.loads(body)["error"]["code"] == "server_overloaded" for c, _, body in results if c == 503)
        assert max(t for c, t, _ in results if c == 503) < 2.0
    finally:
        serve.delete("tight")


@pytest.mark.real_model
def test_real_model_chat_and_disconnect_frees_row(server):
    import requests
    from ray import serve

    from skipray.serve.app import build_app

    opts = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 8}
    serve.run(
        build_app({"model": "smollm2-base", "model_name": "smol", "max_len": 512, "max_batch": 4}, opts),
        name="real",
        route_prefix="/real",
    )
    base = f"{server['base']}/real"
    try:
        c = client(server["base"], "/real")
        r = c.chat.completions.create(
            model="smol",
            temperature=0,
            max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in r.choices[0].message.content
        assert r.usage.model_extra["avg_layers"] == 30  # smollm2 without a trained schedule: full depth
        steps0 = requests.get(f"{base}/health").json()["steps"]
        body = {"model": "smol", "prompt": "Once upon a time", "max_tokens": 300, "stream": True}
        with requests.post(f"{base}/v1/completions", json=body, timeout=60, stream=True) as resp:
            got = 0
            for line in resp.iter_lines(decode_unicode=True):
                got += bool(line)
                if got >= 3:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.time() + 15
        while time.time() < deadline:
            h = requests.get(f"{base}/health").json()
            if h["live"] == 0 and h["waiting"] == 0:
                break
            time.sleep(0.2)
        assert h["live"] == 0 and h["waiting"] == 0, h
        assert h["steps"] - steps0 < 150  # aborted long before its 300 tokens
    finally:
        serve.delete("real")


def replicas(app: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return 0
    dep = next(iter(st.deployments.values()))
    return dep.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscale_up_and_down(server):
    import requests
    from ray import serve

    from skipray.serve.app import build_app

    opts = {
        "ray_actor_options": {"num_cpus": 0.25},
        "max_ongoing_requests": 16,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 2,
            "initial_replicas": 1,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 2,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    serve.run(build_app(dict(TINY_ARGS, model=str(server["tiny"])), opts), name="auto", route_prefix="/auto")
    stop = threading.Event()
    errors = []

    def hammer():
        with requests.Session() as h:
            while not stop.is_set():
                r = h.post(
                    f"{server['base']}/auto/v1/completions",
                    json={"model": "tiny", "prompt": "go", "max_tokens": 150},
                    timeout=60,
                )
                if r.status_code != 200:
                    errors.append(r.status_code)

    try:
        assert replicas("auto") == 1
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        t0 = time.time()
        while replicas("auto") < 2 and time.time() - t0 < 60:
            time.sleep(0.5)
        up = time.time() - t0
        stop.set()
        for t in threads:
            t.join()
        assert replicas("auto") == 2, "did not scale up within 60 s"
        t1 = time.time()
        while replicas("auto") > 1 and time.time() - t1 < 60:
            time.sleep(0.5)
        down = time.time() - t1
        assert replicas("auto") == 1, "did not scale down within 60 s"
        assert not errors, errors
        print(f"\n[autoscale] 1->2 replicas in {up:.1f}s under load, 2->1 in {down:.1f}s after it")
    finally:
        stop.set()
        serve.delete("auto")


@pytest.mark.slow
def test_load_16_clients_60s(server):
    c = client(server["base"])
    stop_at = time.time() + 60
    lat, ttft, toks, errors = [], [], [], []
    lock = threading.Lock()

    def worker(k: int):
        while time.time() < stop_at:
            t0 = time.perf_counter()
            first, n = None, 0
            try:
                for ch in c.completions.create(
                    model="tiny",
                    prompt=f"client {k} says",
                    max_tokens=64,
                    temperature=0.7,
                    seed=k,
                    stream=True,
                    stream_options={"include_usage": True},
                ):
                    if first is None:
                        first = time.perf_counter() - t0
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
                ttft.append(first)
                toks.append(n)

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    wall = time.time() - t0
    assert not errors, errors[:3]
    q = statistics.quantiles(lat, n=100)
    tq = statistics.quantiles(ttft, n=100)
    print(
        f"\n[load] 16 clients x {wall:.0f}s: {len(lat)} requests, {sum(toks)} tokens, "
        f"{sum(toks) / wall:.1f} tok/s, latency p50 {q[49]:.3f}s p99 {q[98]:.3f}s, "
        f"TTFT p50 {tq[49]:.3f}s p99 {tq[98]:.3f}s"
    )
    assert len(lat) >= 16 and sum(toks) > 0


def test_sick_replica_is_replaced_and_later_requests_succeed(server, tmp_path):
    """A replica whose every step fails (NaN weights: a broken device) fails /health and Serve's health check;
    Serve replaces it, and the new replica (the weights repaired on disk meanwhile) serves."""
    import requests
    import torch
    from ray import serve
    from safetensors.torch import load_file, save_file

    from skipray.serve.app import build_app

    model = tmp_path / "model"
    shutil.copytree(server["tiny"], model)
    good = load_file(str(model / "model.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) if "embed_tokens" in k else v for k, v in good.items()},
        str(model / "model.safetensors"),
        metadata={"format": "pt"},
    )
    args = dict(TINY_ARGS, model=str(model), health_max_failed_steps=2)
    opts = {"ray_actor_options": {"num_cpus": 0.25}, "health_check_period_s": 1, "health_check_timeout_s": 10}
    serve.run(build_app(args, opts), name="sick", route_prefix="/sick")
    base = f"{server['base']}/sick"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    try:
        codes = [requests.post(f"{base}/v1/completions", json=body, timeout=60).status_code for _ in range(2)]
        assert codes == [500, 500]
        save_file(good, str(model / "model.safetensors"), metadata={"format": "pt"})  # the device is repaired
        sick = requests.get(f"{base}/health", timeout=10)
        deadline, ok = time.time() + 120, None
        while time.time() < deadline:
            try:
                ok = requests.post(f"{base}/v1/completions", json=body, timeout=30)
            except requests.RequestException:
                ok = None
            if ok is not None and ok.status_code == 200:
                break
            time.sleep(1)
        assert sick.status_code in (503, 404, 500) and ok is not None and ok.status_code == 200, (sick.text, ok)
    finally:
        serve.delete("sick")
