"""skipray.io: Parquet tables round-trip locally and on S3 (a moto server on loopback) through pyarrow's
S3 filesystem, the one S3 stack the batch job uses too; the endpoint comes from the argument or
``AWS_ENDPOINT_URL``."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import moto_s3

from skipray.io import read_table, write_table


def test_local_round_trip(tmp_path):
    t = pa.table({"prompt": ["a", "b"], "n": [1, 2]})
    write_table(t, str(tmp_path / "sub" / "t.parquet"))
    assert read_table(str(tmp_path / "sub" / "t.parquet"), columns=["n"]).to_pylist() == [{"n": 1}, {"n": 2}]


def test_s3_round_trip_with_moto(monkeypatch):
    with moto_s3(monkeypatch, buckets=["data"]) as endpoint:
        t = pa.table({"prompt": ["x", "y", "z"]})
        write_table(t, "s3://data/in/t.parquet", endpoint=endpoint)
        assert read_table("s3://data/in/t.parquet", endpoint=endpoint).equals(t)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the environment's endpoint, as the AWS SDKs read it
        assert read_table("s3://data/in/t.parquet").column("prompt").to_pylist() == ["x", "y", "z"]
        with pytest.raises(OSError):
            read_table("s3://data/missing.parquet")
