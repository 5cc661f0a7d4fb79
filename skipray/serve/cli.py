"""`skipray serve`: start the OpenAI-compatible server on an embedded local Ray and block until Ctrl-C.

Contract: ``register(subparsers)`` adds the subcommand; ``cmd_serve(args) -> int`` reads the Serve
config YAML (default: the packaged ``skipray/serve/config.yaml``), applies ``--host``/``--port``/
``--model``/``--num-cpus``/``--scheduling-policy`` overrides and ``--api-key`` s (given to the replicas
through ``SKIPRAY_API_KEY`` in the environment, never in the app's args), warns when it binds an address
other than loopback with no key, starts a loopback-only local Ray and Serve, runs the first
application of the config through ``skipray.serve.app.build_app`` with that application's
``deployments[0]`` options, and shuts both down on exit. Ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API on Ray Serve (blocks until Ctrl-C)")
    p.add_argument("--config", default=None, help="Serve config YAML (default: skipray/serve/config.yaml)")
    p.add_argument("--host", default=None, help="bind address (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's, 8000)")
    p.add_argument("--model", default=None, help="model spec: 'default', 'smollm2-base', a dir or .gguf")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the replicas run the model (default: the config's; cuda requests one GPU per replica "
        "and is refused when this machine has none)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (repeatable; "
        "also SKIPRAY_API_KEY, several separated by commas)",
    )
    p.add_argument(
        "--scheduling-policy",
        choices=("fcfs", "priority"),
        default=None,
        help="fcfs (default): requests are admitted in arrival order and a non-zero 'priority' is a 400; "
        "priority: lower 'priority' first",
    )
    p.set_defaults(func=cmd_serve)


def load_config(path: str | None) -> dict:
    import yaml

    from skipray.serve import CONFIG

    with open(path or CONFIG) as f:
        cfg = yaml.safe_load(f)
    if not cfg or not cfg.get("applications"):
        raise ValueError(f"{path or CONFIG} has no applications")
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    http = dict(cfg.get("http_options") or {})
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    app_cfg = cfg["applications"][0]
    app_args = dict(app_cfg.get("args") or {})
    if args.model:
        app_args["model"] = args.model
    if args.device:
        app_args["device"] = args.device
    if args.scheduling_policy:
        app_args["scheduling_policy"] = args.scheduling_policy
    if args.api_key:  # to the replicas through the environment the embedded Ray inherits, never in the args
        from skipray.serve.guard import API_KEY_ENV

        os.environ[API_KEY_ENV] = ",".join([*args.api_key, os.environ.get(API_KEY_ENV, "")]).strip(",")
    from skipray.serve.guard import api_keys_from

    if not api_keys_from(app_args) and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"[skipray] warning: no API key is set and the server binds {host}: anyone who can reach "
            f"port {port} can use it (pass --api-key or set SKIPRAY_API_KEY)",
            file=sys.stderr,
        )
    deployments = app_cfg.get("deployments") or []
    dep_opts = {k: v for k, v in (deployments[0] if deployments else {}).items() if k != "name"}

    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray itself on loopback
    import ray
    from ray import serve

    from skipray.env import worker_env
    from skipray.serve.app import build_app

    def _stop(signum, frame):  # SIGTERM (service managers, `kill`) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    ray.init(
        num_cpus=args.num_cpus,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": worker_env()},
    )
    if str(app_args.get("device") or "").startswith("cuda") and not ray.cluster_resources().get("GPU", 0):
        print(
            "skipray serve: error: device cuda asked for, but this machine has no GPU that Ray can see "
            "(use --device cpu)",
            file=sys.stderr,
        )
        ray.shutdown()
        return 2
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(app_args, dep_opts),
            name=app_cfg.get("name", "skipray"),
            route_prefix=app_cfg.get("route_prefix", "/"),
        )
        print(
            f"[skipray] serving {app_args.get('model', 'default')} as {app_args.get('model_name', 'skipray')!r} "
            f"on http://{host}:{port}/v1 (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("[skipray] stopping", file=sys.stderr)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
