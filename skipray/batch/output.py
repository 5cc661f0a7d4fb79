"""The file job's output directory: what it owns, how it recovers, and one job at a time (no Ray here).

Contract:

* Ownership. The job records itself in ``_skipray_manifest.json`` at the output's top (``Manifest``: the
  input, model, resolved schedule, sampling defaults, chat and column options, the output's format
  (``parquet``, or ``openai-batch``: JSON lines, ``skipray.batch.openai_output``; a manifest without one
  is Parquet's), the name patterns of its files, and the skipray version, which is recorded but not
  compared). ``claim`` reads it and returns the job's own files: top-level files whose names match the
  manifest's patterns. Files the job did not write are never read as results, never moved and never
  deleted.
* Refusals (``OutputError``, exit 2 at the CLI, before anything is moved or written): ``--output`` names
  a file; the directory holds anything and no manifest (unless ``allow_foreign``); the manifest's
  compared settings differ from this run's (unless ``allow_changed``; the manifest then records the new
  settings); its format differs from this run's (always: one output holds one format). A directory
  whose every entry is a Parquet file named as Ray Data names its writes and whose footer holds the
  job's columns (the output of skipray versions before the manifest) is adopted with a message by a
  Parquet job.
* Recovery without deletion. ``inspect`` checks each own file: a Parquet file shorter than 12 bytes or not
  ending with Parquet's ``PAR1`` marker, or a JSON-lines file that is empty or does not end with a newline,
  was cut short by a crash and is listed for ``quarantine``, which moves it to ``_skipray_quarantine/``
  under the output. Any other error (network, throttling, permission)
  raises ``OutputError`` before anything is moved.
* ``replace_file(fs, path, table)`` rewrites one of the job's own files in place (a temporary file under
  ``_skipray_tmp/``, then a move over the original: atomic on local disks, and on S3 a copy that
  replaces the object whole); ``replace_bytes`` writes any file of the job's so (on S3, one PUT).
* The lock (one job per output) is ``skipray.batch.lock``.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from skipray.batch.files import map_files

MANIFEST = "_skipray_manifest.json"
QUARANTINE = "_skipray_quarantine"
TMP = "_skipray_tmp"
OWN_PATTERN = r"skipray-[0-9a-f]{32}_\d{6,}(-\d+)?\.parquet"  # JobFiles' names (Ray appends -N)
JSONL_PATTERN = r"skipray-[0-9a-f]{32}_\d{6,}\.jsonl"  # the JSON-lines part files (skipray.batch.openai_output)
FORMAT_PATTERNS = {"parquet": OWN_PATTERN, "openai-batch": JSONL_PATTERN}
LEGACY_PATTERN = r"[0-9A-Za-z]+_[0-9a-f]{32}_\d{6,}(-\d+)?\.parquet"  # Ray Data's default names
JOB_COLUMNS = {"generated_text", "finish_reason", "avg_layers"}  # what makes an adopted file a skipray output
COMPARED = ("input", "model", "schedule", "sampling", "chat", "prompt_column", "id_column")
PARQUET_MAGIC = b"PAR1"


class OutputError(ValueError):
    """The output cannot be used as asked: the job stops before anything is moved or written."""


class JobFiles:
    """Ray Data's ``filename_provider`` for the job's writes: ``skipray-<write uuid>_<task>.parquet``."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"skipray-{write_uuid}_{task_index:06}.parquet"


@dataclass
class Manifest:
    """What a job output records about the job that writes it (module contract)."""

    input: str
    model: str
    schedule: dict | None
    sampling: dict
    chat: bool
    prompt_column: str
    id_column: str
    file_patterns: list[str] = field(default_factory=lambda: [OWN_PATTERN])
    skipray_version: str = ""
    format: str = "parquet"  # the output's: "parquet" or "openai-batch" (JSON lines)
    updated: str = ""

    def compared(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPARED}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = [k for k in COMPARED if k not in known]
        if missing:
            raise ValueError(f"it lacks {missing}")
        return cls(**known)


def local(fs):
    """``fs``, or the local filesystem for None."""
    from pyarrow import fs as pafs

    return fs or pafs.LocalFileSystem()


def _name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def _read_text(fs, path: str) -> str:
    with local(fs).open_input_stream(path) as f:
        return f.read().decode()


def write_text(fs, path: str, text: str) -> None:
    """Write a small text file whole (a local file is replaced by a rename, an S3 object by one PUT)."""
    fs = local(fs)
    if fs.type_name == "local":
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())


@dataclass
class Claim:
    """The job's own files under an output, and what was said about it."""

    files: list[str]
    manifest: Manifest
    existing: bool  # the output held a manifest (or was adopted) before this run
    messages: list[str] = field(default_factory=list)


def claim(
    fs, out: str, want: Manifest, allow_foreign: bool = False, allow_changed: bool = False, where: str | None = None
) -> Claim:
    """The job's own files under ``out`` (module contract). Raises ``OutputError``; writes nothing."""
    from pyarrow import fs as pafs

    fs, where = local(fs), where or out
    try:
        info = fs.get_file_info(out)
        if info.type == pafs.FileType.File:
            raise OutputError(f"--output {where!r} is a file; give a directory (the job writes several files)")
        entries = sorted(
            fs.get_file_info(pafs.FileSelector(out, recursive=False)) if info.type == pafs.FileType.Directory else [],
            key=lambda e: e.path,
        )
        have = _read_text(fs, f"{out}/{MANIFEST}") if any(_name(e.path) == MANIFEST for e in entries) else None
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001 - network, permission: nothing can be decided safely
        raise OutputError(f"cannot read the output {where!r}: {e}; nothing was moved or written") from e
    others = [e for e in entries if not _name(e.path).startswith("_skipray_")]
    messages: list[str] = []
    if have is not None:
        try:
            manifest = Manifest.from_json(have)
        except ValueError as e:
            raise OutputError(f"{where}/{MANIFEST} is not a skipray manifest ({e}); use a new --output") from e
        diff = {k: (v, want.compared()[k]) for k, v in manifest.compared().items() if v != want.compared()[k]}
        if manifest.format != want.format:
            raise OutputError(
                f"the output {where!r} holds {manifest.format} results and this job writes {want.format}: "
                "use a new --output (one output holds one format)"
            )
        if diff and not allow_changed:
            lines = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise OutputError(
                f"the output {where!r} was written with other settings ({lines}); use a new --output, "
                "or pass --allow-changed-settings to add rows made with the new ones"
            )
        if diff:
            messages.append(f"settings changed for {sorted(diff)} (--allow-changed-settings); recorded in {MANIFEST}")
        patterns = manifest.file_patterns
        manifest = Manifest(**{**asdict(want), "file_patterns": patterns})
        existing = True
    else:
        legacy = re.compile(f"(?:{LEGACY_PATTERN})|(?:{OWN_PATTERN})")
        named = [  # outputs of versions before the manifest are Parquet: a JSON-lines job adopts none
            want.format == "parquet" and e.type == pafs.FileType.File and bool(legacy.fullmatch(_name(e.path)))
            for e in others
        ]
        # named as the job names its files is not enough: the footer must hold the job's columns
        ours = map_files(lambda e: _holds_job_columns(fs, e.path), [e for e, n in zip(others, named) if n])
        it = iter(ours)
        is_ours = [n and next(it) for n in named]
        adopt = bool(others) and all(is_ours)
        if others and not adopt and not allow_foreign:
            foreign = next(e for e, o in zip(others, is_ours) if not o)
            raise OutputError(
                f"the output {where!r} holds {_name(foreign.path)!r} and no {MANIFEST}: it is not a "
                "skipray job's output; use a new --output, or pass --allow-foreign-files to write "
                "beside those files (they are never read or touched)"
            )
        patterns = [FORMAT_PATTERNS[want.format]] + ([LEGACY_PATTERN] if adopt else [])
        manifest = Manifest(**{**asdict(want), "file_patterns": patterns})
        if adopt:
            messages.append(f"adopting {len(others)} output files of an earlier skipray version in {where!r}")
        elif others:
            messages.append(f"{len(others)} entries in {where!r} are not the job's; they are left alone")
        existing = adopt
    own = re.compile("|".join(f"(?:{p})" for p in manifest.file_patterns))
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File and own.fullmatch(_name(e.path)))
    return Claim(files, manifest, existing, messages)


def _holds_job_columns(fs, path: str) -> bool:
    """Whether a file's Parquet footer has the job's output columns (read-only; False when unreadable)."""
    import pyarrow.parquet as pq

    try:
        return JOB_COLUMNS <= set(pq.read_schema(path, filesystem=fs).names)
    except Exception:  # noqa: BLE001 - not readable as a job's output: not adopted
        return False


def inspect(fs, files: list[str], where=lambda p: p) -> list[str]:
    """The own files that a crash cut short (Parquet: shorter than 12 bytes, or no ``PAR1`` at the end; JSON
    lines: empty, or no newline at the end); raises ``OutputError`` for any file that cannot be checked
    (nothing is moved then)."""
    fs = local(fs)

    def cut_short(path: str) -> bool:
        try:
            size = fs.get_file_info(path).size
            end = b"\n" if path.endswith(".jsonl") else PARQUET_MAGIC
            if size is None or size < (1 if end == b"\n" else 12):
                return True
            with fs.open_input_file(path) as f:
                f.seek(size - len(end))
                return f.read(len(end)) != end
        except Exception as e:  # noqa: BLE001 - throttling, permission, network: never a reason to move
            raise OutputError(
                f"cannot check output file {where(path)!r}: {e}; nothing was moved or written; "
                "re-run when it is readable"
            ) from e

    return [f for f, bad in zip(files, map_files(cut_short, files)) if bad]


def quarantine(fs, out: str, files: list[str], where=lambda p: p) -> list[str]:
    """Move ``files`` (the job's own, cut short) to ``out/_skipray_quarantine/``; -> their new paths."""
    fs = local(fs)
    moved = []
    if files:
        fs.create_dir(f"{out}/{QUARANTINE}", recursive=True)
    for f in files:
        dest = f"{out}/{QUARANTINE}/{time.strftime('%Y%m%dT%H%M%S')}-{_name(f)}"
        fs.move(f, dest)
        print(
            f"[skipray] resume: {where(f)} was cut short by a crash; moved to {where(dest)} "
            "(its rows are generated again)",
            file=sys.stderr,
        )
        moved.append(dest)
    return moved


def replace_file(fs, out: str, path: str, table) -> None:
    """Rewrite the job's own file ``path`` with ``table`` (module contract)."""
    import pyarrow.parquet as pq

    fs = local(fs)
    fs.create_dir(f"{out}/{TMP}", recursive=True)
    tmp = f"{out}/{TMP}/{uuid.uuid4().hex}-{_name(path)}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def replace_bytes(fs, out: str, path: str, data: bytes) -> None:
    """Write ``data`` as the job's own file ``path`` whole: locally a temporary file under ``_skipray_tmp/``
    renamed over ``path``, on S3 one PUT (an object appears, or is replaced, only when complete)."""
    fs = local(fs)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(f"{out}/{TMP}", recursive=True)
    tmp = f"{out}/{TMP}/{uuid.uuid4().hex}-{_name(path)}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)
