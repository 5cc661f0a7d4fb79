"""Resume of the file job at corpus scale: planned once in the driver, skipped per input row group.

Contract:

* ``read_done(path, fs)`` reads what an existing output holds: the ``id`` column of every Parquet file
  under it, and ``source_file`` / ``source_row`` (the input file and row a result came from) where the
  file has them; files are read on a thread pool, and one that cannot be read (a write a crash cut
  short) is deleted, so its rows are redone. -> ``Done``.
* ``plan_units(check, done, fs)`` matches them against the input once, in the driver: one Arrow hash
  set of the done ids, probed with every input id. -> (``units``, rows pending). A unit is one input
  row group with rows left to do; it carries bitmaps of *its own* rows only (which are done, which
  have an id that occurs more than once), so no task is sent the done set, and a row group with
  nothing left is not read at all. A row whose id is null is done when the output holds a null-id
  row from the same ``source_file`` and ``source_row`` (outputs written before those columns existed
  resume by id only).
* ``read_units(units, ...)`` is the job's read step (a Ray Data task per unit): it reads the row
  group, casts it to the input's one schema (``skipray.batch.files.unify_schemas``), drops done rows, adds
  ``source_file`` / ``source_row``, renames input columns that clash with the job's output columns
  (``skipray.batch.rows.unique_renames``), names the prompt and id columns ``prompt`` and ``id``, and sets
  ``skipray.batch.rows.PRE_ERROR`` on rows whose id is null or occurs more than once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skipray.batch.files import InputCheck, InputError, file_identity, map_files, uri, utf8_columns
from skipray.batch.rows import ERROR_KIND, GENERATED_COLUMNS, INTERNAL_COLUMNS, PRE_ERROR, unique_renames

SOURCE_COLUMNS = ("source_file", "source_row")
# the job's output columns, first in every output file (``num_prompt_tokens``: the job's older name of
# ``num_input_tokens``, kept so outputs and readers of earlier versions go on working)
OUTPUT_COLUMNS = (
    "id",
    "prompt",
    "generated_text",
    "num_prompt_tokens",
    "num_generated_tokens",
    "avg_layers",
    "finish_reason",
    "error",
    ERROR_KIND,
)
JOB_RESERVED = (
    frozenset(OUTPUT_COLUMNS) | set(GENERATED_COLUMNS) | set(SOURCE_COLUMNS) | set(INTERNAL_COLUMNS) | {"messages"}
)  # the prompt column is the prompt: an input ``messages`` column is kept, renamed


@dataclass
class Done:
    """What an output already holds (rows whose ``error_kind`` is "engine" are not done: they are redone)."""

    ids: pa.Array | None  # non-null ids written
    null_positions: set[tuple[str, int]] = field(default_factory=set)  # (source_file, source_row) of null ids
    files: list[str] = field(default_factory=list)  # the job's own files that were read
    engine_files: list[str] = field(default_factory=list)  # those holding engine-error rows (to supersede)

    @property
    def empty(self) -> bool:
        return self.ids is None and not self.null_positions


def read_done(files: list[str], fs, where=lambda p: p) -> Done:
    """The ids (and null-id positions) in the job's own output ``files`` (``skipray.batch.output.claim``,
    minus those cut short). Raises ``OutputError`` when one cannot be read: nothing is ever deleted."""
    import pyarrow.parquet as pq

    from skipray.batch.output import OutputError

    def one(f: str) -> pa.Table:
        try:
            pf = pq.ParquetFile(f, filesystem=fs)
            cols = ["id"] + [c for c in (*SOURCE_COLUMNS, ERROR_KIND) if c in pf.schema_arrow.names]
            return pf.read(columns=cols)
        except Exception as e:  # noqa: BLE001 - throttling, permission, network: never a reason to delete
            raise OutputError(
                f"cannot read output file {where(f)!r}: {e}; nothing was moved or written; re-run when it is readable"
            ) from e

    tables = map_files(one, files)
    ids, nulls, engine_files = [], set(), []
    for f, t in zip(files, tables):
        if not t.num_rows:
            continue
        if ERROR_KIND in t.column_names:
            engine = pc.fill_null(pc.equal(t.column(ERROR_KIND).cast(pa.string()), "engine"), False)
            if pc.any(engine).as_py():
                engine_files.append(f)
                t = t.filter(pc.invert(engine))
        col = t.column("id")
        ids.append(col.drop_null().combine_chunks())
        if col.null_count and "source_file" in t.column_names:
            sub = t.filter(pc.is_null(col))
            nulls.update(zip(sub.column("source_file").to_pylist(), sub.column("source_row").to_pylist()))
    ids = [a for a in ids if len(a)]
    if not ids:
        return Done(None, nulls, list(files), engine_files)
    return Done(pa.chunked_array(ids).combine_chunks(), nulls, list(files), engine_files)


def _keys(t: pa.Table) -> set:
    """Row keys of an output table: the id, or (source_file, source_row) for a null id."""
    src = t.column_names
    ids = t.column("id").to_pylist()
    files = t.column("source_file").to_pylist() if "source_file" in src else [None] * len(ids)
    rows = t.column("source_row").to_pylist() if "source_row" in src else [None] * len(ids)
    return {(("id", i) if i is not None else ("pos", f, r)) for i, f, r in zip(ids, files, rows)}


def supersede(fs, out: str, done: Done, new_files: list[str]) -> int:
    """Drop the engine-error rows of ``done.engine_files`` whose key another row holds: one written by this
    run (``new_files``) or a good row an earlier run wrote (``done``: a run that stopped before its own
    supersede). Each such file is rewritten in place (``output.replace_file``; a file left with no rows is
    removed: it is the job's own and fully superseded). -> rows dropped."""
    import pyarrow.parquet as pq

    from skipray.batch.output import local, replace_file

    if not done.engine_files:
        return 0
    cols = lambda pf: ["id"] + [c for c in SOURCE_COLUMNS if c in pf.schema_arrow.names]  # noqa: E731
    fresh: set = {("pos", f, r) for f, r in done.null_positions}
    if done.ids is not None:
        fresh |= {("id", x) for x in done.ids.to_pylist()}
    for f in new_files:
        pf = pq.ParquetFile(f, filesystem=fs)
        fresh |= _keys(pf.read(columns=cols(pf)))
    dropped = 0
    for f in done.engine_files:
        t = pq.read_table(f, filesystem=fs)
        engine = pc.fill_null(pc.equal(t.column(ERROR_KIND).cast(pa.string()), "engine"), False).to_pylist()
        keys = [next(iter(_keys(t.slice(i, 1)))) for i in range(t.num_rows)]
        keep = [not (e and k in fresh) for e, k in zip(engine, keys)]
        if all(keep):
            continue
        dropped += keep.count(False)
        if any(keep):
            replace_file(fs, out, f, t.filter(pa.array(keep)))
        else:
            local(fs).delete_file(f)
    return dropped


def _bits(mask: np.ndarray) -> bytes | None:
    return np.packbits(mask).tobytes() if mask.any() else None


def unbits(data: bytes | None, n: int) -> np.ndarray:
    """The bool mask of ``n`` rows packed by ``plan_units`` (all false for None)."""
    if data is None:
        return np.zeros(n, dtype=bool)
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)


def _to_numpy(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    chunks = mask.chunks if isinstance(mask, pa.ChunkedArray) else [mask]
    parts = [c.fill_null(False).to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate(parts).astype(bool) if parts else np.zeros(0, dtype=bool)


def plan_units(check: InputCheck, done: Done, fs) -> tuple[list[dict[str, Any]], int]:
    """-> (one dict per input row group with rows left: ``file``, ``uri``, ``row_group``, ``first_row``,
    ``num_rows``, ``done`` and ``dup`` bitmaps or None, ``identity``, and ``range``: the row group's bytes in
    a JSON-lines file, else None; number of input rows pending)."""
    n = check.num_rows
    done_mask = np.zeros(n, dtype=bool)
    if done.ids is not None and len(done.ids):
        try:
            value_set = done.ids.cast(check.ids.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(
                f"the output's ids ({done.ids.type}) do not match the input's ({check.ids.type}): "
                f"write to a new output ({e})"
            ) from e
        done_mask = _to_numpy(pc.is_in(check.ids, value_set=value_set))
    dup_mask = (
        _to_numpy(pc.is_in(check.ids, value_set=check.duplicate_ids))
        if len(check.duplicate_ids)
        else np.zeros(n, dtype=bool)
    )
    units, offset = [], 0
    for fi, (f, groups) in enumerate(zip(check.files, check.row_groups)):
        name = uri(fs, f)
        if done.null_positions and check.ids.chunk(fi).null_count:
            nulls = np.flatnonzero(_to_numpy(pc.is_null(check.ids.chunk(fi))))
            for r in nulls:
                if (name, int(r)) in done.null_positions:
                    done_mask[offset + r] = True
        first = 0
        for g, rows in enumerate(groups):
            span = slice(offset + first, offset + first + rows)
            if rows and not done_mask[span].all():
                units.append(
                    {
                        "file": f,
                        "uri": name,
                        "row_group": g,
                        "first_row": first,
                        "num_rows": rows,
                        "done": _bits(done_mask[span]),
                        "dup": _bits(dup_mask[span]),
                        "identity": list(check.identities[fi]),
                        "range": list(check.ranges[fi][g]) if check.ranges else None,  # JSON lines: bytes
                    }
                )
            first += rows
        offset += first
    return units, n - int(done_mask.sum())


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (missing columns null)."""
    cols = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


class InputChanged(RuntimeError):
    """An input file changed after the job planned it: its rows cannot be matched to the plan."""


def check_identity(fs, u: dict) -> None:
    if file_identity(fs, u["file"]) != tuple(u["identity"]):
        raise InputChanged(
            f"input {u['uri']} changed after the job planned it (size or modification time): "
            "the job stopped before writing its rows; re-run it"
        )


def read_units(units: pa.Table, fs, schema: pa.Schema, prompt_column: str, id_column: str) -> pa.Table:
    """The pending rows of ``units`` (rows of ``plan_units``), ready for ``skipray.batch.rows.prepare_rows``.
    Raises ``InputChanged`` when a file is not the one planned (checked before and after reading)."""
    import pyarrow.parquet as pq

    schema = pa.schema(list(schema))  # without file metadata
    out = []
    for u in units.to_pylist():
        check_identity(fs, u)
        t = conform(pq.ParquetFile(u["file"], filesystem=fs).read_row_group(u["row_group"]), schema)
        check_identity(fs, u)
        n = t.num_rows
        if n != u["num_rows"]:
            raise InputChanged(
                f"{u['uri']} row group {u['row_group']} has {n} rows, planned {u['num_rows']}: "
                f"the input changed while the job ran"
            )
        t, bad = utf8_columns(t, null_columns=(id_column,))
        keep = ~unbits(u["done"], n)
        dup = unbits(u["dup"], n)
        ids = t.column(id_column)
        errors = [None] * n
        for i, (v, d) in enumerate(zip(ids.to_pylist(), dup)):
            if bad[i]:
                errors[i] = f"column {bad[i]!r} is not valid UTF-8 (invalid bytes replaced by U+FFFD)"
            elif v is None:
                errors[i] = "id is null"
            elif d:
                errors[i] = f"duplicate id {v!r}: it occurs more than once in the input"
        t = (
            t.append_column(SOURCE_COLUMNS[0], pa.array([u["uri"]] * n, pa.string()))
            .append_column(SOURCE_COLUMNS[1], pa.array(np.arange(u["first_row"], u["first_row"] + n), pa.int64()))
            .append_column(PRE_ERROR, pa.array(errors, pa.string()))
        )
        out.append(t.filter(pa.array(keep)) if not keep.all() else t)
    if not out:  # no units: an empty table of the same columns
        empty = conform(pa.table({}), schema)
        out = [
            empty.append_column(SOURCE_COLUMNS[0], pa.array([], pa.string()))
            .append_column(SOURCE_COLUMNS[1], pa.array([], pa.int64()))
            .append_column(PRE_ERROR, pa.array([], pa.string()))
        ]
    return job_names(pa.concat_tables(out), prompt_column, id_column)


def job_names(table: pa.Table, prompt_column: str, id_column: str) -> pa.Table:
    """Rename clashing input columns (``input_<name>``, unique), then the prompt and id columns."""
    own = {SOURCE_COLUMNS[0], SOURCE_COLUMNS[1], PRE_ERROR}
    names = table.column_names
    renames = unique_renames([c for c in names if c not in own and c not in (prompt_column, id_column)], JOB_RESERVED)
    renames[prompt_column], renames[id_column] = "prompt", "id"
    return table.rename_columns([renames.get(c, c) for c in names])
