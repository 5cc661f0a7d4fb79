"""Structured output (skipray.structured, llguidance): JSON schemas, regexes, choices and grammars constrain
each row in the batched sampler; rows with and without a grammar, and at different skip depths, share a
batch; every answer that stops parses and validates; invalid specs are refused naming the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from skipray.core.engine import Engine
from skipray.core.requests import SamplingParams
from skipray.core.schedule import SkipSchedule

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from skipray.loading import load
    from skipray.structured import Constraints

    m = load(str(tiny_dir), device="cpu")
    return m, Constraints(m.tokenizer, m.model.vocab_size, m.eos_token_ids)


def generate(m, params, prompts, schedules=None):
    eng = Engine(m.model, max_batch=4, max_len=96, eos_token_ids=m.eos_token_ids)
    return eng.generate(prompts, params, schedules)


def test_json_schema_rows_parse_and_validate_beside_free_rows(loaded):
    m, con = loaded
    tok = m.tokenizer
    prompts = [tok.encode(f"Give me JSON number {i}:") for i in range(4)]
    js = SamplingParams(max_tokens=40, temperature=1.0, seed=5, structured=con.for_spec({"json": SCHEMA}))
    free = SamplingParams(max_tokens=10)
    L = m.model.num_layers
    scheds = [SkipSchedule(L, L, 2, 4, warmup_layers=1), None, SkipSchedule.full(L), None]
    outs = generate(m, [js, free, js, free], prompts, scheds)
    for c in (outs[0], outs[2]):
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(tok.decode(c.token_ids, skip_special_tokens=True)), SCHEMA)
    assert outs[1].finish_reason in ("stop", "length") and outs[3].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "spec,check",
    [
        ({"regex": r"[a-c]{2,4}x"}, lambda s: re.fullmatch(r"[a-c]{2,4}x", s)),
        ({"choice": ["alpha", "beta gamma"]}, lambda s: s in ("alpha", "beta gamma")),
        ({"grammar": 'start: "yes" | "no" | "n/a"'}, lambda s: s in ("yes", "no", "n/a")),
        ({"json": {"type": "object"}}, lambda s: isinstance(json.loads(s), dict)),
    ],
)
def test_regex_choice_grammar_and_json_object(loaded, spec, check):
    m, con = loaded
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=1, structured=con.for_spec(spec))
    for c in generate(m, params, [[5, 6, 7], [8, 9]]):
        text = m.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finish_reason == "stop" and check(text), (spec, text)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"json": {"type": "nonsense"}}, "invalid structured output"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"regex": "(unclosed"}, "invalid structured output"),
        ({"choice": []}, "non-empty list"),
        ({"json": {}, "regex": "a"}, "exactly one"),
    ],
)
def test_invalid_specs_are_refused_naming_the_problem(loaded, spec, match):
    _, con = loaded
    with pytest.raises(ValueError, match=match):
        con.for_spec(spec)


from test_batch import tiny_dir  # noqa: E402,F401  (fixture)


def test_batch_rows_with_json_schemas(tmp_path, tiny_dir, ray_local):
    """A Parquet file whose rows each carry a JSON schema (Ray Data LLM's guided_decoding and vLLM's
    structured_outputs), beside rows without one: every row that stops parses and validates; an invalid
    schema is an error row naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_batch import config, read_out

    from skipray import batch

    small = {
        "type": "object",
        "properties": {"v": {"type": "boolean"}},
        "required": ["v"],
        "additionalProperties": False,
    }
    rows = [
        {
            "id": f"j{i}",
            "prompt": f"JSON please {i}",
            "sampling_params": {
                "max_tokens": 40,
                "temperature": 1.0,
                "seed": i,
                ("guided_decoding" if i % 2 else "structured_outputs"): {
                    "json": json.dumps(SCHEMA if i % 3 else small)
                },
            },
        }
        for i in range(6)
    ]
    rows += [
        {"id": "free", "prompt": "anything", "sampling_params": {"max_tokens": 6}},
        {"id": "bad", "prompt": "x", "sampling_params": {"guided_decoding": {"json": '{"type": "nope"}'}}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    s = batch.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config(tiny_dir, max_new_tokens=40))
    out = {r["id"]: r for r in read_out(tmp_path / "out").to_pylist()}
    assert s.rows == 8 and "invalid structured output" in out["bad"]["error"]
    for i in range(6):
        r = out[f"j{i}"]
        assert r["error"] is None and r["finish_reason"] == "stop", r
        jsonschema.validate(json.loads(r["generated_text"]), SCHEMA if i % 3 else small)
    assert out["free"]["error"] is None
