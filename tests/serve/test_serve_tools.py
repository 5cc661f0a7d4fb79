"""Tool calling on the chat route (``skipray.serve.tools``): a named function or ``"required"`` constrains the
answer to the tools' schemas, so every ``tool_calls[].function.arguments`` parses and validates; ``"auto"``
needs a chat template that renders tools. The same in-process server as tests/serve/test_serve_openai.py."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import requests
from test_serve_openai import app, chat_model, oai  # noqa: F401 - the module's server fixture

from skipray.serve.tools import ToolPlan, tool_plan

LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch the light.",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
            "required": ["on", "color"],
            "additionalProperties": False,
        },
    },
}
DOOR = {
    "type": "function",
    "function": {
        "name": "open_door",
        "parameters": {
            "type": "object",
            "properties": {"which": {"enum": ["front", "back"]}},
            "required": ["which"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (LIGHT, DOOR)}


def chat(app, **kw):  # noqa: F811
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Lights!"}], "max_tokens": 60, **kw}
    return requests.post(f"{app['base']}/v1/chat/completions", json=body, timeout=60)


def check_calls(calls, names=None):
    assert calls, "no tool calls"
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        name = c["function"]["name"]
        assert names is None or name in names
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_named_function_arguments_parse_and_validate(app, seed):  # noqa: F811
    choice = {"type": "function", "function": {"name": "set_light"}}
    r = chat(app, tools=[LIGHT, DOOR], tool_choice=choice, temperature=1.0, seed=seed).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] is None
    check_calls(r["message"]["tool_calls"], {"set_light"})
    assert len(r["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_required_calls_one_or_more_tools_and_parallel_false_calls_one(app, seed):  # noqa: F811
    r = chat(app, tools=[LIGHT, DOOR], tool_choice="required", temperature=1.0, seed=seed).json()["choices"][0]
    assert r["finish_reason"] == "stop"
    check_calls(r["message"]["tool_calls"], {"set_light", "open_door"})
    one = chat(app, tools=[LIGHT, DOOR], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
    assert len(one.json()["choices"][0]["message"]["tool_calls"]) == 1


def test_streamed_tool_calls_equal_the_whole_reply(app):  # noqa: F811
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Door?"}],
        tools=[LIGHT, DOOR],
        tool_choice="required",
        max_tokens=60,
        temperature=1.0,
        seed=5,
    )
    whole = oai(app).chat.completions.create(**kw).choices[0].message.tool_calls
    got: dict[int, dict] = {}
    for chunk in oai(app).chat.completions.create(stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            e = got.setdefault(d.index, {"name": "", "arguments": ""})
            e["name"] += d.function.name or ""
            e["arguments"] += d.function.arguments or ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole] == [
        (e["name"], json.loads(e["arguments"])) for _, e in sorted(got.items())
    ]


def test_langchain_bind_tools_with_a_named_choice(app):  # noqa: F811
    import openai
    from pydantic import BaseModel, ConfigDict

    class set_light(BaseModel):  # noqa: N801 - the tool's name
        """Switch the light."""

        model_config = ConfigDict(extra="forbid")  # no other keys: a random tiny model finishes the JSON
        on: bool
        color: Literal["red", "green"]

    llm = chat_model(app, max_tokens=60, temperature=1.0, seed=7)
    out = llm.bind_tools([set_light], tool_choice="set_light").invoke("Lights!")
    assert out.tool_calls and out.tool_calls[0]["name"] == "set_light"
    set_light(**out.tool_calls[0]["args"])
    with pytest.raises(openai.BadRequestError, match="auto"):  # this chat template does not render tools
        llm.bind_tools([set_light]).invoke("Lights!")


def test_bad_tool_requests_are_400_naming_the_field(app):  # noqa: F811
    cases = [
        ({"tools": [LIGHT], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [LIGHT], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, None),
        ({"tools": [LIGHT], "tool_choice": "required", "response_format": {"type": "json_object"}}, None),
        ({"tools": [LIGHT]}, "tools"),  # auto, and the template does not render tools
        ({"tools": [LIGHT], "tool_choice": "auto"}, "tool_choice"),
    ]
    for extra, param in cases:
        r = chat(app, **extra)
        assert r.status_code == 400, (extra, r.text)
        assert param is None or r.json()["error"]["param"] == param
    assert chat(app, tools=[LIGHT], tool_choice="none", max_tokens=3).status_code == 200
    assert chat(app, tools=[], max_tokens=3).status_code == 200


def test_a_tool_conversation_reaches_the_template(app):  # noqa: F811
    messages = [
        {"role": "user", "content": "Lights!"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "set_light", "arguments": '{"on": true}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    r = chat(app, messages=messages, max_tokens=3)
    assert r.status_code == 200, r.text
    bad = [*messages[:1], {**messages[1], "tool_calls": [{"function": {"name": "x", "arguments": "{nope"}}]}]
    assert chat(app, messages=bad).status_code == 400


def test_auto_parses_hermes_tool_calls_and_keeps_plain_text():
    plan = tool_plan([LIGHT, DOOR], "auto", template_renders_tools=True)
    assert plan.mode == "auto" and plan.spec is None
    text = 'Sure.<tool_call>\n{"name": "open_door", "arguments": {"which": "back"}}\n</tool_call>'
    msg, finish = plan.message(text, "stop")
    assert finish == "tool_calls" and msg["content"] == "Sure."
    check_calls(msg["tool_calls"], {"open_door"})
    assert plan.message("No tools needed.", "stop") == ({"role": "assistant", "content": "No tools needed."}, "stop")
    cut = '{"on": tr'
    named = tool_plan([LIGHT], {"type": "function", "function": {"name": "set_light"}}, False)
    assert isinstance(named, ToolPlan)
    assert named.message(cut, "length") == ({"role": "assistant", "content": cut}, "length")
