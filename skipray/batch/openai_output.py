"""OpenAI batch files out: the file job's JSON-lines results, their writes and their resume (no Ray at import).

Contract:

* One output line per input request line: ``{"id": "batch_req_<h>", "custom_id", "response", "error"}``,
  OpenAI's batch output line (and vLLM's ``run-batch``'s). ``<h>`` hashes the line's input file, position
  and ``custom_id`` (``line_hash``), so a line's ids are the same whenever it is written. Lines come in no
  particular order: match them by ``custom_id``.
    * generated: ``response = {"status_code": 200, "request_id": "req_<h>", "body": ...}``, the body a
      ``chat.completion`` or ``text_completion`` object as the Serve app returns it
      (``skipray.serve.responses``: one choice, ``usage`` with ``avg_layers``, ``logprobs`` in the chat or
      the completions shape, vLLM's ``prompt_logprobs`` on the choice), ``model`` the job's ``--model``;
      ``error = null``;
    * a line that is no request (``openai_batch.STATUS`` 0): ``response = null``;
    * a refused request: ``status_code`` 400 and the Serve app's error object as the ``body`` (code
      ``context_length_exceeded`` for a prompt too long, ``invalid_value`` or the refusal's own code);
    * an engine fault: ``status_code`` 500, code ``engine_error``: not done, a re-run generates it again;
    * every failed line has ``error = {"code", "message"}``.
* ``to_lines(block, ctx)`` turns the processor's rows into a one-column (``line``) table. ``lines_sink``
  is the Ray Data datasink: each write task writes its lines as one file ``skipray-<write uuid>_<task>.jsonl``
  (``skipray.batch.output.JSONL_PATTERN``) with ``output.replace_bytes``: locally renamed into place, on S3
  one PUT, so a file is whole or absent; a retried task writes the same name again.
* Resume, as for Parquet (``skipray.batch.resume``): ``read_done`` -> ``Done``: the custom_ids of the lines
  that are not engine errors, and for lines without a ``custom_id`` their input positions (matched through
  their ``id``); ``supersede`` drops engine-error lines whose custom_id another line now holds, rewriting
  their file; ``summarize`` counts what a run wrote. A file that cannot be read stops the job
  (``OutputError``): nothing is moved or deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skipray.batch.files import InputCheck, Summary, map_files, uri
from skipray.batch.openai_batch import CHAT_URL, CODE, PARAM, STATUS, URL
from skipray.batch.output import OutputError, local, replace_bytes
from skipray.batch.resume import Done
from skipray.batch.rows import ERROR_KIND, ShippedTokenizer
from skipray.serve import protocol as P
from skipray.serve import responses as R

ENGINE_CODE = "engine_error"
_CODE = pa.struct([("code", pa.string())])
DONE_SCHEMA = pa.schema([("id", pa.string()), ("custom_id", pa.string()), ("error", _CODE)])
_USAGE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("avg_layers", pa.float64())])
SUMMARY_SCHEMA = pa.schema([("error", _CODE), ("response", pa.struct([("body", pa.struct([("usage", _USAGE)]))]))])


def line_hash(source_file: str, source_row: int, custom_id: str | None) -> str:
    """The 24 hex digits that name one input line's output (``id``, ``request_id``, the body's ``id``)."""
    key = f"{source_file}\x1f{source_row}\x1f{custom_id!r}".encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


@dataclass
class LineContext:
    """What ``to_lines`` needs, resolved in the driver."""

    tokenizer: ShippedTokenizer
    model: str  # the job's --model, each body's ``model``
    fingerprint: str  # the body's ``system_fingerprint``


# -- rows to lines -----------------------------------------------------------------------------------------
def _entries(tok, logprobs: list[dict]) -> list[R.TokenLogprob]:
    """The logprobs column's entries of one row as the Serve app's ``TokenLogprob`` s (token text and bytes)."""
    from skipray.text import token_bytes, token_strings

    ids = [i for e in logprobs for i in (e["token_id"], *(t["token_id"] for t in e["top_logprobs"] or ()))]
    named = iter(zip(token_strings(tok, ids), token_bytes(tok, ids)))
    out = []
    for e in logprobs:
        name, raw = next(named)
        top = [(n, t["logprob"], b) for t, (n, b) in zip(e["top_logprobs"] or (), named)]
        out.append(R.TokenLogprob(name, e["logprob"], top, raw))
    return out


def _top(tops: list[dict]) -> tuple[list[int], list[float]]:
    return [t["token_id"] for t in tops], [t["logprob"] for t in tops]


def _prompt_logprobs(tok, column: list[dict | None]) -> list[dict | None]:
    """The prompt_logprobs column of one row in vLLM's shape (``responses.prompt_logprobs``)."""
    from skipray.core.requests import TopLogprobs
    from skipray.text import token_strings

    entries = [None if e is None else TopLogprobs(e["logprob"], *_top(e["top_logprobs"]), e["rank"]) for e in column]
    ids = [0 if e is None else e["token_id"] for e in column]
    known = sorted({*ids, *(i for e in entries if e is not None for i in e.top_ids)})
    return R.prompt_logprobs(entries, ids, dict(zip(known, token_strings(tok, known))))


def _body(r: dict, tok, ctx: LineContext, h: str, created: int) -> dict:
    """The ``chat.completion`` / ``text_completion`` object of a generated row."""
    chat = r[URL] == CHAT_URL
    meta = R.Meta(f"{'chatcmpl' if chat else 'cmpl'}-{h}", created, ctx.model, ctx.fingerprint)
    entries = _entries(tok, r["logprobs"]) if r["logprobs"] is not None else None
    text, finish = r["generated_text"] or "", r["finish_reason"]
    if chat:
        lp = R.chat_logprobs(entries) if entries is not None else None
        choice = R.chat_choice(0, {"role": "assistant", "content": text}, finish, lp)
    else:
        lp = R.completion_logprobs(entries) if entries is not None else None
        choice = R.completion_choice(0, text, finish, lp)
    if r.get("prompt_logprobs") is not None:
        choice["prompt_logprobs"] = _prompt_logprobs(tok, r["prompt_logprobs"])
    prompt, new = int(r["num_input_tokens"] or 0), int(r["num_generated_tokens"] or 0)
    use = {
        "prompt_tokens": prompt,
        "completion_tokens": new,
        "total_tokens": prompt + new,
        "avg_layers": round(float(r["avg_layers"] or 0.0), 3),
    }
    return (R.chat_response if chat else R.completion_response)(meta, [choice], use)


def _failure(r: dict) -> tuple[int, str, str | None, str]:
    """(status, code, param, error type) of a row whose ``error`` is set (module contract)."""
    if r.get(CODE):
        return r[STATUS] or 0, r[CODE], r.get(PARAM), "invalid_request_error"
    if r[ERROR_KIND] == "engine":
        return 500, ENGINE_CODE, None, "server_error"
    code = "context_length_exceeded" if r["error"].startswith("prompt too long") else "invalid_value"
    return 400, code, None, "invalid_request_error"


def output_line(r: dict, tok, ctx: LineContext, created: int) -> dict[str, Any]:
    """One row's output line (module contract)."""
    cid = r["id"]
    h = line_hash(r["source_file"], r["source_row"], cid)
    out: dict[str, Any] = {"id": f"batch_req_{h}", "custom_id": cid, "response": None, "error": None}
    if r["error"] is None:
        out["response"] = {"status_code": 200, "request_id": f"req_{h}", "body": _body(r, tok, ctx, h, created)}
        return out
    status, code, param, kind = _failure(r)
    out["error"] = {"code": code, "message": r["error"]}
    if status:
        body = P.error_body(r["error"], kind, param, code)
        out["response"] = {"status_code": status, "request_id": f"req_{h}", "body": body}
    return out


def _finite(v: Any) -> Any:
    """``v`` with non-finite floats (a log-prob of -inf) as -9999.0 / None, so the line is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return -9999.0 if v == -math.inf else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def dumps(line: dict) -> str:
    """One output line as strict JSON text (UTF-8 where it can be, ``\\u`` escapes where it cannot)."""
    try:
        text = json.dumps(line, ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(line), ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escaped
        text = json.dumps(_finite(line), allow_nan=False)
    return text


def to_lines(block: pa.Table, ctx: LineContext) -> pa.Table:
    """The processor's rows as output lines: a table with one string column ``line`` (module contract)."""
    tok, created = ctx.tokenizer.get(), int(time.time())
    lines = [dumps(output_line(r, tok, ctx, created)) for r in block.to_pylist()]
    return pa.table({"line": pa.array(lines, pa.string())})


# -- writing -----------------------------------------------------------------------------------------------
def lines_sink(fs, out: str, driver_only: bool = False):
    """The Ray Data datasink of the output lines (module contract); ``driver_only``: write tasks on the
    driver's node (Ray's ``local://`` output)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class JsonLinesDatasink(Datasink):
        def __init__(self) -> None:
            self.fs, self.out, self.driver_only, self.write_uuid = fs, out, driver_only, uuid.uuid4().hex

        @property
        def supports_distributed_writes(self) -> bool:
            return not self.driver_only

        def write(self, blocks, ctx) -> int:
            lines = [x for b in blocks for x in BlockAccessor.for_block(b).to_arrow().column("line").to_pylist()]
            if lines:
                name = f"skipray-{self.write_uuid}_{ctx.task_idx:06}.jsonl"
                replace_bytes(self.fs, self.out, f"{self.out}/{name}", ("\n".join(lines) + "\n").encode())
            return len(lines)

    return JsonLinesDatasink()


# -- reading back: resume, supersede, summary ----------------------------------------------------------------
def read_lines_table(fs, path: str, schema: pa.Schema) -> pa.Table:
    """The fields of ``schema`` of every line of one of the job's JSON-lines files (others ignored)."""
    import pyarrow.json as pj

    with local(fs).open_input_stream(path) as f:
        data = f.read()
    return pj.read_json(
        pa.BufferReader(data),
        read_options=pj.ReadOptions(block_size=max(len(data) + 1, 1 << 20)),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
    )


def _engine(t: pa.Table) -> pa.ChunkedArray:
    return pc.fill_null(pc.equal(pc.struct_field(t.column("error"), "code"), ENGINE_CODE), False)


def read_done(files: list[str], fs, check: InputCheck, in_fs, where=lambda p: p) -> Done:
    """What the job's own JSON-lines ``files`` already hold (module contract); ``check``: the input (its lines
    without a ``custom_id`` are matched by position)."""

    def one(f: str) -> pa.Table:
        try:
            return read_lines_table(fs, f, DONE_SCHEMA)
        except Exception as e:  # noqa: BLE001 - throttling, permission, network: never a reason to delete
            raise OutputError(
                f"cannot read output file {where(f)!r}: {e}; nothing was moved or written; re-run when it is readable"
            ) from e

    ids, null_lines, engine_files = [], set(), []
    for f, t in zip(files, map_files(one, files)):
        engine = _engine(t)
        if pc.any(engine).as_py():
            engine_files.append(f)
            t = t.filter(pc.invert(engine))
        cids = t.column("custom_id")
        ids.append(cids.drop_null().combine_chunks())
        null_lines.update(x.removeprefix("batch_req_") for x in t.filter(pc.is_null(cids)).column("id").to_pylist())
    nulls: set[tuple[str, int]] = set()
    for fi, f in enumerate(check.files if null_lines else ()):
        chunk, name = check.ids.chunk(fi), uri(in_fs, f)
        for r in np.flatnonzero(pc.is_null(chunk).to_numpy(zero_copy_only=False)):
            if line_hash(name, int(r), None) in null_lines:
                nulls.add((name, int(r)))
    ids = [a for a in ids if len(a)]
    return Done(pa.chunked_array(ids).combine_chunks() if ids else None, nulls, list(files), engine_files)


def supersede(fs, out: str, done: Done, new_files: list[str]) -> int:
    """Drop the engine-error lines of ``done.engine_files`` whose custom_id another line holds (one this run
    wrote, or a good one of an earlier run); each such file is rewritten whole (``replace_bytes``), or
    removed when no line is left. -> lines dropped."""
    if not done.engine_files:
        return 0
    fresh = set(done.ids.to_pylist()) if done.ids is not None else set()
    for f in new_files:
        fresh.update(read_lines_table(fs, f, DONE_SCHEMA).column("custom_id").drop_null().to_pylist())
    dropped = 0
    for f in done.engine_files:
        with local(fs).open_input_stream(f) as stream:
            lines = [x for x in stream.read().split(b"\n") if x.strip()]
        keep = []
        for x in lines:
            obj = json.loads(x)
            if (obj.get("error") or {}).get("code") == ENGINE_CODE and obj.get("custom_id") in fresh:
                continue
            keep.append(x)
        if len(keep) == len(lines):
            continue
        dropped += len(lines) - len(keep)
        if keep:
            replace_bytes(fs, out, f, b"\n".join(keep) + b"\n")
        else:
            local(fs).delete_file(f)
    return dropped


def summarize(files: list[str], fs, seconds: float, skipped: int) -> Summary:
    """Counts over the JSON-lines ``files`` this run wrote (as ``skipray.batch.files.summarize``)."""
    s = Summary(seconds=seconds, skipped=skipped, files=list(files))
    layer_tokens = 0.0
    for f in files:
        t = read_lines_table(fs, f, SUMMARY_SCHEMA)
        failed = pc.is_valid(t.column("error"))
        s.rows += t.num_rows
        s.errors += int(pc.sum(failed.cast(pa.int64())).as_py() or 0)
        s.engine_errors += int(pc.sum(_engine(t).cast(pa.int64())).as_py() or 0)
        for row in t.filter(pc.invert(failed)).column("response").to_pylist():
            use = ((row or {}).get("body") or {}).get("usage") or {}
            new = use.get("completion_tokens") or 0
            s.generated_tokens += new
            s.prompt_tokens += use.get("prompt_tokens") or 0
            layer_tokens += new * (use.get("avg_layers") or 0.0)
    s.avg_layers = layer_tokens / s.generated_tokens if s.generated_tokens else 0.0
    return s
