"""OpenAI batch files in: JSON lines of requests, read as the file job's rows (no Ray, no torch).

Contract:

* A request line is ``{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" |
  "/v1/completions", "body": {...}}`` (OpenAI's batch input, vLLM's ``run-batch``); a blank line is no
  request. ``input_format(path, fs, flag)`` picks the job's format: the flag when it is ``parquet`` or
  ``openai-batch``; with ``auto``, a file or glob ending in ``.jsonl``, or a directory that holds ``.jsonl``
  files and no Parquet files, is OpenAI batch input (a directory holding both is an ``InputError``).
* ``check_input(path, fs)`` (driver) lists the ``.jsonl`` files (a file, a directory or a glob, as for
  Parquet), reads each once and returns the ``InputCheck`` the Parquet job plans with: its ids are the
  lines' ``custom_id`` (null for a line without a usable one), duplicates are found as for Parquet, and its
  row groups are runs of up to ``LINES_PER_UNIT`` request lines with their byte ranges (``ranges``), so
  resume (``skipray.batch.resume.plan_units``) works unchanged. Driver and read tasks parse a line the same
  way (``parse_line``), so both always see the same ``custom_id``.
* ``request_row(body, chat)`` validates a body with the Serve app's request models
  (``skipray.serve.protocol``: ``ChatRequest`` / ``CompletionRequest``, ``check_unsupported``) and maps it
  onto a batch row (``skipray.batch.rows``): ``prompt`` or the rendered ``messages``; ``sampling_params``
  with vLLM's names, holding only the fields the body sets (the others take the job's flags; resolved and
  range-checked by ``skipray.batch.params`` in the tokenizing step); ``skip`` (the Serve app's extension).
  ``max_completion_tokens`` wins over ``max_tokens``; chat ``logprobs``/``top_logprobs`` and completions
  ``logprobs`` become ``sampling_params.logprobs``; ``response_format`` and vLLM's structured-output fields
  become ``structured_outputs``. Refused (``RequestError``, a 400 output line): ``n`` > 1 (one output line
  per input line), ``stream``, ``echo``, ``truncate_prompt_tokens``, a prompt of token ids, ``tools`` and
  tool turns, chat template options other than the defaults, and what ``check_unsupported`` refuses.
  ``model`` is required but not compared with the job's model; ``priority`` has no effect here.
* ``read_lines(units, fs)`` is the read step (a Ray Data task per unit): the unit's pending lines as rows
  of ``ROW_SCHEMA``: ``id`` (the ``custom_id``), ``source_file``/``source_row`` (the request's index in its
  file, blank lines not counted), the row columns above, and the output's own columns ``URL``, ``STATUS``
  (0: the line is no request, so its output line has ``response: null``; 400: a refused request), ``CODE``
  and ``PARAM`` of its error, which is set in ``skipray.batch.rows.PRE_ERROR``. Lines that are no request:
  invalid JSON or not UTF-8 (or nested deeper than 64), not an object, no ``custom_id`` (a non-empty
  string), a ``custom_id`` that occurs more than once (every occurrence), ``method`` other than POST, an
  unknown ``url``, a ``body`` that is not an object. No line ends the job: a value that cannot be stored
  (text that is not valid Unicode) makes that line an error line too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from skipray.batch.files import InputCheck, InputError, duplicates, file_identity, list_files, map_files, uri
from skipray.batch.output import local
from skipray.batch.params import structured_spec
from skipray.batch.paths import has_magic
from skipray.batch.resume import SOURCE_COLUMNS, InputChanged, check_identity, unbits
from skipray.batch.rows import PRE_ERROR
from skipray.serve import protocol as P
from skipray.serve.guard import ServeLimits, parse_json

PARQUET, OPENAI_BATCH = "parquet", "openai-batch"
INPUT_FORMATS = ("auto", PARQUET, OPENAI_BATCH)
SUFFIX = ".jsonl"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
LINES_PER_UNIT = 1024  # request lines per read task at most
LIMITS = ServeLimits()  # the Serve app's bound on JSON nesting
# the output's own columns (kept through the processor; skipray.batch.openai_output reads them)
URL, STATUS, CODE, PARAM = "__skipray_url", "__skipray_status", "__skipray_code", "__skipray_param"

_I, _F, _S = pa.int64(), pa.float64(), pa.string()
STRUCTURED_TYPE = pa.struct([("json", _S), ("regex", _S), ("choice", pa.list_(_S)), ("grammar", _S)])
_PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
SAMPLING_TYPE = pa.struct(
    [
        *(("max_tokens", _I), ("temperature", _F), ("top_p", _F), ("top_k", _I), ("seed", _I)),
        *(("stop", pa.list_(_S)), *((k, _F) for k in _PENALTIES), ("min_tokens", _I)),
        *(("stop_token_ids", pa.list_(_I)), ("bad_words", pa.list_(_S)), ("ignore_eos", pa.bool_())),
        *(("logit_bias", pa.map_(_S, _F)), ("include_stop_str_in_output", pa.bool_())),
        *(("structured_outputs", STRUCTURED_TYPE), ("logprobs", _I), ("prompt_logprobs", _I)),
    ]
)
SKIP_TYPE = pa.struct(  # the Serve app's ``skip`` (protocol.SkipOptions)
    [
        ("full", pa.bool_()),
        *((k, _I) for k in ("max_layers", "min_layers", "decay_tokens", "warmup_layers")),
        *(("shape", _S), ("drop_order", pa.list_(_I))),
    ]
)
ROW_SCHEMA = pa.schema(
    [
        ("id", _S),
        ("prompt", _S),
        ("messages", pa.list_(pa.struct([("role", _S), ("content", _S)]))),
        ("sampling_params", SAMPLING_TYPE),
        ("skip", SKIP_TYPE),
        (URL, _S),
        (STATUS, pa.int32()),
        (CODE, _S),
        (PARAM, _S),
        (SOURCE_COLUMNS[0], _S),
        (SOURCE_COLUMNS[1], _I),
        (PRE_ERROR, _S),
    ]
)
# body fields copied into sampling_params when the body sets them (same names in both)
COPIED = (
    *("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty"),
    *("repetition_penalty", "min_p", "min_tokens", "stop_token_ids", "bad_words", "ignore_eos", "logit_bias"),
    *("include_stop_str_in_output", "prompt_logprobs"),
)


# -- the format and the driver's check ---------------------------------------------------------------------
def input_format(path: str, fs, flag: str = "auto") -> str:
    """``parquet`` or ``openai-batch`` for ``path`` (module contract); ``InputError`` for an unknown flag or
    a directory that holds both kinds of files."""
    if flag not in INPUT_FORMATS:
        raise InputError(f"--input-format must be one of {list(INPUT_FORMATS)}, got {flag!r}")
    if flag != "auto":
        return flag
    if path.endswith(SUFFIX):
        return OPENAI_BATCH
    if has_magic(path):
        return PARQUET
    from pyarrow import fs as pafs

    try:
        if local(fs).get_file_info(path).type != pafs.FileType.Directory:
            return PARQUET
        lines, parquet = list_files(fs, path, SUFFIX), list_files(fs, path, ".parquet")
    except Exception:  # noqa: BLE001 - unreadable: the Parquet check says why
        return PARQUET
    if lines and parquet:
        raise InputError(
            f"input {path!r} holds both .jsonl and .parquet files: pass --input-format parquet or openai-batch"
        )
    return OPENAI_BATCH if lines else PARQUET


def check_flags(chat: bool, prompt_column: str, id_column: str) -> None:
    """``InputError`` for the job's row flags, which do not apply to OpenAI batch files."""
    given = [f for f, on in (("--chat", chat), ("--prompt-column", prompt_column != "prompt")) if on]
    given += ["--id-column"] if id_column != "id" else []
    if given:
        raise InputError(
            f"{', '.join(given)}: not for OpenAI batch files (each line's url says chat or completions, "
            "and custom_id is the id)"
        )


def parse_line(raw: bytes) -> tuple[Any, P.RequestError | None]:
    """A line's JSON value, or the ``RequestError`` of a line that is not JSON (bounded nesting)."""
    try:
        return parse_json(raw, LIMITS), None
    except P.RequestError as e:
        return None, e


def custom_id_of(obj: Any) -> str | None:
    """A line's ``custom_id`` when it is a non-empty string that is valid Unicode, else None."""
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(cid, str) or not cid:
        return None
    try:
        cid.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return None
    return cid


@dataclass
class Scan:
    """One file's request lines: their ids, and its runs of lines (row counts and byte ranges)."""

    ids: list[str | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (byte offset, byte length, first line)


def scan_lines(data: bytes, per_unit: int | None = None) -> Scan:
    """The request lines of one file's bytes, in runs of up to ``per_unit`` (default ``LINES_PER_UNIT``)."""
    per_unit = per_unit or LINES_PER_UNIT
    s, pos, run, start, first, last_end = Scan(), 0, 0, 0, 0, 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        end = min(pos + len(raw) + 1, len(data))
        if raw.strip():
            if run == 0:
                start, first = pos, lineno
            s.ids.append(custom_id_of(parse_line(raw)[0]))
            run += 1
            if run == per_unit:
                s.rows.append(run)
                s.ranges.append((start, end - start, first))
                run = 0
            last_end = end
        pos = end
    if run:
        s.rows.append(run)
        s.ranges.append((start, last_end - start, first))
    return s


def check_input(path: str, fs) -> InputCheck:
    """List and scan the input's ``.jsonl`` files in the driver (module contract)."""
    try:
        files = list_files(fs, path, SUFFIX)
    except Exception as e:  # noqa: BLE001 - any listing failure is an unusable input
        raise InputError(f"cannot list input {path!r}: {e}") from e
    if not files:
        raise InputError(f"no {SUFFIX} files found at {path!r}")

    def scan(f: str) -> tuple[Scan, tuple[int | None, int | None]]:
        try:
            ident = file_identity(fs, f)
            with local(fs).open_input_stream(f) as stream:
                return scan_lines(stream.read()), ident
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read input {uri(fs, f)!r}: {e}") from e

    scans = map_files(scan, files)
    ids = pa.chunked_array([pa.array(s.ids, _S) for s, _ in scans], _S)
    return InputCheck(
        files,
        ids,
        duplicates(ids),
        None,
        [s.rows for s, _ in scans],
        [i for _, i in scans],
        [s.ranges for s, _ in scans],
    )


# -- a body as a batch row ---------------------------------------------------------------------------------
def _unsupported(name: str, why: str) -> P.RequestError:
    return P.RequestError(f"{name} {why}", name, "unsupported_parameter")


def _structured(asked: tuple[str, dict] | None) -> dict | None:
    """The request's structured output (``_Common.structured_spec``) as a ``STRUCTURED_TYPE`` value."""
    if asked is None:
        return None
    name, spec = asked
    try:
        spec = structured_spec(name, spec)
    except ValueError as e:
        raise P.RequestError(str(e).removeprefix("sampling_params."), name) from None
    kind, value = next(iter(spec.items()))
    if kind == "json" and not isinstance(value, str):
        value = json.dumps(value)
    ok = (
        isinstance(value, str)
        if kind != "choice"
        else isinstance(value, list) and all(isinstance(c, str) for c in value)
    )
    if not ok:
        raise P.RequestError(f"{name}.{kind} has the wrong type", name)
    return {kind: value}


def _int64(value: Any, where: str) -> None:
    """``RequestError`` for an integer, at any depth of ``value``, that a 64-bit column cannot hold."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise P.RequestError(f"{where} is out of range", where)
    if isinstance(value, dict):
        for k, v in value.items():
            _int64(v, f"{where}.{k}")
    elif isinstance(value, list):
        for v in value:
            _int64(v, where)


def request_row(body: dict, chat: bool) -> dict[str, Any]:
    """The batch row of one request body (module contract); ``RequestError`` / ``ValidationError``."""
    P.check_unsupported(body, chat)
    req = (P.ChatRequest if chat else P.CompletionRequest).model_validate(body)
    if req.n > 1:
        raise _unsupported("n", "> 1 is not supported in batch files: each input line gets one output line")
    if req.stream:
        raise _unsupported("stream", "is not supported in batch files: each line gets its whole response")
    if req.echo:
        raise _unsupported("echo", "is not supported in batch files")
    if req.truncate_prompt_tokens is not None:
        raise _unsupported("truncate_prompt_tokens", "is not supported in batch files")
    row: dict[str, Any] = {"prompt": None, "messages": None}
    sampling = {k: getattr(req, k) for k in COPIED if k in req.model_fields_set}
    _, sampling["max_tokens"] = req.length_field
    if chat:
        if req.tools:
            raise _unsupported("tools", "are not supported in batch files (tool calling is the Serve app's)")
        if req.tool_choice not in (None, "none", "auto"):
            raise _unsupported("tool_choice", "is not supported in batch files (tool calling is the Serve app's)")
        if not req.add_generation_prompt or req.continue_final_message or req.chat_template_kwargs:
            name = "chat_template_kwargs" if req.chat_template_kwargs else "continue_final_message"
            raise _unsupported(name, "is not supported in batch files: they use the chat template's defaults")
        msgs = req.prompt_messages()
        if any(m.get("tool_calls") or m["role"] == "tool" for m in msgs):
            raise _unsupported("messages", "with tool turns are not supported in batch files")
        row["messages"] = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if req.logprobs:
            sampling["logprobs"] = req.top_logprobs or 0
    else:
        if not isinstance(req.prompt, str):
            raise _unsupported("prompt", "as token ids is not supported in batch files; send text")
        row["prompt"] = req.prompt
        sampling["logprobs"] = req.logprobs
    sampling["structured_outputs"] = _structured(req.structured_spec())
    row["sampling_params"] = {k: v for k, v in sampling.items() if v is not None}
    row["skip"] = req.skip.model_dump(exclude_none=True) if req.skip is not None else None
    for k, v in row["sampling_params"].items():
        _int64(v, k)
    for k, v in (row["skip"] or {}).items():
        _int64(v, f"skip.{k}")
    return row


def _validation_error(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) of a body the request models refuse, as the Serve app words them."""
    errs = e.errors(include_url=False)
    msg = "; ".join(f"{'.'.join(map(str, x.get('loc', ())))}: {x.get('msg')}" for x in errs[:5])
    loc = ".".join(str(x) for x in (errs[0].get("loc", ()) if errs else ()))
    return msg or "invalid request", loc or None


# -- the read step -----------------------------------------------------------------------------------------
def line_row(raw: bytes, dup: bool, source: str, row: int, lineno: int) -> dict[str, Any]:
    """One request line as a row of ``ROW_SCHEMA`` (module contract)."""
    out: dict[str, Any] = {f.name: None for f in ROW_SCHEMA}
    out.update({SOURCE_COLUMNS[0]: source, SOURCE_COLUMNS[1]: row, STATUS: 0})

    def fail(code: str, message: str, status: int = 0, param: str | None = None) -> dict[str, Any]:
        where = f"line {lineno} of {source}: " if status == 0 else ""
        out.update({STATUS: status, CODE: code, PARAM: param, PRE_ERROR: where + message})
        return out

    obj, err = parse_line(raw)
    if err is not None:
        return fail(err.code or "invalid_json", "not valid JSON" if err.code == "invalid_json" else err.message)
    if not isinstance(obj, dict):
        return fail("invalid_line", "a line must be a JSON object with custom_id, method, url and body")
    out["id"] = cid = custom_id_of(obj)
    if cid is None:
        return fail("missing_custom_id", "custom_id must be a non-empty string")
    if dup:
        return fail("duplicate_custom_id", f"custom_id {cid!r} occurs more than once in the input")
    if obj.get("method") != "POST":
        return fail("invalid_method", f"method must be 'POST', got {obj.get('method')!r}")
    url = obj.get("url")
    if url not in URLS:
        return fail("invalid_url", f"url {url!r} is not supported; supported: {list(URLS)}")
    out[URL] = url
    body = obj.get("body")
    if not isinstance(body, dict):
        return fail("invalid_body", "body must be a JSON object (the request)")
    try:
        out.update(request_row(body, url == CHAT_URL))
    except P.RequestError as e:
        return fail(e.code or "invalid_value", e.message, e.status, e.param)
    except ValidationError as e:
        message, param = _validation_error(e)
        return fail("invalid_value", message, 400, param)
    return out


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    """``rows`` as a ``ROW_SCHEMA`` table; a row whose values cannot be stored becomes an error row."""
    try:
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    except (pa.ArrowException, UnicodeEncodeError, OverflowError, TypeError, ValueError):
        pass
    fixed = []
    for r in rows:
        try:
            pa.Table.from_pylist([r], schema=ROW_SCHEMA)
            fixed.append(r)
        except (pa.ArrowException, UnicodeEncodeError, OverflowError, TypeError, ValueError) as e:
            bad = {f.name: None for f in ROW_SCHEMA}
            keep = (SOURCE_COLUMNS[0], SOURCE_COLUMNS[1], "id", URL)
            bad.update({k: r[k] for k in keep})
            bad.update(
                {STATUS: 400, CODE: "invalid_value", PRE_ERROR: f"the request holds a value that cannot be read: {e}"}
            )
            fixed.append(bad)
    return pa.Table.from_pylist(fixed, schema=ROW_SCHEMA)


def read_lines(units: pa.Table, fs) -> pa.Table:
    """The pending request lines of ``units`` (rows of ``plan_units``) as rows for the processor (module
    contract). Raises ``InputChanged`` when a file is not the one planned."""
    rows = []
    for u in units.to_pylist():
        check_identity(fs, u)
        offset, length, first_line = u["range"]
        with local(fs).open_input_file(u["file"]) as f:
            data = f.read_at(length, offset)
        check_identity(fs, u)
        lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), first_line) if raw.strip()]
        if len(lines) != u["num_rows"]:
            raise InputChanged(
                f"{u['uri']} lines {first_line}+ hold {len(lines)} requests, planned {u['num_rows']}: "
                "the input changed while the job ran"
            )
        done, dup = unbits(u["done"], len(lines)), unbits(u["dup"], len(lines))
        for k, (lineno, raw) in enumerate(lines):
            if not done[k]:
                rows.append(line_row(raw, bool(dup[k]), u["uri"], u["first_row"] + k, lineno))
    return _table(rows)
