"""OpenAI batch files (JSON lines of custom_id/method/url/body) in, OpenAI batch output lines out.

The mapping of a line onto a batch row, every kind of bad line, the output line shapes (bodies checked with
the ``openai`` package's own models), prompt log-probs in batch rows, and resume keyed by ``custom_id``.
Tests marked ``ray_local`` run the job on the session's local Ray; the rest need no Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import moto_s3
from test_batch import config, prompts, tiny_dir, write  # noqa: F401  (tiny_dir: fixture)

from skipray import batch
from skipray.batch import openai_batch as ob
from skipray.batch import openai_output as oo
from skipray.batch.output import MANIFEST, QUARANTINE, OutputError


def chat(cid: str | None, content: str = "Hello there", **body) -> dict:
    line = {"method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {"model": "any", "messages": [{"role": "user", "content": content}], **body}
    return line if cid is None else {"custom_id": cid, **line}


def completion(cid: str, prompt: str = "Once upon a time", **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "any", "prompt": prompt, **body},
    }


def write_lines(path: Path, lines: list, blank: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_text(text.replace("\n", "\n\n", 2) if blank else text)
    return path


def out_lines(out: Path) -> list[dict]:
    """Every line of the job's own output files under ``out``."""
    return [json.loads(x) for f in sorted(out.glob("skipray-*.jsonl")) for x in f.read_text().splitlines()]


def by_id(lines: list[dict]) -> dict:
    return {x["custom_id"]: x for x in lines}


def generated(tmp_path: Path, lines: list, model: Path, **kw) -> list[dict]:
    """The job's steps over ``lines`` without Ray: plan, read, tokenize, the actor, the output lines."""
    from skipray.batch.actor import SkipDecodeEngineStage

    inp = write_lines(tmp_path / "in.jsonl", lines)
    p = batch.plan(str(inp), str(tmp_path / "out"), config(model, **kw))
    block = ob.read_lines(pa.Table.from_pylist(p.units), None)
    rows = SkipDecodeEngineStage(p.processor.actor_spec)(batch.prepare_rows(block, p.processor.row_context))
    ctx = oo.LineContext(p.processor.row_context.tokenizer, str(model), "fp")
    return [json.loads(x) for x in oo.to_lines(rows, ctx).column("line").to_pylist()]


# -- a line as a batch row (no model) ------------------------------------------------------------------
def test_a_body_maps_onto_the_batch_row_fields_it_sets():
    row = ob.request_row(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}],
            "max_tokens": 9,
            "max_completion_tokens": 5,  # OpenAI's current name wins
            "temperature": 0.5,
            "stop": "\n",
            "logprobs": True,
            "top_logprobs": 3,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
            "logit_bias": {"7": 2.0},
            "skip": {"max_layers": 3},
            "user": "ignored",
        },
        chat=True,
    )
    assert row["messages"] == [{"role": "system", "content": "Be brief."}] and row["prompt"] is None
    sp = row["sampling_params"]
    assert sp == {
        "max_tokens": 5,
        "temperature": 0.5,
        "stop": ["\n"],
        "logprobs": 3,
        "logit_bias": {"7": 2.0},
        "structured_outputs": {"json": '{"type": "object"}'},
    }  # top_p, seed, ... not set: the job's flags
    assert row["skip"] == {"full": False, "max_layers": 3}
    row = ob.request_row({"model": "m", "prompt": ["one prompt"], "logprobs": 0, "prompt_logprobs": 2}, chat=False)
    assert row["prompt"] == "one prompt" and row["sampling_params"] == {"logprobs": 0, "prompt_logprobs": 2}
    table = ob._table([{**{f.name: None for f in ob.ROW_SCHEMA}, **row}])  # every value fits its column
    assert table.column("sampling_params").to_pylist()[0]["prompt_logprobs"] == 2


@pytest.mark.parametrize(
    "raw,code,status",
    [
        (b"{not json", "invalid_json", 0),
        (b"[1, 2]", "invalid_line", 0),
        (json.dumps(chat(None)).encode(), "missing_custom_id", 0),
        (json.dumps({**chat("a"), "custom_id": 7}).encode(), "missing_custom_id", 0),
        (json.dumps({**chat("a"), "method": "GET"}).encode(), "invalid_method", 0),
        (json.dumps({**chat("a"), "url": "/v1/embeddings"}).encode(), "invalid_url", 0),
        (json.dumps({**chat("a"), "body": "text"}).encode(), "invalid_body", 0),
        (json.dumps(chat("a", n=2)).encode(), "unsupported_parameter", 400),
        (json.dumps(chat("a", stream=True)).encode(), "unsupported_parameter", 400),
        (
            json.dumps(chat("a", tools=[{"type": "function", "function": {"name": "f"}}])).encode(),
            "unsupported_parameter",
            400,
        ),
        (json.dumps(chat("a", temperature=3)).encode(), "invalid_value", 400),
        (json.dumps(chat("a", top_k=10**30)).encode(), "invalid_value", 400),
        (json.dumps(chat("a", best_of=2)).encode(), "unsupported_parameter", 400),
        (json.dumps(completion("a", prompt=[1, 2, 3])).encode(), "unsupported_parameter", 400),
        (json.dumps(completion("a", echo=True)).encode(), "unsupported_parameter", 400),
        (json.dumps({**completion("a"), "body": {"prompt": "no model"}}).encode(), "invalid_value", 400),
        (b"[" * 100 + b"]" * 100, "json_too_deep", 0),
        (b'{"custom_id": "\xff", "body": 1}', "invalid_json", 0),  # not UTF-8
    ],
)
def test_every_bad_line_is_an_error_row_naming_its_problem(raw, code, status):
    r = ob.line_row(raw, False, "in.jsonl", 3, 4)
    assert (r[ob.CODE], r[ob.STATUS]) == (code, status), r
    assert r[batch.rows.PRE_ERROR] and (status or r[batch.rows.PRE_ERROR].startswith("line 4 of in.jsonl: "))
    ob._table([r])  # storable
    dup = ob.line_row(json.dumps(chat("a")).encode(), True, "in.jsonl", 0, 1)
    assert dup[ob.CODE] == "duplicate_custom_id" and dup["id"] == "a"


def test_scan_finds_custom_ids_runs_and_byte_ranges(tmp_path, monkeypatch):
    lines = [chat("a"), "garbage", chat(None), chat("b"), chat("a"), completion("c")]
    path = write_lines(tmp_path / "d" / "x.jsonl", lines, blank=True)
    write_lines(tmp_path / "d" / "_tmp" / "y.jsonl", [chat("z")])  # hidden: never read
    monkeypatch.setattr(ob, "LINES_PER_UNIT", 4)
    assert ob.input_format(str(tmp_path / "d"), None) == "openai-batch" == ob.input_format(str(path), None)
    check = ob.check_input(str(tmp_path / "d"), None)
    assert check.files == [str(path)] and check.row_groups == [[4, 2]]
    assert check.ids.to_pylist() == ["a", None, None, "b", "a", "c"] and check.duplicate_ids.to_pylist() == ["a"]
    rows = ob.read_lines(pa.Table.from_pylist(batch.resume.plan_units(check, batch.resume.Done(None), None)[0]), None)
    assert rows.column("source_row").to_pylist() == list(range(6))
    msgs = rows.column(batch.rows.PRE_ERROR).to_pylist()
    assert msgs[1].startswith("line 3 of") and msgs[2].startswith("line 5 of")  # blank lines counted as lines
    assert rows.column(ob.CODE).to_pylist() == [
        "duplicate_custom_id",
        "invalid_json",
        "missing_custom_id",
        None,
        "duplicate_custom_id",
        None,
    ]
    write(tmp_path / "d" / "p.parquet", prompts(1))
    with pytest.raises(batch.InputError, match="both .jsonl and .parquet"):
        ob.input_format(str(tmp_path / "d"), None)
    assert ob.input_format(str(tmp_path / "d"), None, "parquet") == "parquet"


# -- output lines (tiny model, no Ray) -----------------------------------------------------------------
def test_output_lines_are_openai_batch_output(tmp_path, tiny_dir):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    lines = [
        chat("chat", max_tokens=4, logprobs=True, top_logprobs=2),
        completion("text", max_tokens=3, logprobs=1, prompt_logprobs=2, seed=5, temperature=0.8),
        chat("long", content="word " * 200, max_tokens=4),
        chat("n2", n=2),
        "not json",
    ]
    out = generated(tmp_path, lines, tiny_dir)
    assert len(out) == 5 and all(x["id"].startswith("batch_req_") and len(x["id"]) == 34 for x in out)
    got = by_id(out)
    c = got["chat"]
    assert c["error"] is None and c["response"]["status_code"] == 200 and c["response"]["request_id"].startswith("req_")
    body = ChatCompletion.model_validate(c["response"]["body"])
    assert body.object == "chat.completion" and body.model == str(tiny_dir) and len(body.choices) == 1
    assert body.usage.completion_tokens == 4 and c["response"]["body"]["usage"]["avg_layers"] > 0
    assert len(body.choices[0].logprobs.content) == 4 and len(body.choices[0].logprobs.content[0].top_logprobs) == 2
    t = got["text"]["response"]["body"]
    choice = Completion.model_validate(t).choices[0]
    assert t["object"] == "text_completion" and len(choice.logprobs.tokens) == 3
    plp = t["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and all(len(d) in (2, 3) for d in plp[1:])  # the prompt's token, and the top 2
    assert all({"logprob", "rank", "decoded_token"} == set(v) for d in plp[1:] for v in d.values())
    long = got["long"]
    assert long["response"]["status_code"] == 400 and long["error"]["code"] == "context_length_exceeded"
    assert long["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert (
        got["n2"]["error"]["code"] == "unsupported_parameter" and got["n2"]["response"]["body"]["error"]["param"] == "n"
    )
    bad = got[None]
    assert bad["response"] is None and bad["error"]["code"] == "invalid_json" and "line 5" in bad["error"]["message"]


def test_engine_faults_are_500_lines_that_a_rerun_redoes(tmp_path, tiny_dir):
    """A row the engine fails on after its retries is a 500 line with code ``engine_error``: counted as an engine
    error by the summary and not done for resume."""
    from skipray.batch.actor import SkipDecodeEngineStage

    inp = write_lines(tmp_path / "in.jsonl", [chat("a", max_tokens=2), completion("b", max_tokens=2)])
    p = batch.plan(str(inp), str(tmp_path / "out"), config(tiny_dir, engine_retries=0))
    block = batch.prepare_rows(ob.read_lines(pa.Table.from_pylist(p.units), None), p.processor.row_context)
    gen = SkipDecodeEngineStage(p.processor.actor_spec)

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory (injected by the test)")

    gen.m.model.embed = oom
    ctx = oo.LineContext(p.processor.row_context.tokenizer, "m", "fp")
    lines = oo.to_lines(gen(block), ctx).column("line").to_pylist()
    (tmp_path / "out").mkdir()
    part = tmp_path / "out" / f"skipray-{'a' * 32}_000000.jsonl"
    part.write_text("".join(x + "\n" for x in lines))
    for x in map(json.loads, lines):
        assert x["response"]["status_code"] == 500 and x["error"]["code"] == "engine_error"
        assert x["response"]["body"]["error"]["type"] == "server_error"
    s = oo.summarize([str(part)], None, 1.0, 0)
    assert (s.rows, s.errors, s.engine_errors) == (2, 2, 2)
    done = oo.read_done([str(part)], None, p.check, None)
    assert done.ids is None and done.engine_files == [str(part)]


def test_prompt_logprobs_column_in_batch_rows(tiny_dir):
    """``sampling_params.prompt_logprobs`` k: the row's ``prompt_logprobs`` holds null for the first prompt token,
    then each prompt token's id, log-prob and rank and the k most likely tokens; rows without it hold null."""
    from skipray.batch.actor import SkipDecodeEngineStage
    from skipray.batch.params import PROMPT_LOGPROBS_TYPE
    from skipray.batch.rows import TOKENS

    proc = batch.SkipDecodeProcessor(batch.SkipDecodeProcessorConfig(model_source=str(tiny_dir)))
    rows = [
        {"prompt": "Tell me a story", "sampling_params": {"max_tokens": 2, "prompt_logprobs": 3}},
        {"prompt": "Hi", "sampling_params": {"max_tokens": 2}},
        {"prompt": "Hi", "sampling_params": {"max_tokens": 2, "prompt_logprobs": 21}},
    ]
    block = batch.prepare_rows(pa.Table.from_pylist(rows), proc.row_context)
    prompt = block.column(TOKENS).to_pylist()[0]
    out = SkipDecodeEngineStage(proc.actor_spec)(block)
    assert out.schema.field("prompt_logprobs").type == PROMPT_LOGPROBS_TYPE
    first, none, bad = out.to_pylist()
    plp = first["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None and [e["token_id"] for e in plp[1:]] == prompt[1:]
    for e in plp[1:]:
        tops = e["top_logprobs"]
        assert len(tops) == 3 and tops[0]["logprob"] >= tops[2]["logprob"] and e["rank"] >= 1 and e["logprob"] <= 0
    assert none["prompt_logprobs"] is None and none["error"] is None
    assert "prompt_logprobs" in bad["error"] and bad["prompt_logprobs"] is None


# -- the output directory (no Ray) ---------------------------------------------------------------------
def test_resume_state_and_supersede_by_custom_id(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [chat("x"), chat("y"), chat(None), chat("z")])
    check = ob.check_input(str(inp), None)
    nul = oo.line_hash(str(inp), 2, None)
    engine = {"code": oo.ENGINE_CODE, "message": "engine fault: OOM"}
    a = tmp_path / "out" / "skipray-a.jsonl"
    a.parent.mkdir()
    a.write_text(
        json.dumps({"id": "batch_req_1", "custom_id": "x", "response": None, "error": engine})
        + "\n"
        + json.dumps({"id": "batch_req_2", "custom_id": "y", "response": {"status_code": 200}, "error": None})
        + "\n"
        + json.dumps({"id": f"batch_req_{nul}", "custom_id": None, "response": None, "error": {"code": "x"}})
        + "\n"
    )
    b = tmp_path / "out" / "skipray-b.jsonl"
    b.write_text(json.dumps({"id": "batch_req_3", "custom_id": "x", "response": None, "error": None}) + "\n")
    done = oo.read_done([str(a)], None, check, None)
    assert done.ids.to_pylist() == ["y"] and done.null_positions == {(str(inp), 2)} and done.engine_files == [str(a)]
    units, pending = batch.resume.plan_units(check, done, None)
    assert pending == 2  # x (an engine error: redone) and z
    assert oo.supersede(None, str(tmp_path / "out"), done, [str(b)]) == 1
    left = [json.loads(x)["custom_id"] for f in (a, b) for x in f.read_text().splitlines()]
    assert sorted(left, key=str) == [None, "x", "y"]
    a.write_text("")
    assert batch.output.inspect(None, [str(a), str(b)]) == [str(a)]
    a.write_text('{"id": "batch_req_1", "custom_id": "x"')  # no newline at the end: cut short
    assert batch.output.inspect(None, [str(a), str(b)]) == [str(a)]


def test_an_output_holds_one_format_and_row_flags_do_not_apply(tmp_path, tiny_dir):
    write_lines(tmp_path / "in.jsonl", [chat("a")])
    write(tmp_path / "in.parquet", prompts(1))
    out = tmp_path / "out"
    out.mkdir()
    from skipray.batch.job import manifest_for
    from skipray.batch.output import write_text

    write_text(None, str(out / MANIFEST), manifest_for(str(tmp_path / "in.parquet"), config(tiny_dir)).to_json())
    with pytest.raises(OutputError, match="holds parquet results and this job writes openai-batch"):
        batch.plan(str(tmp_path / "in.jsonl"), str(out), config(tiny_dir, allow_changed_settings=True))
    with pytest.raises(batch.InputError, match="--chat: not for OpenAI batch files"):
        batch.plan(str(tmp_path / "in.jsonl"), str(tmp_path / "o2"), config(tiny_dir, chat=True))
    with pytest.raises(batch.InputError, match="overlap"):
        batch.plan(str(tmp_path / "**" / "*.jsonl"), str(tmp_path / "o3"), config(tiny_dir))
    p = batch.plan(str(tmp_path / "in.jsonl"), str(tmp_path / "o4"), config(tiny_dir, input_format="openai-batch"))
    assert p.lines and p.pending == 1 and p.claim.manifest.format == "openai-batch"


# -- the job on Ray --------------------------------------------------------------------------------------
def lost(line: dict) -> bool:
    """The lines the resume test drops from the output: two requests and the line that is not JSON."""
    return line["custom_id"] in ("c1", "t0") or (line["error"] or {}).get("code") == "invalid_json"


@pytest.mark.ray
def test_openai_batch_job_resumes_each_custom_id_exactly_once(ray_local, tmp_path, tiny_dir):
    lines = [chat(f"c{i}", max_tokens=3) for i in range(6)] + [completion(f"t{i}", max_tokens=3) for i in range(4)]
    bad = ["{oops", chat(None), chat("dup"), chat("dup"), chat("n", n=3)]
    write_lines(tmp_path / "in" / "a.jsonl", lines[:7] + bad)
    cfg = config(tiny_dir, max_new_tokens=3)
    s1 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s1.rows, s1.errors, s1.engine_errors) == (12, 5, 0) and 0 < s1.generated_tokens <= 21
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["format"] == "openai-batch"
    for f in (tmp_path / "out").glob("skipray-*.jsonl"):  # lines lost (as if never written): they are redone
        kept = [x for x in f.read_text().splitlines() if not lost(json.loads(x))]
        f.write_text("".join(x + "\n" for x in kept))
    for k, text in ((7, '{"id": "cut'), (9, "")):  # files of the job's own that a crash cut short
        (tmp_path / "out" / f"skipray-{k:032x}_{k:06}.jsonl").write_text(text)
    write_lines(tmp_path / "in" / "b.jsonl", lines[7:])  # the input grew
    s2 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s2.rows, s2.skipped) == (3 + 3, 12 - 3)
    assert len(list((tmp_path / "out" / QUARANTINE).iterdir())) == 2  # moved aside, never deleted
    got = out_lines(tmp_path / "out")
    ids = sorted(x["custom_id"] or "" for x in got)
    assert ids == sorted(["", "", "dup", "dup", "n"] + [f"c{i}" for i in range(6)] + [f"t{i}" for i in range(4)])
    assert len({x["id"] for x in got}) == len(got) == 15
    ok = [x for x in got if x["error"] is None]
    assert len(ok) == 10 and all(x["response"]["body"]["choices"][0]["finish_reason"] for x in ok)
    s3 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s3.rows, s3.skipped) == (0, 15)


@pytest.mark.ray
def test_openai_batch_files_on_s3(ray_local, tmp_path, tiny_dir, monkeypatch):
    with moto_s3(monkeypatch, buckets=["lines"]) as endpoint:
        s3, _ = batch.filesystem_for("s3://lines/x", endpoint)
        with s3.open_output_stream("lines/in/requests.jsonl") as f:
            f.write(("\n".join(json.dumps(chat(f"r{i}", max_tokens=2)) for i in range(5)) + "\n").encode())
        s = batch.run("s3://lines/in/", "s3://lines/out", config(tiny_dir), s3_endpoint=endpoint)
        assert (s.rows, s.errors) == (5, 0)
        from pyarrow import fs as pafs

        files = [i.path for i in s3.get_file_info(pafs.FileSelector("lines/out")) if i.path.endswith(".jsonl")]
        got = [json.loads(x) for f in files for x in s3.open_input_stream(f).read().decode().splitlines()]
        assert sorted(x["custom_id"] for x in got) == [f"r{i}" for i in range(5)]
        s2 = batch.run("s3://lines/in/", "s3://lines/out", config(tiny_dir), s3_endpoint=endpoint)
        assert (s2.rows, s2.skipped) == (0, 5)  # resumed
