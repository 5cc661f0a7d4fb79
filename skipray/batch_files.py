"""Driver-side files of the batch job: input checks, resume state and the summary (no Ray here).

Contract: ``filesystem_for`` maps a local or ``s3://`` path to a pyarrow/s3fs filesystem;
``check_input`` lists the input and reads only its schema and id column, raising ``InputError`` with
a clear message for an unreadable input or a missing column, and finds duplicate ids;
``done_ids`` reads the ids already in an output (resume), deleting files a crash cut short;
``summarize`` reads back what a run wrote and counts rows, errors, tokens and layers.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


class InputError(ValueError):
    """The input cannot be used at all (unreadable, no such column): the job stops before any actor."""



# -- file systems and paths (driver) -------------------------------------------------------------------
def filesystem_for(path: str, s3_endpoint: str | None = None) -> tuple[Any, str]:
    """-> (pyarrow filesystem or None for local, path as that filesystem spells it)."""
    if not path.startswith("s3://"):
        return None, os.path.abspath(os.path.expanduser(path))
    from pyarrow import fs

    kw: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if os.environ.get("AWS_ACCESS_KEY_ID"):  # pass the driver's credentials on to the workers explicitly
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    if s3_endpoint:
        scheme, _, host = s3_endpoint.rpartition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return fs.S3FileSystem(**kw), path[len("s3://"):].rstrip("/")


def _list(fs, path: str) -> list[str]:
    from pyarrow import fs as pafs

    fs = fs or pafs.LocalFileSystem()
    if any(ch in path for ch in "*?["):
        base = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rpartition("/")[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/")))
    return []


@dataclass
class InputCheck:
    files: list[str]
    ids: pa.ChunkedArray  # the id column (only it is read in the driver)
    duplicate_ids: pa.Array  # ids that occur more than once

    @property
    def num_rows(self) -> int:
        return len(self.ids)


def check_input(path: str, fs, prompt_column: str, id_column: str) -> InputCheck:
    """Validate the input in the driver: readable Parquet with the prompt and id columns."""
    import pyarrow.dataset as pads

    try:
        files = _list(fs, path)
    except Exception as e:  # noqa: BLE001 - any listing failure is an unusable input
        raise InputError(f"cannot list input {path!r}: {e}") from e
    if not files:
        raise InputError(f"no Parquet files found at {path!r}")
    try:
        ds = pads.dataset(files, format="parquet", filesystem=fs)
        names = ds.schema.names
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read input {path!r} as Parquet: {e}") from e
    for col, flag in ((prompt_column, "--prompt-column"), (id_column, "--id-column")):
        if col not in names:
            raise InputError(f"input {path!r} has no column {col!r} (columns: {names}); pass {flag}")
    try:
        ids = ds.to_table(columns=[id_column]).column(id_column)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read input {path!r}: {e}") from e
    counts = pc.value_counts(ids.drop_null()) if len(ids) else pa.array([], pa.struct([("values", ids.type)]))
    dups = counts.filter(pc.greater(counts.field("counts"), 1)).field("values") if len(counts) else pa.array([], ids.type)
    return InputCheck(files, ids, dups)


def done_ids(path: str, fs) -> tuple[pa.Array | None, list[str]]:
    """Ids already written under an output directory (resume); -> (ids or None, files read)."""
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    files = _list(fs, path)
    ids, good = [], []
    for f in files:
        try:
            ids.append(pq.read_table(f, columns=["id"], filesystem=fs).column("id").combine_chunks())
            good.append(f)
        except Exception as e:  # noqa: BLE001 - a file cut short by a crash: its rows are redone
            print(f"[skipray] resume: removing unreadable output file {f} ({e})", file=sys.stderr)
            (fs or pafs.LocalFileSystem()).delete_file(f)
    if not ids:
        return None, good
    return pa.chunked_array(ids).combine_chunks(), good


@dataclass
class Summary:
    rows: int = 0
    errors: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    avg_layers: float = 0.0
    seconds: float = 0.0
    skipped: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def summarize(output: str, fs, before: list[str], seconds: float, skipped: int) -> Summary:
    """Counts over the output files this run added (those not in ``before``)."""
    import pyarrow.parquet as pq

    new = [f for f in _list(fs, output) if f not in set(before)]
    s = Summary(seconds=seconds, skipped=skipped, files=new)
    layer_tokens = 0.0
    for f in new:
        t = pq.read_table(f, columns=["error", "num_prompt_tokens", "num_generated_tokens", "avg_layers"], filesystem=fs)
        ok = pc.is_null(t.column("error"))
        s.rows += t.num_rows
        s.errors += t.num_rows - pc.sum(ok.cast(pa.int64())).as_py() if t.num_rows else 0
        g = pc.filter(t.column("num_generated_tokens"), ok).cast(pa.float64())
        s.generated_tokens += int(pc.sum(g).as_py() or 0)
        s.prompt_tokens += int(pc.sum(pc.filter(t.column("num_prompt_tokens"), ok)).as_py() or 0)
        layer_tokens += pc.sum(pc.multiply(g, pc.filter(t.column("avg_layers"), ok).cast(pa.float64()))).as_py() or 0.0
    s.avg_layers = layer_tokens / s.generated_tokens if s.generated_tokens else 0.0
    return s


