"""Cluster autoscaling on one machine: the real Ray autoscaler adding and removing GPU worker nodes.

``ray.cluster_utils.AutoscalingCluster`` runs Ray's autoscaler with the fake multi-node provider: each
"node" it launches is a raylet on this machine that advertises its node type's resources, GPUs
included. The node types come from ``cluster/aws.yaml``'s ``available_node_types`` (GPUs and
min/max workers as written, vCPUs divided by ``CPU_DIVISOR`` to fit this machine, the head without
GPUs). The GPUs are advertised, not real, so the engine runs on CPU (``--device cpu`` / Serve's
``device`` arg) while Ray schedules by the GPU count.

* ``test_gpu_autoscaling_job``: ``jobs/generate.py --gpus-per-actor 1 --actors 1,2`` as a driver
  against the cluster: GPU nodes start from zero, the actors run on them (never on the head), every
  row is written once, and the GPU nodes are removed after the idle timeout.
* ``test_gpu_autoscaling_serve``: the Serve app with one GPU per replica, 1..2 replicas: the first
  replica brings up a GPU node, load from loopback clients a second one for the second replica,
  which is removed after the load ends.
* ``test_job_asking_for_impossible_gpus_fails_fast``: 2 GPUs per actor where every node type has 1:
  exit status 2 within a minute, with a message naming GPU.
* fast ones: the node types read from ``cluster/aws.yaml``, ``skipray.batch.gpu_job_limits`` and
  ``skipray.resources.check_schedulable`` on the session's shared Ray (which cannot grow).

Each test starts a cluster of its own (``LocalAutoscalingCluster``), never the shared test Ray, and
kills every process of it at the end, even on failure. Timings are printed with ``-s``.
Run as a script (``python tests/test_autoscaling.py serve ADDRESS MODEL PORT``) it is the Serve
deployer driver.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RAY = str(Path(PY).parent / "ray")
AWS = ROOT / "cluster" / "aws.yaml"
CPU_DIVISOR = 4  # aws.yaml's vCPUs / 4: the head 8 -> 2 logical CPUs, each GPU worker 4 -> 1
IDLE_TIMEOUT_MINUTES = 0.1  # aws.yaml says 5; 6 s keeps the test short
OBJECT_STORE = 80 * 1024**2  # per node
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_ID
ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "RAY_ADDRESS": "",
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PATH": f"{Path(PY).parent}:{os.environ.get('PATH', '')}",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_types_from_launcher(path: Path = AWS, cpu_divisor: int = CPU_DIVISOR) -> tuple[dict, dict, dict]:
    """(head resources, worker node types, cluster-wide settings) for an ``AutoscalingCluster``, read
    from a launcher config's ``available_node_types``: GPUs and min/max workers as written, CPUs divided
    by ``cpu_divisor`` (at least 1), the head without GPUs, a small object store per node."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    scale = lambda cpus: max(1, int(cpus) // cpu_divisor)  # noqa: E731
    head_resources = {"CPU": scale(types[head]["resources"]["CPU"])}
    workers = {}
    for name, t in types.items():
        if name == head:
            continue
        r = dict(t["resources"])
        r["CPU"] = scale(r.get("CPU", 1))
        r["object_store_memory"] = OBJECT_STORE
        workers[name] = {
            "resources": r,
            "node_config": {},
            "min_workers": t.get("min_workers", 0),
            "max_workers": t.get("max_workers", cfg["max_workers"]),
        }
    return (
        head_resources,
        workers,
        {"max_workers": cfg["max_workers"], "upscaling_speed": cfg.get("upscaling_speed", 1.0)},
    )


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class LocalAutoscalingCluster(AutoscalingCluster):
        """Ray's ``AutoscalingCluster`` (autoscaler v2, as ``ray up`` runs it in Ray 2.60), adapted to
        share this machine:

        * ``start``/``shutdown`` never run ``ray stop --force`` (it kills every Ray on the machine, the
          session's shared test Ray included): the head is ``ray start --head --block`` in a session of
          its own, with its own GCS port, temp dir and agent ports, on 127.0.0.1, auth off; shutdown
          kills that session and every process that names the temp dir (the worker "nodes" the
          autoscaler started);
        * the fake provider is named as an ``external`` module: the Ray wheel does not ship
          ``fake_multi_node/example.yaml``, which ``AutoscalingCluster._generate_config`` and the
          ``fake_multinode`` provider type read. This dict is that file's content.
        """

        dashboard_port = None  # set it to debug with `ray list tasks --address http://127.0.0.1:PORT`

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            cfg = {
                "cluster_name": "skipray-fake",
                "max_workers": 8,
                "upscaling_speed": 1.0,
                "idle_timeout_minutes": 0.1,
                "provider": {
                    "type": "external",
                    "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                    "use_node_id_as_ip": True,
                    "disable_node_updaters": True,
                    "disable_launch_config_check": True,
                    "launch_multiple": True,
                    "head_node_id": FAKE_HEAD_NODE_ID,
                },
                "available_node_types": {
                    **worker_node_types,
                    "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
                },
                "head_node_type": "ray.head.default",
                "auth": {},
                "docker": {},
                "initialization_commands": [],
                "setup_commands": [],
                "head_setup_commands": [],
                "worker_setup_commands": [],
                "head_start_ray_commands": [],
                "worker_start_ray_commands": [],
                "file_mounts": {},
                "cluster_synced_files": [],
                "file_mounts_sync_continuously": False,
                "rsync_exclude": [],
                "rsync_filter": [],
            }
            cfg.update(config_kwargs)
            return cfg

        def start(self, _system_config=None, override_env=None):
            self.tmp = tempfile.mkdtemp(prefix="sr-as-")  # short: Ray's socket paths live under it
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            self._config["provider"]["gcs_address"] = self.address
            conf = Path(self.tmp) / "autoscaling.json"
            conf.write_text(json.dumps(self._config))
            env = {
                **os.environ,
                **ENV,
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                **(override_env or {}),
            }
            cmd = [
                RAY,
                "start",
                "--head",
                "--block",
                f"--autoscaling-config={conf}",
                "--port",
                str(port),
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(self._head_resources["CPU"]),
                "--object-store-memory",
                str(OBJECT_STORE),
                "--temp-dir",
                self.tmp,
                "--include-dashboard",
                "true" if self.dashboard_port else "false",
                "--disable-usage-stats",
                *(
                    ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)]
                    if self.dashboard_port
                    else []
                ),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--dashboard-agent-grpc-port",
                str(free_port()),
                "--metrics-export-port",
                str(free_port()),
                "--runtime-env-agent-port",
                str(free_port()),
            ]
            self.log = open(Path(self.tmp) / "head.log", "w")
            self.head = subprocess.Popen(
                cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT
            )
            from ray._raylet import GcsClient

            deadline = time.time() + 90
            while True:
                try:
                    self.gcs = GcsClient(address=self.address)
                    if any(n["head"] for n in self.nodes()):
                        return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if self.head.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"head did not start:\n{(Path(self.tmp) / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)

        def shutdown(self):
            head = getattr(self, "head", None)
            if head is not None:
                head.send_signal(signal.SIGTERM)  # --block: ray start stops the processes it started
                try:
                    head.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(head.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.log.close()
            if getattr(self, "tmp", None):
                if getattr(self, "logs_to", None):  # the autoscaler's own log, for failures
                    for f in (Path(self.tmp) / "session_latest" / "logs").glob("monitor*"):
                        shutil.copy(f, Path(self.logs_to) / f.name)
                for pid in _pids_naming(self.tmp):  # worker nodes the autoscaler started, if any survived
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                shutil.rmtree(self.tmp, ignore_errors=True)

        def __enter__(self):
            try:
                self.start()
            except BaseException:
                self.shutdown()
                raise
            return self

        def __exit__(self, *exc):
            self.shutdown()

        # -- what the GCS says (no ray.init in the pytest process) --------------------------------------
        def nodes(self) -> list[dict]:
            out = []
            for nid, n in self.gcs.get_all_node_info(timeout=10).items():
                out.append(
                    {
                        "id": nid.hex(),
                        "alive": n.state == 0,
                        "head": n.is_head_node,
                        "gpu": float(dict(n.resources_total).get("GPU", 0)),
                        "type": n.node_type_name,
                    }
                )
            return out

        def gpu_nodes(self) -> list[dict]:
            return [n for n in self.nodes() if n["alive"] and n["gpu"] > 0]

        def gpu_actors(self, alive_only: bool = True) -> list[dict]:
            """Actors that asked for a GPU (live ones, or every one the GCS remembers that was placed on a
            node, dead included): class name and the node they ran on."""
            import asyncio

            async def fetch():  # the future belongs to the loop that is running when it is created
                return await self.gcs.async_get_all_actor_info(timeout=10)

            infos = asyncio.run(fetch())
            return [
                {"class": a.class_name, "node": a.address.node_id.hex(), "state": a.state}
                for a in infos.values()
                if dict(a.required_resources).get("GPU", 0) > 0
                and (a.state == 2 if alive_only else any(a.address.node_id))
            ]

    return LocalAutoscalingCluster


def _pids_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def cluster(logs_to: Path | None = None):
    head, workers, extra = node_types_from_launcher()
    c = _autoscaling_cluster_class()(head, workers, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, **extra)
    c.logs_to = logs_to
    return c


def launcher_gpu_types() -> set[str]:
    return {n for n, t in node_types_from_launcher()[1].items() if t["resources"].get("GPU", 0) > 0}


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


# -- the Serve deployer (script mode) ----------------------------------------------------------------
def serve_main(address: str, model: str, port: str) -> None:
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    from skipray.resources import replica_options
    from skipray.serve.app import build_app

    ray.init(address=address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": int(port)})
    opts = {
        "ray_actor_options": replica_options(gpus=1),
        "max_ongoing_requests": 16,
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    }
    args = {
        "model": model,
        "model_name": "tiny",
        "device": "cpu",
        "torch_threads": 1,
        "max_batch": 8,
        "max_len": 256,
        "max_tokens_limit": 128,
        "default_max_tokens": 32,
    }
    serve.run(build_app(args, opts), name="skipray", route_prefix="/")  # returns once a replica is up
    print("[deployed]", flush=True)


# -- tests ------------------------------------------------------------------------------------------
import pytest  # noqa: E402
from test_batch import prompts, read_out, write  # noqa: E402


def test_launcher_node_types_scaled_for_this_machine():
    import yaml

    cfg = yaml.safe_load(AWS.read_text())
    types = cfg["available_node_types"]
    head, workers, extra = node_types_from_launcher()
    assert head == {"CPU": max(1, types[cfg["head_node_type"]]["resources"]["CPU"] // CPU_DIVISOR)}  # no GPU
    assert set(workers) == set(types) - {cfg["head_node_type"]} and launcher_gpu_types()
    for name, t in workers.items():
        src = types[name]
        assert t["resources"]["GPU"] == src["resources"]["GPU"]
        assert t["resources"]["CPU"] == max(1, src["resources"]["CPU"] // CPU_DIVISOR) <= 2  # fits this machine
        assert (t["min_workers"], t["max_workers"]) == (src.get("min_workers", 0), src["max_workers"])
        assert t["min_workers"] == 0, "GPU workers start from zero"
    assert extra["max_workers"] == cfg["max_workers"]


def test_gpu_job_limits_leave_no_room_for_cpu_only_nodes():
    from skipray.batch import JobConfig, gpu_job_limits

    cfg = JobConfig(actors=(1, 2), cpus_per_actor=1.0, gpus_per_actor=1.0)
    head = {"Alive": True, "Resources": {"CPU": 2.0}}
    gpu_node = {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}}
    dead = {"Alive": False, "Resources": {"CPU": 64.0}}
    assert gpu_job_limits(cfg, [head]) == (4.0, 2.0)  # the head's CPUs + the two actors'
    assert gpu_job_limits(cfg, [head, gpu_node, dead]) == (7.0, 2.0)  # + the GPU node's 3 spare CPUs
    assert gpu_job_limits(cfg, [{"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]) == (3.0, 2.0)


@pytest.mark.ray
def test_check_schedulable_on_a_ray_that_cannot_grow(ray_local):
    from skipray.resources import Unschedulable, check_schedulable

    assert "fits" in check_schedulable({"CPU": 0.5, "GPU": 0}, "one actor", can_grow=False)
    t0 = time.time()
    with pytest.raises(Unschedulable, match=r"not enough GPU: one actor needs GPU 1 on one node"):
        check_schedulable({"CPU": 1, "GPU": 1}, "one actor", can_grow=False)
    assert time.time() - t0 < 5
    # a local Ray's autoscaler (v1, read-only) launches nothing: fails once the wait is over
    with pytest.raises(Unschedulable, match=r"not enough CPU.*started no node for it"):
        check_schedulable({"CPU": 64}, "one actor", can_grow=True, wait_s=3)
    assert ray_local.util.placement_group_table() == {} or all(
        p["state"] == "REMOVED" for p in ray_local.util.placement_group_table().values()
    ), "the probe is removed"


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_autoscaling_job(tmp_path, tiny_model_dir):
    n = 24
    write(tmp_path / "in.parquet", prompts(n))
    out_log, err_log = open(tmp_path / "driver.out", "w"), open(tmp_path / "driver.err", "w")
    gpu_types = launcher_gpu_types()
    with cluster(tmp_path) as c:
        assert c.gpu_nodes() == [], "GPU workers start from zero (min_workers 0)"
        env = {**os.environ, **ENV, "RAY_ADDRESS": c.address}
        t0 = time.time()
        drv = subprocess.Popen(
            [
                PY,
                "jobs/generate.py",
                "--input",
                str(tmp_path / "in.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_model_dir),
                "--actors",
                "1,2",
                "--gpus-per-actor",
                "1",
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--bucket-window",
                "1",
                "--max-new-tokens",
                "4",
                "--shared-mount",
            ],  # the fake cluster's nodes share this machine's disk
            stdout=out_log,
            stderr=err_log,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        up = None
        seen_nodes: dict[str, str] = {}
        actors: dict[tuple[str, str], float] = {}
        last_actor = None
        head_id = next(x["id"] for x in c.nodes() if x["head"])
        try:
            while drv.poll() is None and time.time() - t0 < 150:
                for node in c.gpu_nodes():
                    seen_nodes[node["id"]] = node["type"]
                    up = up if up is not None else time.time() - t0
                for a in c.gpu_actors():
                    actors.setdefault((a["class"], a["node"]), time.time() - t0)
                    last_actor = time.time()
                time.sleep(0.5)
        finally:
            _kill_group(drv)
        done = time.time()
        wall = done - t0
        for a in c.gpu_actors(alive_only=False):  # a fast job's actors may live between two polls
            actors.setdefault((a["class"], a["node"]), wall)
        out_log.close(), err_log.close()
        stdout, stderr = (tmp_path / "driver.out").read_text(), (tmp_path / "driver.err").read_text()
        assert drv.returncode == 0, (wall, stdout[-2000:], stderr[-4000:])
        while c.gpu_nodes() and time.time() - done < 60:
            time.sleep(0.5)
        gone = time.time()
        down, idle = gone - done, gone - (last_actor or done)
        left = c.gpu_nodes()
    line = [x for x in stdout.splitlines() if x.startswith("[skipray] rows")]
    assert line and f"rows {n} | errors 0" in line[0], stdout[-2000:]
    ids = read_out(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == [f"r{i:03d}" for i in range(n)], "every row written exactly once"
    assert up is not None and seen_nodes, "no GPU node was started"
    assert set(seen_nodes.values()) <= gpu_types, seen_nodes  # any of aws.yaml's GPU types
    assert len(seen_nodes) <= 2, f"more GPU nodes than the pool's 2 actors: {seen_nodes}"
    assert actors, "no GPU actor seen"
    assert all(node in seen_nodes and node != head_id for _, node in actors), (actors, seen_nodes, head_id)
    assert not left, f"GPU nodes not removed {down:.0f}s after the job: {left}"
    how = [x for x in stderr.splitlines() if x.startswith("[skipray] resources")]
    print(
        f"\n[autoscaling job] first GPU node alive {up:.1f}s after submit; {len(seen_nodes)} GPU node(s) "
        f"{sorted(set(seen_nodes.values()))}; {len(actors)} actor(s) on them; job {wall:.1f}s; GPU nodes gone "
        f"{idle:.1f}s after the last actor was seen, {down:.1f}s after the job ended (idle timeout "
        f"{IDLE_TIMEOUT_MINUTES * 60:.0f}s); {how[:1]}"
    )


@pytest.mark.slow
@pytest.mark.ray
def test_job_asking_for_impossible_gpus_fails_fast(tmp_path, tiny_model_dir):
    write(tmp_path / "in.parquet", prompts(4))
    with cluster() as c:
        env = {**os.environ, **ENV, "RAY_ADDRESS": c.address}
        t0 = time.time()
        drv = subprocess.Popen(
            [
                PY,
                "jobs/generate.py",
                "--input",
                str(tmp_path / "in.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_model_dir),
                "--gpus-per-actor",
                "2",
                "--device",
                "cpu",
                "--max-new-tokens",
                "4",
                "--shared-mount",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            out, err = drv.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _kill_group(drv)
            raise AssertionError("an impossible GPU request was still waiting after 60 s") from None
        wall = time.time() - t0
        assert c.gpu_nodes() == [], "nothing to launch for it"
    assert drv.returncode == 2, (out[-2000:], err[-3000:])
    msg = [x for x in err.splitlines() if x.startswith("generate: error:")]
    assert msg and "not enough GPU" in msg[0] and "GPU 2" in msg[0], err[-3000:]
    assert not (tmp_path / "out").exists()
    print(f"\n[autoscaling infeasible] exit 2 after {wall:.1f}s: {msg[0]}")


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_autoscaling_serve(tmp_path, tiny_model_dir):
    import requests

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with cluster() as c:
        assert c.gpu_nodes() == []
        env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT / 'tests' / 'batch'}:{ROOT}"}
        t0 = time.time()
        with open(tmp_path / "deploy.log", "w") as log:
            dep = subprocess.Popen(
                [PY, __file__, "serve", c.address, str(tiny_model_dir), str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            first_node = None
            try:
                while dep.poll() is None and time.time() - t0 < 120:
                    if first_node is None and c.gpu_nodes():
                        first_node = time.time() - t0
                    time.sleep(0.5)
            finally:
                _kill_group(dep)
        out = (tmp_path / "deploy.log").read_text()
        assert dep.returncode == 0 and "[deployed]" in out, out[-4000:]
        first_up = time.time() - t0
        first = c.gpu_nodes()
        replicas = c.gpu_actors()
        assert len(first) == 1 and len(replicas) == 1 and replicas[0]["node"] == first[0]["id"], (first, replicas)
        assert requests.get(f"{base}/health", timeout=10).status_code == 200

        stop, codes = threading.Event(), []

        def client():
            with requests.Session() as h:
                while not stop.is_set():
                    r = h.post(
                        f"{base}/v1/completions",
                        timeout=60,
                        json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 96},
                    )
                    codes.append(r.status_code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        t1 = time.time()
        for t in threads:
            t.start()
        second_node = second_replica = None
        try:
            while time.time() - t1 < 120:
                nodes, reps = c.gpu_nodes(), c.gpu_actors()
                if second_node is None and len(nodes) >= 2:
                    second_node = time.time() - t1
                if len(reps) >= 2 and len({r["node"] for r in reps}) == 2:
                    second_replica = time.time() - t1
                    break
                time.sleep(0.5)
            time.sleep(2)  # let the second replica take some of the load
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert second_replica is not None, f"no second GPU replica within 120 s: {c.gpu_nodes()} {c.gpu_actors()}"
        assert all(r["node"] in {x["id"] for x in c.gpu_nodes()} for r in c.gpu_actors())
        t2 = time.time()
        while len(c.gpu_nodes()) > 1 and time.time() - t2 < 90:
            time.sleep(0.5)
        down = time.time() - t2
        nodes, reps = c.gpu_nodes(), c.gpu_actors()
        assert len(nodes) == 1 and len(reps) == 1, (
            f"not back to one GPU node {down:.0f}s after the load: {nodes} {reps}"
        )
        assert (
            requests.post(
                f"{base}/v1/completions", timeout=30, json={"model": "tiny", "prompt": "Hi", "max_tokens": 4}
            ).status_code
            == 200
        )
    assert codes and set(codes) == {200}, {x: codes.count(x) for x in set(codes)}
    print(
        f"\n[autoscaling serve] first GPU node alive {first_node:.1f}s after the deployer started, its replica "
        f"serving at {first_up:.1f}s; under load (8 clients) "
        f"second GPU node alive in {second_node:.1f}s, second replica's actor alive on it in {second_replica:.1f}s; "
        f"{len(codes)} requests, all 200; back to one GPU node {down:.1f}s after the load ended"
    )


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "serve":
    serve_main(*sys.argv[2:])
