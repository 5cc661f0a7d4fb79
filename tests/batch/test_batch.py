"""The offline batch job (skipray.batch, jobs/generate.py) on the session's local Ray.

A tiny random Llama with the real SmolLM2 tokenizer (vocab 49152) keeps generation fast; one slow
test runs the real default model. Ray-cluster tests (job submit, 2 nodes) are in test_batch_cluster.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import moto_s3

from skipray import batch
from skipray.core.schedule import SkipSchedule

ROOT = Path(__file__).resolve().parents[2]


def make_tiny_model(path: Path, num_layers: int = 4, max_positions: int = 96) -> Path:
    """A tiny random Llama saved with the real default tokenizer (vocab 49152, chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from skipray.loading import convert_gguf, default_gguf

    tok = AutoTokenizer.from_pretrained(convert_gguf(default_gguf()))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def config(model: Path | str, **kw) -> batch.JobConfig:
    import argparse

    from skipray.options import SCHEDULE_FLAGS

    ns = argparse.Namespace(full=False, **{k: None for k in SCHEDULE_FLAGS})
    sched, _, max_pos = batch.model_facts(str(model), ns)
    base = dict(
        model=str(model),
        schedule=sched.to_dict(),
        max_positions=max_pos,
        max_new_tokens=6,
        batch_size=4,
        bucket_window=2,
        cpus_per_actor=0.5,
        threads_per_actor=1,
    )
    base.update(kw)
    return batch.JobConfig(**base)


def write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def read_out(out: Path) -> pa.Table:
    files = sorted(
        str(p)
        for p in out.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(out).parts)
    )
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def own_name(k: int = 0) -> str:
    """A file name of the job's own (``skipray.batch.output.JobFiles``)."""
    return f"skipray-{k:032x}_{k:06}-0.parquet"


LEGACY_NAME = f"0AbCdEfGhIjKlMnOpQrStU_{'e' * 32}_000000-0.parquet"  # Ray Data's default write name


def prompts(n: int, start: int = 0) -> list[dict]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        {"id": f"r{i:03d}", "prompt": "Tell me about " + " ".join(words[: 1 + i % 12]) + ".", "extra": i}
        for i in range(start, start + n)
    ]


# -- no Ray ------------------------------------------------------------------------------------------
def test_admission_order_buckets_within_window():
    lengths = [30, 2, 29, 3, 31, 1, 28, 4]
    assert batch.admission_order(lengths, bucket=False) == list(range(8))
    assert [lengths[i] for i in batch.admission_order(lengths, bucket=True)] == sorted(lengths)


def prepared(
    tmp_path: Path,
    rows: list[dict],
    cfg: batch.JobConfig,
    done: list[dict] | None = None,
    schema: pa.Schema | None = None,
    table: pa.Table | None = None,
) -> pa.Table:
    """The job's read and tokenizing steps over ``rows`` (or ``table``; no Ray): plan, ``read_units``,
    ``prepare_rows``."""
    from skipray.batch.resume import read_units

    if table is not None:
        (tmp_path).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / "in.parquet")
    else:
        write(tmp_path / "in.parquet", rows, schema)
    if done:
        done = [{**r, "generated_text": "x", "finish_reason": "stop", "avg_layers": 4.0} for r in done]
        write(tmp_path / "out" / LEGACY_NAME, done)  # an output of skipray before the manifest
    p = batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg)
    block = read_units(pa.Table.from_pylist(p.units), None, p.check.schema, cfg.prompt_column, cfg.id_column)
    return batch.prepare_rows(block, p.processor.row_context)


def test_prepare_block_marks_bad_rows(tmp_path, tiny_dir):
    cfg = config(tiny_dir, max_new_tokens=8)
    long = "word " * 200  # > 96 positions with 8 new tokens
    rows = [
        {"id": i, "prompt": p, "error": "x"}  # an input column that clashes with an output column is kept, renamed
        for i, p in zip(
            ["a", "b", "c", "d", "e", "f", None, "done", "f"],
            ["Hello there", None, "", "   ", long, "dup", "no id", "already", "dup again"],
        )
    ]
    out = prepared(tmp_path, rows, cfg, done=[{"id": "done"}])
    rows = {r["prompt"]: r for r in out.to_pylist()}
    assert "already" not in rows and out.num_rows == 8
    assert out.column("input_error").to_pylist() == ["x"] * 8
    assert rows["Hello there"]["error"] is None and rows["Hello there"]["num_input_tokens"] > 0
    assert rows["Hello there"][batch.TOKENS]
    errs = {r["prompt"]: r["error"] for r in out.to_pylist()}
    assert errs[None] == "prompt is null" and errs[""] == errs["   "] == "prompt is empty"
    assert errs[long].startswith("prompt too long: ") and "this model's context is 96 tokens" in errs[long]
    assert "duplicate id 'f'" in errs["dup"] and "duplicate id" in errs["dup again"] and errs["no id"] == "id is null"


def test_prepare_block_renamed_columns_and_non_string_prompt_column(tmp_path, tiny_dir):
    cfg = config(tiny_dir, prompt_column="question", id_column="key")
    out = prepared(
        tmp_path,
        [{"key": 1, "question": "q1", "prompt": "other"}, {"key": 2, "question": "q2", "prompt": "other"}],
        cfg,
    )
    assert out.column("id").to_pylist() == [1, 2] and out.column("prompt").to_pylist() == ["q1", "q2"]
    assert out.column("input_prompt").to_pylist() == ["other", "other"]
    # a whole prompt column of another type is a planning error naming it, not a row error per row
    with pytest.raises(batch.InputError, match="'question' has type int64: prompts must be strings"):
        prepared(tmp_path, [{"key": 1, "question": 7}], cfg)


def test_check_input_fails_fast(tmp_path):
    with pytest.raises(batch.InputError, match="no Parquet files"):
        batch.check_input(str(tmp_path / "nothing"), None, "prompt", "id")
    write(tmp_path / "a" / "x.parquet", [{"id": "1", "text": "hi"}])
    with pytest.raises(batch.InputError, match="no column 'prompt'.*--prompt-column"):
        batch.check_input(str(tmp_path / "a"), None, "prompt", "id")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(batch.InputError, match="cannot read input"):
        batch.check_input(str(tmp_path / "b"), None, "prompt", "id")
    write(tmp_path / "c" / "1.parquet", [{"id": "x", "prompt": "p"}, {"id": "y", "prompt": "q"}])
    write(tmp_path / "c" / "2.parquet", [{"id": "x", "prompt": "r"}])
    chk = batch.check_input(str(tmp_path / "c" / "*.parquet"), None, "prompt", "id")
    assert chk.num_rows == 3 and chk.duplicate_ids.to_pylist() == ["x"] and len(chk.files) == 2


def test_job_cli_fails_fast_on_missing_column(tmp_path, tiny_dir):
    import subprocess

    write(tmp_path / "in.parquet", [{"id": "1", "text": "hi"}])
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "generate.py"),
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert r.returncode == 2, r.stderr
    assert "no column 'prompt'" in r.stderr
    assert "Started a local Ray instance" not in r.stderr + r.stdout  # failed before Ray/actors started
    assert time.time() - t0 < 60


# -- on the session's local Ray ----------------------------------------------------------------------
def test_local_parquet_end_to_end(ray_local, tmp_path, tiny_dir):
    write(tmp_path / "in" / "a.parquet", prompts(12))
    write(tmp_path / "in" / "b.parquet", prompts(9, start=12))
    cfg = config(tiny_dir)
    s = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    t = read_out(tmp_path / "out")
    assert t.column_names[: len(batch.OUTPUT_COLUMNS)] == list(batch.OUTPUT_COLUMNS) and "extra" in t.column_names
    assert batch.TOKENS not in t.column_names
    assert sorted(t.column("id").to_pylist()) == [f"r{i:03d}" for i in range(21)]
    rows = t.to_pylist()
    assert all(r["error"] is None and isinstance(r["generated_text"], str) for r in rows)
    assert all(1 <= r["num_generated_tokens"] <= 6 and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["avg_layers"] == 4.0 for r in rows)  # untrained tiny model: full depth
    assert all(r["extra"] == int(r["id"][1:]) for r in rows)  # passthrough column stays with its row
    assert (s.rows, s.errors, s.skipped) == (21, 0, 0)
    assert s.generated_tokens == sum(r["num_generated_tokens"] for r in rows) and s.tokens_per_s > 0


def test_skip_schedule_reaches_the_actor(ray_local, tmp_path, tiny_dir):
    write(tmp_path / "in.parquet", prompts(4))
    sched = SkipSchedule(4, 4, 2, 2, warmup_layers=1)
    cfg = config(tiny_dir, schedule=sched.to_dict(), max_new_tokens=5)
    batch.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg)
    t = read_out(tmp_path / "out")
    for r in t.to_pylist():
        if r["num_generated_tokens"] == 5:
            assert r["avg_layers"] == pytest.approx(sum(sched.layers_per_token(5)) / 5, abs=1e-3)


def test_bad_row_corpus(ray_local, tmp_path, tiny_dir):
    rows = prompts(6) + [
        {"id": "null", "prompt": None, "extra": 0},
        {"id": "empty", "prompt": "", "extra": 0},
        {"id": "long", "prompt": "word " * 300, "extra": 0},
        {"id": "r001", "prompt": "a second r001", "extra": 0},
    ]
    write(tmp_path / "in.parquet", rows)
    s = batch.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config(tiny_dir))
    t = read_out(tmp_path / "out")
    assert t.num_rows == 10 and (s.rows, s.errors) == (10, 5)
    bad = [r for r in t.to_pylist() if r["error"]]
    assert sorted(r["id"] for r in bad) == ["empty", "long", "null", "r001", "r001"]
    assert all(r["generated_text"] is None and r["num_generated_tokens"] == 0 for r in bad)


def test_resume_skips_done_ids_and_redoes_partial_files(ray_local, tmp_path, tiny_dir):
    write(tmp_path / "in" / "a.parquet", prompts(8))
    cfg = config(tiny_dir)
    s1 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert s1.rows == 8
    (tmp_path / "out" / own_name(7)).write_bytes(b"PAR1 truncated")  # a write of its own a crash cut short
    write(tmp_path / "in" / "b.parquet", prompts(12, start=8))  # the input grew
    s2 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s2.rows, s2.skipped) == (12, 8)
    assert not (tmp_path / "out" / own_name(7)).exists()  # moved aside, never deleted:
    assert [p.name[-len(own_name(7)) :] for p in (tmp_path / "out" / "_skipray_quarantine").iterdir()] == [own_name(7)]
    ids = read_out(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(20)]  # every id exactly once
    s3 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s3.rows, s3.skipped) == (0, 20)


def engine_stage_processes() -> dict[int, str]:
    """pid -> process title of this machine's Ray actors that run the generating actor
    (``skipray.batch.actor.SkipDecodeEngineStage``; Ray titles a worker ``ray::<actor class>[.<method running>]``)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith("ray::") and "SkipDecodeEngineStage" in title:
            out[p.info["pid"]] = title
    return out


def test_actor_killed_mid_job_is_replaced(ray_local, tmp_path, tiny_dir):
    """The test kills the job's only actor (SIGKILL) while it generates; Ray Data starts another one, which
    finishes the job: every row exactly once."""
    import signal
    import threading

    write(tmp_path / "in.parquet", prompts(80))
    cfg = config(tiny_dir, actors=(1, 1), max_new_tokens=12)  # one actor: the job needs its replacement
    seen: dict[int, str] = {}
    killed: list[str] = []
    done = threading.Event()

    def kill_the_first_busy_actor() -> None:
        while not done.is_set():
            procs = engine_stage_processes()
            seen.update(procs)
            # busy: running a method (".submit"), not still constructing (".__init__") or idle
            busy = [
                pid
                for pid, title in procs.items()
                if title.rstrip().rsplit(")", 1)[1].startswith(".") and "__init__" not in title
            ]
            if busy and not killed:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(procs[busy[0]])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_first_busy_actor, daemon=True)
    killer.start()
    try:
        s = batch.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg)
    finally:
        done.set()
        killer.join(10)
    assert killed, f"no busy generating actor seen: {seen}"
    assert len(seen) >= 2, f"no replacement actor ran: {seen}"
    ids = read_out(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(80)] and s.rows == 80


def pickled_task_args(ds) -> bytes:
    """Everything Ray ships to the tasks and actors of a lazy dataset: its logical plan, pickled."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.dumps(ds._logical_plan)


def test_s3_round_trip_with_moto(ray_local, tmp_path, tiny_dir, monkeypatch):
    from pyarrow import fs

    # the driver's credentials differ from the workers' (conftest.WORKER_AWS_ENV); moto takes any
    driver = {
        "AWS_ACCESS_KEY_ID": "driver-key-1d2c",
        "AWS_SECRET_ACCESS_KEY": "driver-secret-9f4e",
        "AWS_SESSION_TOKEN": "driver-token-77ab",
    }
    with moto_s3(monkeypatch, buckets=["bucket"], **driver) as endpoint:
        host_port = endpoint.removeprefix("http://")
        s3, _ = batch.filesystem_for("s3://b/x", endpoint)
        with s3.open_output_stream("bucket/in/p.parquet") as f:
            pq.write_table(pa.Table.from_pylist(prompts(10)), f)
        p = batch.plan("s3://bucket/in/", "s3://bucket/out", config(tiny_dir), s3_endpoint=endpoint)
        shipped = pickled_task_args(batch.build_pipeline(p))
        assert host_port.encode() in shipped and b"read_units" in shipped  # the filesystems, the steps
        for secret in driver.values():
            assert secret.encode() not in shipped, "a driver credential would be serialized into task arguments"
        s = batch.execute(p)  # the tasks read and write S3 with their own credentials (standard chain)
        assert s.rows == 10
        files = [
            i.path
            for i in s3.get_file_info(fs.FileSelector("bucket/out", recursive=True))
            if i.path.rpartition("/")[2].startswith("skipray-")
        ]  # the job's own files (not its manifest)
        t = pa.concat_tables([pq.read_table(f, filesystem=s3) for f in files])
        assert sorted(t.column("id").to_pylist()) == [f"r{i:03d}" for i in range(10)]
        s2 = batch.run("s3://bucket/in/", "s3://bucket/out", config(tiny_dir), s3_endpoint=endpoint)
        assert (s2.rows, s2.skipped) == (0, 10)  # resume works on S3 too


@pytest.mark.slow
@pytest.mark.real_model
def test_real_default_model_end_to_end(ray_local, tmp_path):
    write(
        tmp_path / "in.parquet",
        [{"id": 1, "prompt": "What is the capital of France?"}, {"id": 2, "prompt": "Name a primary color."}],
    )
    cfg = config("smollm2-base", max_new_tokens=12, chat=True, cpus_per_actor=1.0, threads_per_actor=2)
    s = batch.run(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg)
    t = {r["id"]: r for r in read_out(tmp_path / "out").to_pylist()}
    assert "Paris" in t[1]["generated_text"]
    assert s.rows == 2 and s.errors == 0 and t[1]["avg_layers"] == 30.0
