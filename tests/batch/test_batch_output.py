"""The file job never deletes or trusts what it did not write, and no single row ends it.

Paths and globs, the output's ownership (manifest, foreign files, earlier versions' outputs), recovery
without deletion (cut-short files moved aside; read errors stop the job with nothing moved), one job per
output (the lock, locally and on S3), per-row validation of every value the job reads, changed inputs,
and engine faults (retried, then "engine" error rows that a re-run replaces). Tests marked ``ray_local``
run the job on the session's local Ray; the rest need no Ray.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import moto_s3
from test_batch import LEGACY_NAME, ROOT, config, own_name, prompts, read_out, tiny_dir, write  # noqa: F401

from skipray import batch
from skipray.batch.output import MANIFEST, OWN_PATTERN, QUARANTINE, OutputError

OWN_FILE_7_DIGITS = __import__("re").compile(OWN_PATTERN)
ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
        cwd=ROOT,
    )


# -- paths ---------------------------------------------------------------------------------------------
def test_globs_behave_as_python_glob_recursive(tmp_path):
    for rel in ("in/a.parquet", "in/sub/b.parquet", "in/sub/deep/c.parquet", "in/_tmp/d.parquet", "in/.hidden.parquet"):
        write(tmp_path / rel, [{"id": rel, "prompt": "p"}])

    def names(pattern: str) -> list[str]:
        return [
            Path(f).relative_to(tmp_path).as_posix()
            for f in batch.check_input(str(tmp_path / pattern), None, "prompt", "id").files
        ]

    assert names("in/*.parquet") == ["in/a.parquet"]  # '*' stays within one segment
    assert names("in/**/*.parquet") == ["in/a.parquet", "in/sub/b.parquet", "in/sub/deep/c.parquet"]  # none too
    assert names("in/*/*.parquet") == ["in/sub/b.parquet"]
    assert names("in") == ["in/a.parquet", "in/sub/b.parquet", "in/sub/deep/c.parquet"]


@pytest.mark.parametrize(
    "inp,out",
    [
        ("d/in", "d/in"),
        ("d", "d/in/out"),
        ("d/in/x.parquet", "d/in"),
        ("d/in", "d/in/out"),
        ("d/**/*.parquet", "d/out"),
        ("d/in/*.parquet", "d"),
    ],
)
def test_overlapping_input_and_output_are_refused(tmp_path, tiny_dir, inp, out):
    write(tmp_path / "d" / "in" / "x.parquet", prompts(2))
    with pytest.raises(batch.InputError, match="overlap"):
        batch.plan(str(tmp_path / inp), str(tmp_path / out), config(tiny_dir))


def test_overlap_sees_links_and_s3_keys(tmp_path, tiny_dir):
    from skipray.batch.paths import overlap

    write(tmp_path / "in" / "x.parquet", prompts(2))
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(batch.InputError, match="same path"):
        batch.plan(str(tmp_path / "in"), str(tmp_path / "link"), config(tiny_dir))
    assert overlap("s3://b/in", "s3://b/in/out") and overlap("s3://b/in/*.parquet", "s3://b/in")
    assert overlap("s3://b/in", "s3://b/input") is None and overlap("s3://b/*.parquet", "s3://b/out") is None
    assert overlap("s3://b/in", "s3://c/in") is None and overlap("/d/in", "s3://d/in") is None


def test_local_paths_on_a_joined_cluster_are_refused_before_ray(tmp_path, tiny_dir):
    write(tmp_path / "in.parquet", prompts(2))
    t0 = time.time()
    r = cli(
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_dir),
        env={**ENV, "RAY_ADDRESS": "127.0.0.1:1"},
    )  # no cluster there: the refusal comes first
    assert r.returncode == 2 and "is a local path" in r.stderr and "--shared-mount" in r.stderr, r.stderr
    assert "local://" in r.stderr and time.time() - t0 < 90 and not (tmp_path / "out").exists()
    cfg = config(tiny_dir, shared_mount=True)
    assert batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg, joined=True).pending == 2
    p = batch.plan(f"local://{tmp_path / 'in.parquet'}", f"local://{tmp_path / 'out'}", config(tiny_dir), joined=True)
    assert p.local_input and p.local_output and p.pending == 2


# -- ownership -----------------------------------------------------------------------------------------
def test_foreign_files_are_refused_and_never_touched(tmp_path, tiny_dir):
    write(tmp_path / "in.parquet", prompts(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.parquet").write_text("id,prompt\n1,a CSV named .parquet\n")
    write(out / "theirs.parquet", [{"name": "no id column"}])
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"holds 'export.parquet' and no _skipray_manifest.json.*--allow-foreign"):
        batch.plan(str(tmp_path / "in.parquet"), str(out), config(tiny_dir))
    p = batch.plan(str(tmp_path / "in.parquet"), str(out), config(tiny_dir, allow_foreign_files=True))
    assert p.pending == 3 and p.before == [] and snapshot(out) == before  # planning writes nothing
    write(tmp_path / "file.parquet", [{"name": "x"}])
    with pytest.raises(OutputError, match="is a file"):
        batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "file.parquet"), config(tiny_dir))


def test_outputs_of_earlier_versions_are_adopted(tmp_path, tiny_dir):
    write(tmp_path / "in.parquet", prompts(4))
    job = {"generated_text": "x", "finish_reason": "stop", "avg_layers": 4.0}
    write(tmp_path / "out" / LEGACY_NAME, [{"id": "r000", **job}, {"id": "r001", **job}])
    p = batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config(tiny_dir))
    assert p.pending == 2 and any("adopting 1 output files" in m for m in p.claim.messages)
    # named like a Ray Data write is not enough: another Ray Data job's file (no skipray columns) is foreign
    write(tmp_path / "other" / LEGACY_NAME, [{"id": "r000", "label": "cat"}])
    with pytest.raises(OutputError, match="no _skipray_manifest.json"):
        batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "other"), config(tiny_dir))


def test_changed_settings_are_refused_unless_allowed(tmp_path, tiny_dir):
    from skipray.batch.job import manifest_for
    from skipray.batch.output import write_text

    write(tmp_path / "in.parquet", prompts(2))
    (tmp_path / "out").mkdir()
    cfg = config(tiny_dir)
    write_text(None, str(tmp_path / "out" / MANIFEST), manifest_for(str(tmp_path / "in.parquet"), cfg).to_json())
    assert batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg).pending == 2
    with pytest.raises(OutputError, match=r"other settings \(sampling: .*--allow-changed-settings"):
        batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config(tiny_dir, max_new_tokens=9))
    p = batch.plan(
        str(tmp_path / "in.parquet"),
        str(tmp_path / "out"),
        config(tiny_dir, max_new_tokens=9, allow_changed_settings=True),
    )
    assert p.claim.manifest.sampling["max_tokens"] == 9 and "settings changed" in p.claim.messages[0]


# -- recovery without deletion ---------------------------------------------------------------------------
class FlakyReads:
    """A pyarrow filesystem handler over the local disk whose first ``fails`` reads raise (as S3 throttling
    or a permission error would), counting them."""

    def __new__(cls, fails: int):
        from pyarrow import fs as pafs

        class Handler(pafs.FileSystemHandler):
            def __init__(self):
                self.base, self.fails = pafs.LocalFileSystem(), fails

            def _maybe_fail(self):
                if self.fails > 0:
                    self.fails -= 1
                    raise OSError("SlowDown: please reduce your request rate (injected)")

            def get_type_name(self):
                return "flaky"

            def normalize_path(self, p):
                return p

            def equals(self, other):
                return self is other

            def get_file_info(self, paths):
                return self.base.get_file_info(paths)

            def get_file_info_selector(self, sel):
                return self.base.get_file_info(sel)

            def create_dir(self, p, recursive):
                self.base.create_dir(p, recursive=recursive)

            def delete_dir(self, p):
                self.base.delete_dir(p)

            def delete_dir_contents(self, p, missing_dir_ok=False):
                self.base.delete_dir_contents(p, missing_dir_ok)

            def delete_root_dir_contents(self):
                raise OSError("no")

            def delete_file(self, p):
                self.base.delete_file(p)

            def move(self, a, b):
                self.base.move(a, b)

            def copy_file(self, a, b):
                self.base.copy_file(a, b)

            def open_input_stream(self, p):
                self._maybe_fail()
                return self.base.open_input_stream(p)  # noqa: E702

            def open_input_file(self, p):
                self._maybe_fail()
                return self.base.open_input_file(p)  # noqa: E702

            def open_output_stream(self, p, metadata):
                return self.base.open_output_stream(p)

            def open_append_stream(self, p, metadata):
                return self.base.open_append_stream(p)

        handler = Handler()
        return pafs.PyFileSystem(handler), handler


def test_read_errors_stop_planning_and_nothing_is_moved_or_deleted(tmp_path, tiny_dir, monkeypatch):
    from skipray.batch import job

    write(tmp_path / "in.parquet", prompts(6))
    out = tmp_path / "out"
    write(
        out / own_name(1),
        [{"id": f"r{i:03d}", "error_kind": None} for i in range(3)],
        pa.schema([("id", pa.string()), ("error_kind", pa.string())]),
    )
    (out / own_name(2)).write_bytes(b"PAR1 cut short")  # cut short by a crash
    (out / own_name(3)).write_bytes(b"x" * 40)  # long enough, but no PAR1 footer: cut short too
    write(out / "foreign.parquet", [{"x": 1}])
    (out / MANIFEST).write_text(job.manifest_for(str(tmp_path / "in.parquet"), config(tiny_dir)).to_json())
    before = snapshot(out)
    fs, handler = FlakyReads(fails=2)
    real = job.filesystem_for
    monkeypatch.setattr(job, "filesystem_for", lambda p, e=None: (fs, real(p)[1]) if p.endswith("/out") else real(p, e))
    for _ in range(2):
        with pytest.raises(OutputError, match="SlowDown.*nothing was moved or written"):
            batch.plan(str(tmp_path / "in.parquet"), str(out), config(tiny_dir))
        assert snapshot(out) == before
    p = batch.plan(str(tmp_path / "in.parquet"), str(out), config(tiny_dir))  # readable again
    assert sorted(Path(f).name for f in p.cut_short) == [own_name(2), own_name(3)] and p.pending == 3
    assert snapshot(out) == before  # planning moved nothing; execute moves the cut-short files aside
    from skipray.batch.output import quarantine

    quarantine(None, str(out), p.cut_short)
    assert sorted(x.name[-len(own_name(2)) :] for x in (out / QUARANTINE).iterdir()) == [own_name(2), own_name(3)]
    assert (out / "foreign.parquet").exists() and (out / own_name(1)).exists()


# -- one job per output ----------------------------------------------------------------------------------
def test_lock_refuses_a_second_job_and_takes_over_a_dead_ones(tmp_path):
    from skipray.batch.lock import LOCK, OutputLock

    out = str(tmp_path / "out")
    with OutputLock(None, out, heartbeat_s=0.2):
        with pytest.raises(OutputError, match="another job is writing"):
            OutputLock(None, out).acquire()
        first = json.loads((tmp_path / "out" / LOCK).read_text())["heartbeat"]
        time.sleep(0.6)
        assert json.loads((tmp_path / "out" / LOCK).read_text())["heartbeat"] > first  # the heartbeat runs
    assert not (tmp_path / "out" / LOCK).exists()
    (tmp_path / "out" / LOCK).write_text(json.dumps({"owner": "dead", "host": "h", "pid": 1, "heartbeat": 0}))
    with OutputLock(None, out) as lock:  # a stale lock is taken over
        assert json.loads((tmp_path / "out" / LOCK).read_text())["owner"] == lock.token


def test_lock_on_s3_is_a_conditional_write(monkeypatch):
    from skipray.batch.lock import OutputLock

    with moto_s3(monkeypatch, buckets=["locks"]) as endpoint:
        s3, path = batch.filesystem_for("s3://locks/out", endpoint)
        a = OutputLock(s3, path, s3_endpoint=endpoint)
        a.acquire()
        with pytest.raises(OutputError, match="another job is writing"):
            OutputLock(s3, path, s3_endpoint=endpoint).acquire()
        a.release()
        b = OutputLock(s3, path, s3_endpoint=endpoint)
        b.acquire()
        b.release()


# -- rows never end the job ------------------------------------------------------------------------------
def invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding these bytes as they are (Arrow checks nothing when built from buffers)."""
    b = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(b), b.buffers())


def test_every_row_value_is_validated_per_row(tmp_path, tiny_dir):
    from test_batch import prepared

    from skipray.batch.processor import SkipDecodeProcessor

    ctx = SkipDecodeProcessor(batch.SkipDecodeProcessorConfig(model_source=str(tiny_dir))).row_context
    rows = [
        ("ok", {"temperature": 0.5}),
        ("topk", {"top_k": 2**40}),
        ("seed", {"seed": 2**64 - 1}),
        ("nan", {"temperature": math.nan}),
        ("inf", {"top_p": math.inf}),
        ("maxneg", {"max_tokens": -(2**62)}),
        ("stop", {"stop": "x"}),
    ]
    sp_type = pa.struct(
        [
            ("temperature", pa.float64()),
            ("top_p", pa.float64()),
            ("top_k", pa.int64()),
            ("seed", pa.uint64()),
            ("max_tokens", pa.int64()),
            ("stop", pa.string()),
        ]
    )
    table = pa.table(
        {
            "id": [i for i, _ in rows],
            "prompt": ["Hello there"] * len(rows),
            "sampling_params": pa.array([sp for _, sp in rows], sp_type),
        }
    )
    out = {r["id"]: r["error"] for r in prepared(tmp_path / "a", [], config(tiny_dir), table=table).to_pylist()}
    assert out["ok"] is None and out["stop"] is None
    assert "top_k must be in" in out["topk"] and "seed must be in" in out["seed"]
    assert "temperature must be a finite number" in out["nan"] and "top_p must be a finite" in out["inf"]
    assert "max_tokens must be in" in out["maxneg"]
    assert (
        "max_tokens must be an integer"
        in batch.prepare_rows(pa.table({"prompt": ["x"], "sampling_params": [{"max_tokens": True}]}), ctx)
        .column("error")[0]
        .as_py()
    )
    # values of the wrong type inside skip and messages; a prompt with bytes that are not UTF-8
    table = pa.table(
        {
            "id": invalid_utf8([b"a", b"b", b"c", b"d", b"e\xff"]),
            "prompt": invalid_utf8([b"good", b"bad \xff\xfe byte", b"fine", b"fine", b"fine"]),
            "skip": [None, None, {"max_layers": "many"}, None, None],
            "note": invalid_utf8([b"n", b"n", b"n", b"\xc3", b"n"]),
        }
    )
    out = {r["id"]: r for r in prepared(tmp_path / "b", [], config(tiny_dir), table=table).to_pylist()}
    # an id that is not UTF-8 becomes null (a replaced id would name another row): resumed by file and row
    assert "column 'id' is not valid UTF-8" in out[None]["error"] and out[None]["source_row"] == 4
    assert out["a"]["error"] is None
    assert "column 'prompt' is not valid UTF-8" in out["b"]["error"] and out["b"]["prompt"] == "bad \ufffd\ufffd byte"
    assert out["c"]["error"].startswith("invalid skip") and "column 'note'" in out["d"]["error"]
    msgs = [[{"role": "user", "content": 7}], [{"role": 3, "content": "x"}], "not a list"]
    errs = batch.prepare_rows(pa.table({"messages": pa.array([json.dumps(m) for m in msgs])}), ctx)
    assert all(e for e in errs.column("error").to_pylist())
    assert "not a string (got int)" in batch.prepare_rows(pa.table({"prompt": [7]}), ctx).column("error")[0].as_py()


def test_whole_columns_of_the_wrong_type_are_planning_errors(tmp_path, tiny_dir):
    write(tmp_path / "in.parquet", [{"id": "a", "prompt": "p", "sampling_params": "temperature=1"}])
    with pytest.raises(batch.InputError, match="'sampling_params' has type string"):
        batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), config(tiny_dir))
    write(tmp_path / "f.parquet", [{"id": 1.5, "prompt": "p"}])
    with pytest.raises(batch.InputError, match="'id' has type double: ids must be integers or strings"):
        batch.plan(str(tmp_path / "f.parquet"), str(tmp_path / "out"), config(tiny_dir))


def test_a_changed_input_is_detected_before_its_rows_are_read(tmp_path, tiny_dir):
    from skipray.batch.resume import InputChanged, read_units

    write(tmp_path / "in.parquet", prompts(4))
    cfg = config(tiny_dir)
    p = batch.plan(str(tmp_path / "in.parquet"), str(tmp_path / "out"), cfg)
    time.sleep(0.01)
    write(tmp_path / "in.parquet", list(reversed(prompts(4))))  # same rows, reordered: same size, new mtime
    with pytest.raises(InputChanged, match="changed after the job planned it"):
        read_units(pa.Table.from_pylist(p.units), None, p.check.schema, cfg.prompt_column, cfg.id_column)


# -- engine faults -----------------------------------------------------------------------------------------
def test_engine_faults_retry_on_a_fresh_engine_then_become_engine_rows(tiny_dir):
    from skipray.batch.actor import ActorSpec, SkipDecodeEngineStage, fault_kind
    from skipray.core.config import EngineConfig

    assert fault_kind(ValueError("x")) == "input" and fault_kind(RuntimeError("CUDA error")) == "engine"
    assert fault_kind(FloatingPointError("nan")) == "engine"
    engine = EngineConfig(max_num_seqs=2, max_model_len=320)
    spec = ActorSpec(
        model=str(tiny_dir), schedule=config(tiny_dir).schedule, engine=engine, threads=1, engine_retries=2
    )
    gen = SkipDecodeEngineStage(spec)
    model, real = gen.m.model, gen.m.model.embed
    calls = {"fail": 0}

    def flaky(*a, **k):  # the test's model: out of memory on its first `fail` passes
        if calls["fail"] > 0:
            calls["fail"] -= 1
            raise RuntimeError("CUDA out of memory (injected by the test's model)")
        return real(*a, **k)

    model.embed = flaky
    ctx = batch.SkipDecodeProcessor(batch.SkipDecodeProcessorConfig(model_source=str(tiny_dir))).row_context
    block = batch.prepare_rows(pa.table({"prompt": ["Hello", "Tell me a story", "Hi"]}), ctx)
    first = gen.engine
    calls["fail"] = 3
    out = gen(block).to_pylist()
    assert all(r["error"] is None and r["generated_text"] is not None for r in out) and gen.engine is not first
    calls["fail"] = 10**6
    out = gen(block).to_pylist()
    assert all(r["error_kind"] == "engine" and r["error"].startswith("engine fault") for r in out)


def nan_model(src: Path, dst: Path) -> Path:
    """``src`` with a NaN in its embedding weights: every forward gives NaN logits (a broken device or model)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    w = load_file(str(dst / "model.safetensors"))
    for k in w:
        if "embed_tokens" in k:
            w[k] = torch.full_like(w[k], float("nan"))
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.slow
def test_engine_fault_rows_exit_3_and_a_rerun_replaces_them_exactly_once(tmp_path, tiny_dir):
    import shutil

    write(tmp_path / "in.parquet", prompts(5) + [{"id": "bad", "prompt": None, "extra": 0}])
    model = nan_model(tiny_dir, tmp_path / "model")
    args = (
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(model),
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
        "--cpus-per-actor",
        "0.5",
        "--engine-retries",
        "1",
    )
    r = cli(*args)
    assert r.returncode == 3 and "5 rows failed from engine faults" in r.stderr and "re-run" in r.stderr, r.stderr
    t = read_out(tmp_path / "out").to_pylist()
    assert sorted(x["error_kind"] for x in t) == ["engine"] * 5 + ["input"]
    shutil.copytree(tiny_dir, model, dirs_exist_ok=True)  # the device is healthy again
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "rows 5 | errors 0 | skipped (already done) 1" in r.stdout and "replaced 5 engine-error rows" in r.stderr
    t = read_out(tmp_path / "out").to_pylist()
    assert sorted(x["id"] for x in t) == ["bad", *[f"r{i:03d}" for i in range(5)]]  # each id exactly once
    assert [x["error_kind"] for x in t if x["error"]] == ["input"]


@pytest.mark.slow
def test_a_killed_job_reruns_to_completion_with_every_id_once(tmp_path, tiny_dir):
    import signal

    write(tmp_path / "in.parquet", prompts(80))
    args = [
        sys.executable,
        str(ROOT / "jobs" / "generate.py"),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_dir),
        "--max-new-tokens",
        "16",
        "--batch-size",
        "2",
        "--bucket-window",
        "1",
        "--cpus-per-actor",
        "0.5",
    ]
    p = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT, start_new_session=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list((tmp_path / "out").glob("skipray-*.parquet")) and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-write
    p.wait()
    written = 0
    for f in (tmp_path / "out").glob("skipray-*.parquet"):
        try:
            written += pq.read_metadata(f).num_rows
        except Exception:  # noqa: BLE001 - a file the kill cut short
            pass
    assert written < 80  # the kill came mid-job
    r = cli(*args[2:])
    assert r.returncode == 0, r.stderr
    ids = read_out(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(80)]


def test_ownership_and_recovery_on_s3(tmp_path, tiny_dir, monkeypatch):
    from skipray.batch.output import quarantine

    with moto_s3(monkeypatch, buckets=["owned"]) as endpoint:  # moto's state outlives its server: a bucket of its own
        s3, _ = batch.filesystem_for("s3://owned/x", endpoint)
        with s3.open_output_stream("owned/in/p.parquet") as f:
            pq.write_table(pa.Table.from_pylist(prompts(4)), f)
        with s3.open_output_stream("owned/out/export.parquet") as f:
            f.write(b"id,prompt\n")
        with pytest.raises(OutputError, match="holds 'export.parquet'"):
            batch.plan("s3://owned/in/", "s3://owned/out", config(tiny_dir), s3_endpoint=endpoint)
        s3.delete_file("owned/out/export.parquet")
        with s3.open_output_stream(f"owned/out/{own_name(5)}") as f:
            f.write(b"PAR1 cut")
        with s3.open_output_stream(f"owned/out/{LEGACY_NAME}") as f:
            pq.write_table(pa.Table.from_pylist([{"id": "r000"}]), f)
        from skipray.batch.job import manifest_for
        from skipray.batch.output import LEGACY_PATTERN, OWN_PATTERN, write_text

        manifest = manifest_for("s3://owned/in", config(tiny_dir))  # the output of a job that adopted older files
        manifest.file_patterns = [OWN_PATTERN, LEGACY_PATTERN]
        write_text(s3, f"owned/out/{MANIFEST}", manifest.to_json())
        p = batch.plan("s3://owned/in/", "s3://owned/out", config(tiny_dir), s3_endpoint=endpoint)
        assert p.cut_short == [f"owned/out/{own_name(5)}"] and p.pending == 3
        quarantine(s3, "owned/out", p.cut_short)
        from pyarrow import fs as pafs

        left = [i.path for i in s3.get_file_info(pafs.FileSelector("owned/out", recursive=True))]
        assert f"owned/out/{own_name(5)}" not in left and any(QUARANTINE in x and own_name(5) in x for x in left)
        with pytest.raises(batch.InputError, match="overlap"):
            batch.plan("s3://owned/in/", "s3://owned/in/out", config(tiny_dir), s3_endpoint=endpoint)


def test_exit_statuses_of_a_failed_run():
    from skipray.batch.cli import _failed
    from skipray.batch.resume import InputChanged

    def wrapped(inner: BaseException) -> BaseException:  # as Ray Data hands a task's exception to the driver
        try:
            try:
                raise inner
            except BaseException as e:
                raise RuntimeError("UserCodeException: a task failed") from e
        except RuntimeError as outer:
            return outer

    assert _failed(wrapped(InputChanged("input x changed after the job planned it"))) == 2
    assert _failed(wrapped(OutputError("another job is writing"))) == 2
    assert _failed(wrapped(RuntimeError("actor died 3 times"))) == 3


def test_superseding_uses_good_rows_of_earlier_runs_and_lost_locks_stop_the_job(tmp_path):
    """A run that stopped before superseding left an engine row beside a good row of the same id: the next
    supersede drops it even with no new file. And a job whose lock another job took over stops at check()."""
    from skipray.batch.lock import LOCK, OutputLock
    from skipray.batch.resume import read_done, supersede

    out = tmp_path / "out"
    schema = pa.schema([("id", pa.string()), ("error", pa.string()), ("error_kind", pa.string())])
    a = write(
        out / own_name(1),
        [{"id": "x", "error": "engine fault", "error_kind": "engine"}, {"id": "y", "error": None, "error_kind": None}],
        schema,
    )
    b = write(out / own_name(2), [{"id": "x", "error": None, "error_kind": None}], schema)
    done = read_done([str(a), str(b)], None)
    assert supersede(None, str(out), done, []) == 1
    assert read_out(out).column("id").to_pylist().count("x") == 1
    assert OWN_FILE_7_DIGITS.fullmatch(own_name(1).replace("_000001", "_1000001"))
    lock = OutputLock(None, str(out), heartbeat_s=0.1)
    lock.acquire()
    (out / LOCK).write_text(json.dumps({"owner": "another job", "heartbeat": time.time()}))
    time.sleep(0.4)
    with pytest.raises(OutputError, match="took over the lock"):
        lock.check()
    lock.release()
    assert json.loads((out / LOCK).read_text())["owner"] == "another job"  # never removed someone else's lock
    (out / LOCK).write_text("")  # a lock between its create and its write: held, not taken over
    with pytest.raises(OutputError, match="another job is writing"):
        OutputLock(None, str(out)).acquire()
