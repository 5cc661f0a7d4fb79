"""The Ray Serve shim of the OpenAI-compatible server: the ``SkipServer`` deployment and the builder.

Contract:

* ``build_app(args)`` is the Serve application builder (``import_path: skipray.serve.app:build_app``);
  ``args`` (all optional): ``model`` (a ``skipray.loading.load`` spec, default ``"default"``),
  ``model_name`` (the id served in ``model``; default ``"skipray"``), ``schedule`` (skip flags as
  ``skipray.core.schedule.resolve_schedule`` takes them: ``full``, ``max_layers``, ..., plus
  ``schedule_file``); the engine's limits, which ``engine_config`` turns into the replica's
  ``skipray.core.config.EngineConfig``: ``max_batch`` (cache rows, default 16; vLLM's name
  ``max_num_seqs`` is accepted too), ``max_len`` (cache slots = the context, default 1024, capped by the
  model's; or ``max_model_len``), ``max_waiting`` (bounded waiting queue in the replica, default 32),
  ``max_prefill_tokens`` (padded prompt tokens admitted per engine iteration), ``max_num_batched_tokens``
  (chunked prefill: tokens per engine iteration, one per decoding row plus prompt chunks, at least
  ``max_batch``; unset or null: off, see ``skipray.core.scheduler``), ``max_offline_rows`` (rows the batch
  job's requests may hold; default all but a quarter of ``max_batch``); then ``max_tokens_limit``,
  ``default_max_tokens``, ``torch_threads``, ``device``, ``api_keys`` (a list; with
  ``SKIPRAY_API_KEY`` from the environment, ``skipray.serve.guard``), ``limits`` (``guard.ServeLimits``
  fields), ``scheduling_policy`` (``fcfs`` or ``priority``), ``health_max_failed_steps`` (3) and
  ``health_stall_s`` (60). ``deployment_options`` (Python callers only) are passed to
  ``SkipServer.options``; with ``serve run`` the YAML's ``deployments`` do that. ``device: cuda`` makes
  each replica request one GPU (``ray_actor_options.num_gpus``) unless the options give a number.
* Each replica loads the model, builds one ``skipray.core.engine.Engine`` and an ``OpenAIServer``
  (``skipray.serve.server``: request handling, engine loop thread) and serves the FastAPI app of
  ``skipray.serve.routes`` (built in the replica, after the constructor). Serve's health check fails for
  the reasons ``/health`` answers 503 (``EngineLoop.problem``: the loop is gone, steps keep failing, or
  work waits and no step succeeds), so Serve replaces a sick replica. When Serve stops a replica
  (scale-down, redeploy) it drains: new requests get 503, streams still open end with an error event.
  The handle methods need no API key (they are reachable only inside the cluster).
* The same replicas serve the batch job: ``completions`` / ``chat`` are handle methods (Ray Data
  LLM's ``ServeDeploymentProcessorConfig`` with ``method=`` and skipray's request models in
  ``dtype_mapping``; the HTTP routes take a Starlette request, these a request model). They yield
  OpenAI's reply object once; their requests are the engine's offline admission class (online
  requests keep priority, see ``skipray.core.scheduler``).
* This is the only module of the package that imports Ray; torch/transformers are imported inside
  the replica only.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from skipray.core.config import EngineConfig

logger = logging.getLogger(__name__)


# the builder args that size the engine: EngineConfig's fields, the first two also under their older names
ENGINE_ARGS = (
    "gpu_memory_utilization",
    "max_batch",
    "max_num_seqs",
    "max_len",
    "max_model_len",
    "max_waiting",
    "max_prefill_tokens",
    "max_num_batched_tokens",
    "max_offline_rows",
    "enforce_eager",
)
# the Serve app's own sizes, where they differ from EngineConfig's defaults
SERVE_ENGINE_CONFIG = EngineConfig(max_num_seqs=16, max_model_len=1024, max_waiting=32)


def _boolean(v: Any) -> bool:
    """A YAML or command-line boolean (``true``/``false``, also as strings); raises ``ValueError`` otherwise."""
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "false"):
        return str(v).lower() == "true"
    raise ValueError(f"expected true or false, got {v!r}")


def engine_config(args: dict[str, Any], max_positions: int) -> EngineConfig:
    """The replica's ``EngineConfig``: ``SERVE_ENGINE_CONFIG`` with the ``ENGINE_ARGS`` the builder ``args`` set
    (``max_batch`` or vLLM's ``max_num_seqs``, ``max_len`` or ``max_model_len``; a null or 0
    ``max_num_batched_tokens``: chunked prefill off), ``max_model_len`` capped by the model's ``max_positions``.
    Raises ``TypeError`` for a field given under both names, ``ValueError`` for values ``EngineConfig`` refuses."""
    given = {k: args[k] for k in ENGINE_ARGS if args.get(k) is not None}
    if not given.get("max_num_batched_tokens"):
        given.pop("max_num_batched_tokens", None)
    kinds = {"gpu_memory_utilization": float, "enforce_eager": _boolean}
    config = SERVE_ENGINE_CONFIG.replace(**{k: kinds.get(k, int)(v) for k, v in given.items()})
    return config.replace(max_model_len=min(config.max_model_len, max_positions))


def server_from_args(args: dict[str, Any]):
    """Load the model and build the replica's ``OpenAIServer`` from the builder ``args``."""
    import torch

    from skipray.core.engine import Engine
    from skipray.loading import load
    from skipray.metrics import EngineMetrics
    from skipray.options import schedule_from_flags
    from skipray.serve.guard import ServeLimits
    from skipray.serve.server import OpenAIServer
    from skipray.text import detokenizer

    if args.get("torch_threads"):
        torch.set_num_threads(int(args["torch_threads"]))
    m = load(args.get("model", "default"), device=args.get("device"))
    schedule, warning = schedule_from_flags(args.get("schedule"), m.model.num_layers, m.schedule)
    if warning:
        logger.warning("%s", warning)
    config = engine_config(args, m.model.max_positions)
    limit = int(args.get("max_tokens_limit", min(512, config.max_model_len)))
    engine = Engine(m.model, schedule, config, m.eos_token_ids, detokenize=detokenizer(m.tokenizer))
    return OpenAIServer(
        m.tokenizer,
        engine,
        schedule,
        m.schedule,
        model_name=args.get("model_name", "skipray"),
        max_tokens_limit=limit,
        default_max_tokens=int(args.get("default_max_tokens", min(256, limit))),
        metrics=EngineMetrics("serve", args.get("model_name", "skipray")),
        limits=ServeLimits.from_args(args),
        scheduling_policy=args.get("scheduling_policy") or "fcfs",
        max_failed_steps=int(args.get("health_max_failed_steps", 3)),
        health_stall_s=float(args.get("health_stall_s", 60.0)),
    )


# max_ongoing_requests: far above what a replica's engine and waiting queue hold, so that the replica's own
# queue sheds load with an OpenAI error object and Serve's proxy never answers a plain-text 503
@serve.deployment(max_ongoing_requests=1000, graceful_shutdown_timeout_s=120, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class SkipServer:
    def __init__(self, args: dict[str, Any]) -> None:
        from skipray.serve.guard import api_keys_from

        self.keys = api_keys_from(args)
        self.server = server_from_args(args)

    def __serve_build_asgi_app__(self):
        from skipray.serve.guard import ApiKeys
        from skipray.serve.routes import build_api

        return build_api(self.server, ApiKeys(self.keys))

    async def completions(self, request: Any) -> AsyncIterator[dict]:
        """Handle method for the batch job (Ray Data LLM's ``ServeDeploymentProcessorConfig`` with
        ``method="completions"``): ``request`` a ``protocol.CompletionRequest`` or its dict; yields the
        whole OpenAI reply once (that stage calls with ``stream=True``). Offline admission class."""
        yield await self.server.respond(_body(request), chat=False)

    async def chat(self, request: Any) -> AsyncIterator[dict]:
        """As ``completions`` for a ``protocol.ChatRequest`` (``method="chat"``)."""
        yield await self.server.respond(_body(request), chat=True)

    def check_health(self) -> None:
        why = self.server.problem()
        if why is not None:
            raise RuntimeError(f"unhealthy: {why}")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:  # Serve waited for in-flight requests (graceful_shutdown_timeout_s); drain the rest
            server.loop.drain()
            server.loop.close()


def _body(request: Any) -> dict:
    """A request model (fields the caller set) or a dict -> the JSON body the server validates; a body it
    refuses raises ``protocol.RequestError`` (a ``ValueError``: an error row for Ray Data, not a crash)."""
    from pydantic import BaseModel, ValidationError

    from skipray.serve.protocol import RequestError
    from skipray.serve.server import error_status

    try:
        return request.model_dump(exclude_unset=True) if isinstance(request, BaseModel) else dict(request)
    except (TypeError, ValueError, ValidationError) as e:
        _, err = error_status(e)
        raise RequestError(err["error"]["message"]) from None


def build_app(args: dict[str, Any] | None = None, deployment_options: dict[str, Any] | None = None) -> Application:
    """The Serve application (``serve run skipray.serve.app:build_app model=...`` or the YAML config)."""
    args = dict(args or {})
    opts = dict(deployment_options or {})
    if str(args.get("device") or "").startswith("cuda"):  # a CUDA replica must request its GPU from Ray
        actor = dict(opts.get("ray_actor_options") or {"num_cpus": 1})
        if not actor.get("num_gpus"):
            actor["num_gpus"] = 1
        opts["ray_actor_options"] = actor
    dep = SkipServer.options(**opts) if opts else SkipServer
    return dep.bind(args)
