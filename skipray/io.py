"""Reading and writing single Parquet tables, local or on S3 (through s3fs), outside Ray.

Contract: ``read_table(path)`` / ``write_table(table, path)``; ``s3://`` paths use s3fs with the
standard AWS environment, plus ``AWS_ENDPOINT_URL`` (or ``endpoint``) for S3-compatible stores.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq


def _fs(path: str, endpoint: str | None = None):
    if not path.startswith("s3://"):
        return None, path
    import s3fs

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True
    )
    return fs, path[len("s3://") :]


def read_table(path: str, columns: list[str] | None = None, endpoint: str | None = None) -> pa.Table:
    fs, p = _fs(path, endpoint)
    return pq.read_table(p, columns=columns, filesystem=fs)


def write_table(table: pa.Table, path: str, endpoint: str | None = None) -> None:
    fs, p = _fs(path, endpoint)
    if fs is None:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    pq.write_table(table, p, filesystem=fs)
