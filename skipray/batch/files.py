"""Driver-side files of the batch job: input checks, resume state and the summary (no Ray here).

Contract: ``filesystem_for`` maps a local or ``s3://`` path to a pyarrow filesystem that finds its
credentials through the standard AWS chain wherever it is used (no key is read, copied or pickled);
``check_input`` lists the input and reads only its footers and id column, raising ``InputError``
with a clear message for an unreadable input, a file without the prompt or id column, or files that
disagree on a column's type (widening ones, such as int32 and int64, are read as the wider type);
it finds duplicate ids. ``summarize`` reads back what a run wrote and counts rows, errors, tokens and
layers. Resume (what an existing output already holds) is ``skipray.batch.resume``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from skipray.batch.paths import glob_base, glob_match, has_magic


class InputError(ValueError):
    """The input cannot be used at all (unreadable, no such column): the job stops before any actor."""


# -- file systems and paths (driver) -------------------------------------------------------------------
def filesystem_for(path: str, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """-> (pyarrow filesystem or None for local, path as that filesystem spells it).

    S3 credentials are never read here: pyarrow's ``S3FileSystem`` without keys uses the standard AWS
    chain (environment, shared config files, web identity, instance metadata) in each process that
    uses it, refreshing short-lived (STS) credentials, and pickles without any key, so the tasks it is
    shipped to find their own credentials."""
    if not path.startswith("s3://"):
        return None, os.path.abspath(os.path.expanduser(path))
    from pyarrow import fs

    kw: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if s3_endpoint:
        scheme, _, host = s3_endpoint.rpartition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return fs.S3FileSystem(**kw), path[len("s3://") :].rstrip("/")


def uri(fs, path: str) -> str:
    """The user-facing name of a path of ``fs`` (``s3://bucket/key`` or a local path)."""
    return path if fs is None or fs.type_name == "local" else f"{fs.type_name}://{path}"


def list_files(fs, path: str, suffix: str = ".parquet") -> list[str]:
    """Input files of a file, directory (its files ending in ``suffix``, recursive, skipping ``.``/``_``
    names) or glob (Python's ``glob(recursive=True)``: ``skipray.batch.paths.glob_match``), sorted."""
    from pyarrow import fs as pafs

    fs = fs or pafs.LocalFileSystem()
    if has_magic(path):
        infos = fs.get_file_info(pafs.FileSelector(glob_base(path), recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and glob_match(path, i.path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.path.endswith(suffix)
            and not any(part.startswith((".", "_")) for part in i.path[len(path) :].split("/"))
        )
    return []


def map_files(fn, files: list[str], threads: int = 16) -> list:
    """``[fn(f) for f in files]`` on a thread pool (footers and small reads: I/O bound, S3 above all)."""
    if len(files) <= 1:
        return [fn(f) for f in files]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(files))) as pool:
        return list(pool.map(fn, files))


def file_identity(fs, path: str) -> tuple[int | None, int | None]:
    """(size in bytes, modification time in ns) of a file, as pyarrow reports them locally and on S3."""
    from pyarrow import fs as pafs

    info = (fs or pafs.LocalFileSystem()).get_file_info(path)
    return info.size, info.mtime_ns


def utf8_columns(table: pa.Table, null_columns: tuple[str, ...] = ()) -> tuple[pa.Table, list[str | None]]:
    """``table`` with invalid UTF-8 in its columns repaired, and per row the first column that had some.

    Top-level string columns keep their values with invalid bytes replaced by U+FFFD, except
    ``null_columns`` (ids: a replaced id would name another row), which become null there; a nested
    column (lists, structs) becomes null in a row whose value holds invalid UTF-8."""
    bad: list[str | None] = [None] * table.num_rows
    for idx, name in enumerate(table.column_names):
        col = table.column(name)
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        arr = col.combine_chunks()
        if (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) and name not in null_columns:
            values = []
            for i, b in enumerate(arr.cast(pa.large_binary()).to_pylist()):
                try:
                    values.append(None if b is None else b.decode("utf-8"))
                except UnicodeDecodeError:
                    values.append(b.decode("utf-8", errors="replace"))
                    bad[i] = bad[i] or name
            fixed = pa.array(values, arr.type)
        else:
            take = []
            for i in range(len(arr)):
                try:
                    arr.slice(i, 1).validate(full=True)
                    take.append(i)
                except pa.ArrowInvalid:
                    take.append(None)
                    bad[i] = bad[i] or name
            fixed = arr.take(pa.array(take, pa.int64()))
        table = table.set_column(idx, name, fixed)
    return table, bad


def _column_type_error(name: str, typ: pa.DataType, id_column: str, prompt_column: str) -> str | None:
    """Why a column the job reads per row has a type no row could use (a planning error), or None."""
    t = pa.types
    if name == id_column and not (t.is_integer(typ) or t.is_string(typ) or t.is_large_string(typ)):
        return "ids must be integers or strings"
    if name == prompt_column and not (t.is_string(typ) or t.is_large_string(typ) or t.is_null(typ)):
        return "prompts must be strings"
    if name in ("sampling_params", "skip") and not (t.is_struct(typ) or t.is_map(typ) or t.is_null(typ)):
        return "it must hold a dict (a struct or map) per row"
    return None


@dataclass
class InputCheck:
    files: list[str]
    ids: pa.ChunkedArray  # the id column, one chunk per file in file order (only it is read in the driver)
    duplicate_ids: pa.Array  # ids that occur more than once
    schema: pa.Schema | None = None  # the input's columns, one type each (files cast to it when read)
    row_groups: list[list[int]] = field(default_factory=list)  # rows of each row group, per file
    identities: list[tuple[int | None, int | None]] = field(default_factory=list)  # file_identity, per file
    # JSON-lines input (skipray.batch.openai_batch): per file, per row group (a run of lines) its
    # (byte offset, byte length, first line number)
    ranges: list[list[tuple[int, int, int]]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def _same_family(types: list[pa.DataType]) -> bool:
    """True when ids of these types compare as one type: all integers, or all strings."""
    return all(pa.types.is_integer(t) for t in types) or all(
        pa.types.is_string(t) or pa.types.is_large_string(t) for t in types
    )


def unify_schemas(files: list[str], schemas: list[pa.Schema], id_column: str) -> pa.Schema:
    """One schema for all files (widening types as Arrow's permissive promotion does); ``InputError``
    naming the column and two files when a column's types cannot be one (ids: integers or strings only)."""
    by_col: dict[str, list[tuple[pa.DataType, str]]] = {}
    for f, s in zip(files, schemas):
        for fld in s:
            by_col.setdefault(fld.name, []).append((fld.type, f))
    for name, seen in by_col.items():
        first_type, first_file = seen[0]
        for t, f in seen[1:]:
            if t.equals(first_type):
                continue
            ok = _same_family([first_type, t]) if name == id_column else True
            if ok:
                try:
                    pa.unify_schemas(
                        [pa.schema([(name, first_type)]), pa.schema([(name, t)])], promote_options="permissive"
                    )
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    ok = False
            if not ok:
                raise InputError(
                    f"column {name!r} has type {first_type} in {first_file} but {t} in {f}: "
                    f"the files must agree on it (convert one of them)"
                )
    return pa.unify_schemas(schemas, promote_options="permissive")


def check_input(path: str, fs, prompt_column: str, id_column: str) -> InputCheck:
    """Validate the input in the driver: readable Parquet files, each with the prompt and id columns, whose
    column types agree (``unify_schemas``); reads footers and the id column only."""
    import pyarrow.parquet as pq

    try:
        files = list_files(fs, path)
    except Exception as e:  # noqa: BLE001 - any listing failure is an unusable input
        raise InputError(f"cannot list input {path!r}: {e}") from e
    if not files:
        raise InputError(f"no Parquet files found at {path!r}")

    def footer(f: str):
        try:
            ident = file_identity(fs, f)
            meta = pq.ParquetFile(f, filesystem=fs).metadata
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            return meta.schema.to_arrow_schema(), rows, ident
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read input {uri(fs, f)!r} as Parquet: {e}") from e

    footers = map_files(footer, files)
    schemas = [s for s, _, _ in footers]
    for f, s in zip(files, schemas):
        for col, flag in ((prompt_column, "--prompt-column"), (id_column, "--id-column")):
            if col not in s.names:
                where = repr(path) if len(files) == 1 else f"{uri(fs, f)!r} (of {path!r})"
                raise InputError(f"input {where} has no column {col!r} (columns: {s.names}); pass {flag}")
    schema = unify_schemas([uri(fs, f) for f in files], schemas, id_column)
    for fld in schema:
        why = _column_type_error(fld.name, fld.type, id_column, prompt_column)
        if why:
            raise InputError(f"input column {fld.name!r} has type {fld.type}: {why}")
    id_type = schema.field(id_column).type

    def ids_of(f: str) -> pa.Array:
        try:
            t = pq.read_table(f, columns=[id_column], filesystem=fs)
            return utf8_columns(t, null_columns=(id_column,))[0].column(id_column).cast(id_type).combine_chunks()
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read input {uri(fs, f)!r}: {e}") from e

    ids = pa.chunked_array(map_files(ids_of, files), id_type)
    return InputCheck(files, ids, duplicates(ids), schema, [rg for _, rg, _ in footers], [i for _, _, i in footers])


def duplicates(ids: pa.ChunkedArray) -> pa.Array:
    """The non-null ids that occur more than once."""
    counts = pc.value_counts(ids.drop_null()) if len(ids) else pa.array([], pa.struct([("values", ids.type)]))
    if not len(counts):
        return pa.array([], ids.type)
    return counts.filter(pc.greater(counts.field("counts"), 1)).field("values")


@dataclass
class Summary:
    rows: int = 0
    errors: int = 0
    engine_errors: int = 0  # rows whose error_kind is "engine" (a re-run retries them)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    avg_layers: float = 0.0
    seconds: float = 0.0
    skipped: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def summarize(files: list[str], fs, seconds: float, skipped: int) -> Summary:
    """Counts over the output ``files`` this run wrote."""
    import pyarrow.parquet as pq

    s = Summary(seconds=seconds, skipped=skipped, files=list(files))
    layer_tokens = 0.0
    for f in files:
        t = pq.read_table(
            f, columns=["error", "error_kind", "num_prompt_tokens", "num_generated_tokens", "avg_layers"], filesystem=fs
        )
        ok = pc.is_null(t.column("error"))
        s.rows += t.num_rows
        s.errors += t.num_rows - pc.sum(ok.cast(pa.int64())).as_py() if t.num_rows else 0
        s.engine_errors += (
            pc.sum(pc.fill_null(pc.equal(t.column("error_kind"), "engine"), False).cast(pa.int64())).as_py() or 0
        )
        g = pc.filter(t.column("num_generated_tokens"), ok).cast(pa.float64())
        s.generated_tokens += int(pc.sum(g).as_py() or 0)
        s.prompt_tokens += int(pc.sum(pc.filter(t.column("num_prompt_tokens"), ok)).as_py() or 0)
        layer_tokens += pc.sum(pc.multiply(g, pc.filter(t.column("avg_layers"), ok).cast(pa.float64()))).as_py() or 0.0
    s.avg_layers = layer_tokens / s.generated_tokens if s.generated_tokens else 0.0
    return s
