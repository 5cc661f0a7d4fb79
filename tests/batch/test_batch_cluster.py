"""The batch job against Rays of its own, each in a subprocess (never in the pytest process).

* ``python jobs/generate.py`` with its embedded local Ray;
* ``ray job submit`` to ``ray start --head --block`` on loopback (auth disabled on both sides);
* a 2-node ``ray.cluster_utils.Cluster`` where the two actors land on different nodes.

Every Ray started here lives in its own temp dir and process group, which is killed at the end even
on failure. Run as a script (``python tests/batch/test_batch_cluster.py cluster OUT_JSON MODEL IN OUT``) it
is the 2-node driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "RAY_ADDRESS": "",
    "PATH": f"{Path(PY).parent}:{os.environ.get('PATH', '')}",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """Run in its own process group; kill the whole group when it overruns."""
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, cwd=ROOT
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


# -- the 2-node driver (script mode) ---------------------------------------------------------------------
def cluster_main(result: str, model: str, inp: str, out: str, tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(ROOT))
    from test_batch import config

    from skipray import batch

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 3,
            "object_store_memory": 200 * 1024**2,
            "temp_dir": tmp,
            "include_dashboard": True,
            "dashboard_port": free_port(),
        },
    )
    try:
        cluster.add_node(num_cpus=3, object_store_memory=200 * 1024**2)
        ray.init(address=cluster.address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
        cluster.wait_for_nodes()
        # 2 logical CPUs an actor on 3-CPU nodes: two actors cannot share a node, reads still fit
        cfg = config(model, actors=(2, 2), cpus_per_actor=2.0, threads_per_actor=1, shared_mount=True)
        s = batch.run(inp, out, cfg)
        from ray.util.state import list_actors

        actors = list_actors(detail=True, limit=1000)
        nodes = {a.node_id for a in actors if "MapWorker" in (a.class_name or "")}
        Path(result).write_text(
            json.dumps(
                {
                    "rows": s.rows,
                    "actor_nodes": sorted(n for n in nodes if n),
                    "classes": sorted({a.class_name or "" for a in actors}),
                    "cluster_nodes": len(ray.nodes()),
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- tests ------------------------------------------------------------------------------------------
import pytest  # noqa: E402
from test_batch import prompts, read_out, tiny_dir, write  # noqa: E402,F401  (tiny_dir: fixture)


@pytest.mark.slow
def test_cli_with_embedded_ray(tmp_path, tiny_dir):  # noqa: F811
    write(tmp_path / "in.parquet", prompts(10))
    r = run_group(
        [
            PY,
            "jobs/generate.py",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_dir),
            "--max-new-tokens",
            "4",
            "--batch-size",
            "4",
            "--cpus-per-actor",
            "0.5",
        ],
        240,
        {**os.environ, **LOOPBACK_ENV},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("[skipray] rows")]
    assert line and "rows 10 | errors 0" in line[0] and "theoretical speedup 1.00x" in line[0], r.stdout
    assert sorted(read_out(tmp_path / "out").column("id").to_pylist()) == [f"r{i:03d}" for i in range(10)]


@pytest.mark.slow
def test_ray_job_submit_to_head_on_loopback(tmp_path, tiny_dir):  # noqa: F811
    write(tmp_path / "in.parquet", prompts(6))
    env = {**os.environ, **LOOPBACK_ENV}
    temp = Path(tempfile.mkdtemp(prefix="skipray-head-"))
    dash = free_port()
    head = subprocess.Popen(
        [
            str(Path(PY).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(free_port()),
            "--object-store-memory",
            str(256 * 1024**2),
            "--temp-dir",
            str(temp),
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--disable-usage-stats",
            # the session's shared Ray already holds the agents' default ports (52365...): a second agent
            # that cannot bind them never registers, and job submission answers "No available agent"
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while time.time() < deadline:  # wait for the job server
            ok = run_group([str(Path(PY).parent / "ray"), "job", "list", "--address", address], 30, env)
            if ok.returncode == 0:
                break
            time.sleep(2)
        submit = [
            str(Path(PY).parent / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/generate.py",
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_dir),
            "--max-new-tokens",
            "4",
            "--cpus-per-actor",
            "0.5",
            "--shared-mount",
        ]  # the head and this test share one disk
        for _ in range(6):  # the job server answers before its agent is up: "No available agent", retry (bounded)
            r = run_group(submit, 300, env)
            if "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(5)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        assert "rows 6 | errors 0" in r.stdout + r.stderr
        assert sorted(read_out(tmp_path / "out").column("id").to_pylist()) == [f"r{i:03d}" for i in range(6)]
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of ours left in the group
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_two_node_cluster_actors_on_both_nodes(tmp_path, tiny_dir):  # noqa: F811
    write(tmp_path / "in.parquet", prompts(24))
    res = tmp_path / "result.json"
    # Ray Data starts a fixed pool's work as soon as one actor is up (wait_for_min_actors_s defaults to -1):
    # on a loaded machine 24 rows were all done before the second actor was placed. Wait for both.
    env = {
        **os.environ,
        **LOOPBACK_ENV,
        "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT / 'tests' / 'batch'}:{ROOT}",
        "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120",
    }
    temp = tempfile.mkdtemp(prefix="skipray-cluster-")  # short: Ray's socket paths live under it
    try:
        r = run_group(
            [
                PY,
                __file__,
                "cluster",
                str(res),
                str(tiny_dir),
                str(tmp_path / "in.parquet"),
                str(tmp_path / "out"),
                temp,
            ],
            240,
            env,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.loads(res.read_text())
    assert got["rows"] == 24 and got["cluster_nodes"] == 2
    assert len(got["actor_nodes"]) == 2, got  # one actor on each node
    assert sorted(read_out(tmp_path / "out").column("id").to_pylist()) == [f"r{i:03d}" for i in range(24)]


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "cluster":
    cluster_main(*sys.argv[2:])
