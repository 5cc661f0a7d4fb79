"""Reading and writing single Parquet tables, local or on S3, outside Ray (training data, eval inputs).

Contract: ``read_table(path)`` / ``write_table(table, path)``. ``s3://`` paths go through the same S3
stack as the batch job: pyarrow's ``S3FileSystem`` (``skipray.batch.files.filesystem_for``), with the
standard AWS credential chain and an endpoint for S3-compatible stores from ``endpoint`` or
``AWS_ENDPOINT_URL`` (the job's ``--s3-endpoint``). One stack, not two: pyarrow's is what Ray Data
reads and writes with, it pickles without keys (tasks find their own credentials), and it needs no
``s3fs``/``aiobotocore``, whose botocore pins broke installs alongside moto.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from skipray.batch.files import filesystem_for


def _fs(path: str, endpoint: str | None):
    """-> (pyarrow filesystem or None for a local path, path as that filesystem spells it)."""
    if not path.startswith("s3://"):
        return None, path
    return filesystem_for(path, endpoint or os.environ.get("AWS_ENDPOINT_URL"))


def read_table(path: str, columns: list[str] | None = None, endpoint: str | None = None) -> pa.Table:
    """The Parquet file (or directory of files) at ``path``; ``columns``: only these. Raises
    ``FileNotFoundError`` (local) or pyarrow's ``OSError`` when it cannot be read."""
    fs, p = _fs(path, endpoint)
    return pq.read_table(p, columns=columns, filesystem=fs)


def write_table(table: pa.Table, path: str, endpoint: str | None = None) -> None:
    """Write ``table`` as one Parquet file at ``path`` (local parent directories are created)."""
    fs, p = _fs(path, endpoint)
    if fs is None:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    pq.write_table(table, p, filesystem=fs)
