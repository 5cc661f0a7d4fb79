"""The server's FastAPI app in this process (uvicorn on loopback, no Ray): client libraries (openai,
LangChain's ChatOpenAI) get what they ask for, and faults stay with their request.

The app is the one each Serve replica runs (``skipray.serve.routes.build_api``); tests/serve/test_serve.py
drives it through Ray Serve. Here the engine can be broken on purpose (monkeypatch) to check fault
isolation. The tokenizer has decode's space clean-up forced on, so every streamed-vs-whole check
also covers a tokenizer that cleans up spaces.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from test_serve import SKIP, free_port, make_tiny_dir

import skipray.core.sampling


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import uvicorn
    from transformers import AutoTokenizer

    from skipray.core.engine import Engine
    from skipray.core.schedule import SkipSchedule
    from skipray.loading import load
    from skipray.serve.routes import build_api
    from skipray.serve.server import OpenAIServer
    from skipray.text import detokenizer

    tiny = make_tiny_dir(tmp_path_factory.mktemp("tiny"))
    m = load(str(tiny), device="cpu")
    tok = AutoTokenizer.from_pretrained(
        tiny,
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    sched = SkipSchedule(4, **SKIP)
    engine = Engine(
        m.model,
        sched,
        max_batch=8,
        max_len=256,
        eos_token_ids=m.eos_token_ids,
        max_waiting=16,
        detokenize=detokenizer(tok),
    )
    server = OpenAIServer(tok, engine, sched, None, model_name="tiny", max_tokens_limit=200, default_max_tokens=32)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(build_api(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.02)
    yield {
        "base": f"http://127.0.0.1:{port}",
        "server": server,
        "engine": engine,
        "model": m.model,
        "tok": tok,
        "schedule": sched,
    }
    web.should_exit = True
    thread.join(10)
    server.loop.close()


def oai(app):
    from openai import OpenAI

    return OpenAI(base_url=f"{app['base']}/v1", api_key="none", max_retries=0, timeout=60)


def chat_model(app, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{app['base']}/v1", api_key="none", model="tiny", max_retries=0, timeout=60, **kw)


def engine_text(app, ids: list[int], n: int) -> tuple[str, list[int]]:
    """What the direct engine generates greedily for ``ids``, as text through the server's detokenizer."""
    from skipray.core.engine import Engine, SamplingParams
    from skipray.text import TextStream

    eos = app["engine"].eos_token_ids
    out = Engine(app["model"], app["schedule"], max_batch=1, max_len=256, eos_token_ids=eos).generate(
        [ids], SamplingParams(max_tokens=n, logprobs=2)
    )[0]
    ts = TextStream(app["tok"], ids)
    for i, t in enumerate(out.token_ids):
        ts.add(t, final=i == len(out.token_ids) - 1)
    return ts.text, out


# -- LangChain's ChatOpenAI ---------------------------------------------------------------------------
def test_langchain_invoke_honours_max_tokens_and_reports_usage(app):
    """ChatOpenAI(max_tokens=24) sends max_completion_tokens; it must bound the reply."""
    msg = chat_model(app, max_tokens=24, temperature=0).invoke("Count from 1 to 100.")
    assert msg.usage_metadata["output_tokens"] == 24 and msg.response_metadata["finish_reason"] == "length"
    assert msg.usage_metadata["input_tokens"] > 0 and msg.content


def test_langchain_stream_with_usage_and_without(app):
    llm = chat_model(app, max_tokens=12, temperature=0, stream_usage=True)
    chunks = list(llm.stream("Hi there"))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.usage_metadata["output_tokens"] == 12
    assert total.content == llm.invoke("Hi there").content  # streamed text == the whole reply
    plain = list(chat_model(app, max_tokens=12, temperature=0).stream("Hi there"))
    assert all(c.usage_metadata is None for c in plain)  # no include_usage, no usage in the stream


def test_langchain_batch_and_logprobs(app):
    llm = chat_model(app, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    outs = llm.batch(["one", "two", "three"])
    assert [o.usage_metadata["output_tokens"] for o in outs] == [6, 6, 6]
    for o in outs:
        lps = o.response_metadata["logprobs"]["content"]
        assert len(lps) == 6 and all(len(x["top_logprobs"]) == 2 for x in lps)
        assert all(x["logprob"] == pytest.approx(x["top_logprobs"][0]["logprob"]) for x in lps)  # greedy: top-1


def test_langchain_json_mode_works(app):  # tools: tests/serve/test_serve_tools.py
    import json

    import openai

    llm = chat_model(app, max_tokens=40)
    try:  # accepted, and the reply is a JSON object (or its beginning when a tiny random model hits max_tokens)
        out = llm.bind(response_format={"type": "json_object"}).invoke("Say a JSON object.")
        assert isinstance(json.loads(out.content), dict)
    except openai.LengthFinishReasonError as e:
        assert e.completion.choices[0].message.content.startswith("{")


# -- the openai client ----------------------------------------------------------------------------------
def test_openai_chat_logprobs_are_the_step_log_softmax(app):
    c = oai(app)
    r = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    ids = app["server"].tokenize({"messages": [{"role": "user", "content": "Hi"}]})["tokens"]
    text, out = engine_text(app, ids, 5)
    assert r.choices[0].message.content == text
    got = r.choices[0].logprobs.content
    assert [x.logprob for x in got] == pytest.approx([x.logprob for x in out.logprobs], abs=1e-4)
    assert [t.logprob for x in got for t in x.top_logprobs] == pytest.approx(
        [v for x in out.logprobs for v in x.top_logprobs], abs=1e-4
    )
    assert [x.token for x in got] == [app["tok"].decode([t]) for t in out.token_ids]


def test_ignore_eos_generates_through_eos(app, monkeypatch):
    ids = [5, 6, 7, 8]
    _, out = engine_text(app, ids, 6)
    eos = out.token_ids[1]
    k = out.token_ids.index(eos) + 1  # where a request that honours EOS stops
    monkeypatch.setattr(app["engine"], "eos_token_ids", (eos,))
    client = oai(app)
    stopped = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert stopped.usage.completion_tokens == k and stopped.choices[0].finish_reason == "stop"
    through = client.completions.create(
        model="tiny", prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert through.usage.completion_tokens == 6 and through.choices[0].finish_reason == "length"
    with pytest.raises(Exception, match="ignore_eos"):  # a bool, strictly
        client.completions.create(model="tiny", prompt=ids, max_tokens=6, extra_body={"ignore_eos": "yes"})


def test_priority_reaches_the_scheduler(app, monkeypatch):
    seen = []
    add = app["engine"].add_request

    def spy(*a, **kw):
        seen.append(kw.get("priority"))
        return add(*a, **kw)

    monkeypatch.setattr(app["engine"], "add_request", spy)
    client = oai(app)
    import openai

    with pytest.raises(openai.BadRequestError, match="--scheduling-policy priority"):  # fcfs: opt-in only
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2, extra_body={"priority": -3})
    monkeypatch.setattr(app["server"], "scheduling_policy", "priority")
    out = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2, extra_body={"priority": -3})
    assert out.usage.completion_tokens == 2 and seen == [-3]
    with pytest.raises(Exception, match="priority"):  # an int, strictly
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=2, extra_body={"priority": "high"})


def test_openai_completion_logprobs_stream_and_whole_agree(app):
    c = oai(app)
    kw = {"model": "tiny", "prompt": "The cat", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    whole = c.completions.create(**kw).choices[0]
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    assert sum((x.tokens for x in lps), []) == whole.logprobs.tokens and len(whole.logprobs.tokens) == 6
    assert sum((x.text_offset for x in lps), []) == whole.logprobs.text_offset
    assert all(len(t) == 3 for t in whole.logprobs.top_logprobs)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_streamed_text_equals_whole_text_with_a_cleanup_tokenizer(app):
    c = oai(app)
    for k in range(4):
        kw = {"model": "tiny", "prompt": f"Hello , world . I do n't know ' s {k}", "max_tokens": 40, "seed": k}
        whole = c.completions.create(**kw).choices[0].text
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))
        assert streamed == whole


# -- fault isolation ------------------------------------------------------------------------------------
MARK = 0.123  # the temperature of the request made to fail


@pytest.fixture
def broken_sampling(app, monkeypatch):
    """Sampling fails for the rows of requests with temperature MARK after their first ``after`` tokens (a row's
    own fault in the batched sampler, as a failing generator would be)."""
    real, seen, engine = skipray.core.sampling._draw, {"n": 0, "after": 0}, app["engine"]

    def draw(x, params, generators, to_device):
        drawn, ok, errors = real(x, params, generators, to_device)
        for j, p in enumerate(params):
            if p.temperature == MARK:
                seen["n"] += 1
                if seen["n"] > seen["after"]:
                    seen["batch"] = max(seen.get("batch", 0), engine.num_running)
                    errors[j] = FloatingPointError("injected sampling fault")
        return drawn, ok, errors

    monkeypatch.setattr(skipray.core.sampling, "_draw", draw)
    return seen


def test_a_failing_request_ends_alone_and_its_batch_mate_finishes(app, broken_sampling, caplog):
    import requests

    base, res = app["base"], {}
    good = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    want = requests.post(f"{base}/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]

    def run_good():
        res["good"] = requests.post(f"{base}/v1/completions", json=good, timeout=60)

    t = threading.Thread(target=run_good)
    t.start()
    deadline = time.time() + 60
    while not app["engine"].num_running and t.is_alive() and time.time() < deadline:
        time.sleep(0.001)
    broken_sampling["after"] = 3
    with caplog.at_level(logging.WARNING):
        bad = requests.post(
            f"{base}/v1/completions",
            timeout=60,
            json={"model": "tiny", "prompt": "x", "max_tokens": 50, "temperature": MARK},
        )
        broken_sampling["n"] = 0
        with requests.post(
            f"{base}/v1/completions",
            timeout=60,
            stream=True,
            json={"model": "tiny", "prompt": "y", "max_tokens": 50, "temperature": MARK, "stream": True},
        ) as r:
            assert r.status_code == 200  # its first tokens were fine: the stream began
            lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln]
    t.join()
    # a server fault: a generic message with the request id; the cause goes to the log only
    msg = bad.json()["error"]["message"]
    assert bad.status_code == 500 and "injected" not in msg and bad.headers["x-request-id"] in msg
    assert '"error"' in lines[-2] and "injected" not in lines[-2] and lines[-1] == "data: [DONE]"
    assert res["good"].status_code == 200 and res["good"].json()["choices"][0]["text"] == want
    assert "injected sampling fault" in caplog.text
    assert broken_sampling["batch"] >= 2  # the failing request had a batch-mate when it failed


def test_a_failing_engine_step_answers_every_request_at_once(app, monkeypatch, caplog):
    import openai
    import requests

    engine, base, calls = app["engine"], app["base"], {"n": 0}
    real_step = engine.step

    def step():  # fails once, when all four requests are decoding and have had their first token
        if not calls["n"] and engine.num_running == 4 and all(r.generated for r in engine.scheduler.live):
            calls["n"] += 1
            raise RuntimeError("injected loop fault")
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    results = {}

    def call(k):
        results[k] = requests.post(
            f"{base}/v1/completions",
            timeout=30,
            json={"model": "tiny", "prompt": f"p{k}", "max_tokens": 100, "temperature": 0},
        )

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    with caplog.at_level(logging.ERROR):
        for t in threads:
            t.start()
        with pytest.raises(openai.APIError, match="the server failed to answer this request"):
            for _ in oai(app).completions.create(model="tiny", prompt="s", max_tokens=100, stream=True):
                pass
        for t in threads:
            t.join()
    assert {k: r.status_code for k, r in results.items()} == {0: 500, 1: 500, 2: 500}
    assert all(
        r.json()["error"]["code"] == "engine_failed" and "injected" not in r.json()["error"]["message"]
        for r in results.values()
    )
    assert "engine loop step failed" in caplog.text
    ok = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "after", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and engine.num_running == 0  # the loop serves on


# -- vLLM's sampling controls ----------------------------------------------------------------------------
def test_sampling_controls_reach_the_engine(app):
    import requests

    base, ids = app["base"], [5, 6, 7, 8]
    _, out = engine_text(app, ids, 6)
    first = out.token_ids[0]

    def complete(**kw):
        body = {"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 1, **kw}
        r = requests.post(f"{base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    plain = complete()
    assert complete(logit_bias={str(first): -100})["logprobs"]["tokens"][0] != plain["logprobs"]["tokens"][0]
    stopped = complete(stop_token_ids=[out.token_ids[1]])
    assert stopped["finish_reason"] == "stop" and len(stopped["logprobs"]["tokens"]) == 2
    assert complete(stop_token_ids=[out.token_ids[1]], min_tokens=4)["finish_reason"] == "length"
    word = app["tok"].decode([first]).strip()
    if word:
        assert complete(bad_words=[word])["logprobs"]["tokens"][0] != plain["logprobs"]["tokens"][0]
    strict = complete(repetition_penalty=1e6, max_tokens=12)["logprobs"]["tokens"]
    assert len(set(strict)) == len(strict)  # nothing of the prompt or the output repeats
    assert complete(presence_penalty=2.0, frequency_penalty=2.0, min_p=0.5)["finish_reason"] in ("stop", "length")


def test_include_stop_str_and_continuous_usage(app):
    import json

    import requests

    base = app["base"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    text = requests.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = requests.post(f"{base}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
        kept = requests.post(
            f"{base}/v1/completions", json={**body, "stop": [stop], "include_stop_str_in_output": True}, timeout=60
        ).json()
        assert kept["choices"][0]["text"] == cut["choices"][0]["text"] + stop
    with requests.post(
        f"{base}/v1/completions",
        json={**body, "stream": True, "stream_options": {"continuous_usage_stats": True}},
        timeout=60,
        stream=True,
    ) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts and counts == sorted(counts) and counts[-1] == chunks[-1]["usage"]["completion_tokens"]


def test_guidellm_request_shapes_are_answered(app):
    """guidellm 0.8.1's default requests (bench/bench_guidellm.py runs the real client): streaming chat and
    completions with ``stream_options`` {include_usage, continuous_usage_stats}, ``ignore_eos``, ``stop: null``,
    ``max_completion_tokens`` and text content parts, as its ``openai_http`` backend sends them; it reads the
    usage of every chunk and the last usage-only chunk."""
    import json

    import requests

    base = app["base"]
    assert requests.get(f"{base}/health", timeout=30).status_code == 200  # its backend check
    assert "tiny" in [m["id"] for m in requests.get(f"{base}/v1/models", timeout=30).json()["data"]]
    stream = {
        "model": "tiny",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "stop": None,
        "ignore_eos": True,
    }
    words = "Finish medical want almost away until. Its culture song reveal return finally affect."
    bodies = {
        "chat/completions": {
            **stream,
            "max_completion_tokens": 7,
            "messages": [{"role": "user", "content": [{"type": "text", "text": words}]}],
        },
        "completions": {**stream, "max_tokens": 7, "prompt": words},
    }
    for route, body in bodies.items():
        with requests.post(f"{base}/v1/{route}", json=body, stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert all("usage" in c and c["usage"] for c in chunks), route  # continuous usage: in every chunk
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 7, route  # ignore_eos: all 7
        assert last["usage"]["prompt_tokens"] > 0
        finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
        assert finish == ["length"], route


# -- structured output ---------------------------------------------------------------------------------------
class Answer(BaseModel):
    ok: bool
    tag: Literal["red", "green", "blue"]
    n: int = Field(ge=0, le=9)


def test_openai_parse_with_a_pydantic_model(app):
    r = oai(app).chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "Answer."}],
        response_format=Answer,
        max_tokens=60,
        temperature=1.0,
        seed=3,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Answer)


def test_langchain_with_structured_output_json_schema(app):
    llm = chat_model(app, max_tokens=60, temperature=1.0, seed=4).with_structured_output(Answer, method="json_schema")
    assert isinstance(llm.invoke("Answer."), Answer)


def test_structured_outputs_regex_choice_and_invalid_specs(app):
    import re

    import requests

    def chat(**kw):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 30, **kw}
        return requests.post(f"{app['base']}/v1/chat/completions", json=body, timeout=60)

    r = chat(structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and re.fullmatch("[0-9]{3}-[a-z]{2}", r["message"]["content"])
    r = chat(guided_choice=["positive", "negative"], temperature=1.0, seed=2).json()["choices"][0]
    assert r["message"]["content"] in ("positive", "negative")
    bad = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    assert bad.json()["error"]["code"] == "invalid_structured_output"
    assert chat(structured_outputs={"regex": "(unclosed"}).status_code == 400
    two = chat(guided_regex="a", structured_outputs={"regex": "b"})
    assert two.status_code == 400 and "once" in two.json()["error"]["message"]


def test_chat_template_extensions(app):
    import requests

    def chat(**kw):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
            "max_tokens": 2,
            **kw,
        }
        return requests.post(f"{app['base']}/v1/chat/completions", json=body, timeout=60)

    usual = chat().json()["usage"]["prompt_tokens"]
    cont = chat(continue_final_message=True).json()["usage"]["prompt_tokens"]
    assert cont < usual  # the last message stays open: no end of turn, no new assistant header
    assert chat(chat_template_kwargs={"enable_thinking": False}).status_code == 200  # the template's own variables
    bad = chat(chat_template_kwargs={"tokenize": True})
    assert bad.status_code == 400 and "chat_template_kwargs" in bad.json()["error"]["message"]
    both = chat(add_generation_prompt=True, continue_final_message=True)
    assert both.status_code == 400


def test_n_choices_are_seeded_requests_and_stream_like_the_whole_reply(app):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Go"}], max_tokens=8, temperature=1.0)
    many = oai(app).chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, c in enumerate(many.choices):  # choice i is the request seeded seed + i
        alone = oai(app).chat.completions.create(seed=11 + i, **kw)
        assert c.message.content == alone.choices[0].message.content
    finished = [c.finish_reason for c in many.choices]
    assert many.usage.completion_tokens <= 24 and (finished != ["length"] * 3 or many.usage.completion_tokens == 24)
    texts: dict[int, str] = {}
    for chunk in oai(app).chat.completions.create(n=3, seed=11, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert [texts[i] for i in range(3)] == [c.message.content for c in many.choices]
    comp = oai(app).completions.create(model="tiny", prompt="Once", n=2, max_tokens=5, temperature=1.0, seed=3)
    assert [c.index for c in comp.choices] == [0, 1] and comp.usage.completion_tokens == 10
    import requests

    r = requests.post(f"{app['base']}/v1/chat/completions", json={**kw, "n": 17}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_chat_echo_and_truncate_prompt_tokens(app):
    import requests

    def post(route, **kw):
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0, **kw}
        return requests.post(f"{app['base']}/v1/{route}", json=body, timeout=60)

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    plain = post("chat/completions", messages=msgs, continue_final_message=True).json()["choices"][0]
    echoed = post("chat/completions", messages=msgs, continue_final_message=True, echo=True).json()["choices"][0]
    assert echoed["message"]["content"] == "Hel" + plain["message"]["content"]
    streamed = ""
    with requests.post(
        f"{app['base']}/v1/chat/completions",
        json={
            "model": "tiny",
            "max_tokens": 4,
            "temperature": 0,
            "messages": msgs,
            "continue_final_message": True,
            "echo": True,
            "stream": True,
        },
        stream=True,
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                import json

                for c in json.loads(line[6:])["choices"]:
                    streamed += c["delta"].get("content") or ""
    assert streamed == echoed["message"]["content"]
    user_last = post("chat/completions", messages=msgs[:1], echo=True).json()["choices"][0]["message"]["content"]
    assert user_last == post("chat/completions", messages=msgs[:1]).json()["choices"][0]["message"]["content"]
    full = post("completions", prompt="one two three four five six").json()["usage"]["prompt_tokens"]
    cut = post("completions", prompt="one two three four five six", truncate_prompt_tokens=3, echo=True).json()
    assert cut["usage"]["prompt_tokens"] == 3 < full
    assert cut["choices"][0]["text"].startswith(
        app["tok"].decode(app["tok"]("one two three four five six")["input_ids"][-3:])
    )
    assert post("completions", prompt="x y", truncate_prompt_tokens=-1).status_code == 200
    bad = post("completions", prompt="x", truncate_prompt_tokens=0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs_and_echo_with_logprobs(app):
    """vLLM's ``prompt_logprobs`` (each prompt token's log-prob at full depth, its rank and the top ones) and
    completions' ``echo`` with ``logprobs`` (how lm-eval-harness scores a text) equal the model's log-softmax."""
    import json

    import requests
    import torch

    text = "one two three four"
    ids = app["tok"](text)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(app["model"].hf(torch.tensor([ids])).logits[0].float(), -1)
    want = [lp[j - 1, t].item() for j, t in enumerate(ids) if j]
    ranks = [int((lp[j - 1] > lp[j - 1, t]).sum()) + 1 for j, t in enumerate(ids) if j]

    def post(route, **kw):
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0, **kw}
        return requests.post(f"{app['base']}/v1/{route}", json=body, timeout=60)

    r = post("completions", prompt=text, echo=True, logprobs=2).json()["choices"][0]
    got = r["logprobs"]["token_logprobs"]
    assert got[0] is None and got[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert len(got) == len(ids) + 1 and r["logprobs"]["top_logprobs"][0] is None
    assert all(len(t) == 2 for t in r["logprobs"]["top_logprobs"][1:])
    assert r["text"].startswith(text)
    plp = r["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for j, d in enumerate(plp[1:], 1):
        own = d[str(ids[j])]
        assert own["logprob"] == pytest.approx(want[j - 1], abs=1e-4) and own["rank"] == ranks[j - 1]
    chat = post("chat/completions", messages=[{"role": "user", "content": "Hi"}], prompt_logprobs=0).json()
    entries = chat["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and all(len(d) == 1 for d in entries[1:])  # only the prompt's own token
    first = None
    with requests.post(
        f"{app['base']}/v1/completions",
        json={"model": "tiny", "prompt": text, "max_tokens": 2, "prompt_logprobs": 1, "stream": True},
        stream=True,
        timeout=60,
    ) as s:
        for line in s.iter_lines():
            if line.startswith(b"data: {"):
                first = json.loads(line[6:])["choices"][0]
                break
    assert first["prompt_logprobs"][1][str(ids[1])]["logprob"] == pytest.approx(want[0], abs=1e-4)
    assert post("completions", prompt=text, prompt_logprobs=21).status_code == 400
