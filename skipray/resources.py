"""GPU/CPU sizing: the one place that decides device, dtype, GPUs per actor and per replica, and memory.

Contract:

* ``pick_device(device)`` is ``skipray.loading.pick_device`` (bf16 on CUDA, fp32 on CPU), re-exported
  lazily so importing this module does not import torch.
* ``GPUS_PER_ACTOR`` / ``GPUS_PER_REPLICA`` (and the CPU counterparts) are the defaults every launcher
  config, KubeRay manifest, Ray Data actor pool and Serve deployment must agree with;
  ``tests/test_cluster_configs.py`` checks the YAML files against them.
* ``actor_options(gpus)`` / ``replica_options(gpus)`` return Ray options dicts (``num_gpus``,
  ``num_cpus``) for a Ray Data actor and for a Serve replica (``ray_actor_options``).
  ``gpus=None`` means "GPU if the cluster has one": pass the count explicitly on autoscaling clusters
  whose GPU nodes may not exist yet (``ray.cluster_resources()`` shows no GPU until one starts).
* ``kv_cache_bytes(shape, batch, length, dtype_bytes)`` is exactly the size of the two buffers of
  ``skipray.core.cache.KVCache`` (``2 * layers * kv_heads * head_dim * bytes * batch * length``). Skipping
  does not shrink it: the cache is preallocated for every layer. ``weights_bytes`` is params * bytes.
* ``sizing_table(...)`` renders a markdown table; ``python -m skipray.resources`` prints it, and with
  ``--gpu-gib`` the largest batch per length and, from ``skipray.core.memory``, the KV cache per row and
  the largest batch under the ~2x / ~3x skip schedules (``skip_memory_tables``).
* ``check_schedulable(demand, what, ...)`` (driver, Ray initialised) fails fast, with
  ``Unschedulable`` naming the resource, when no node of the cluster can hold one ``demand`` bundle
  (``{"CPU": c, "GPU": g}``: one actor) and the cluster cannot grow one: nothing fits and
  ``can_grow=False`` (an embedded Ray); the autoscaler (v2) lists a probe placement group of that
  bundle as infeasible; or no node fits, the autoscaler starts none within ``wait_s`` (v1, or no
  autoscaler). A bundle that fits an existing node, that the v2 autoscaler accepts, or for which a
  node launch is pending, passes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from skipray.core.memory import cache_rows_for_memory, format_report, memory_report, preset_schedules

GPUS_PER_ACTOR: float = 1.0  # one batch-inference actor owns one GPU (the default model needs < 2 GiB)
GPUS_PER_REPLICA: float = 1.0  # one Serve replica owns one GPU
CPUS_PER_ACTOR: float = 1.0
CPUS_PER_REPLICA: float = 1.0
CPU_ACTOR_CPUS: float = 0.5  # on CPU-only Ray: fractional, so read/write tasks are not starved

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}
GIB = 1024**3


def pick_device(device: str | None = None):
    """-> (torch.device, torch.dtype): bf16 on CUDA, fp32 on CPU (see ``skipray.loading.pick_device``)."""
    from skipray.loading import pick_device as _pick

    return _pick(device)


def cluster_gpus() -> float:
    """GPUs Ray can see now (0 when Ray is not initialised)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _resolve(gpus: float | None, default: float) -> float:
    if gpus is None:
        return default if cluster_gpus() > 0 else 0.0
    if gpus < 0:
        raise ValueError(f"GPUs must be >= 0, got {gpus}")
    return float(gpus)


def actor_options(gpus: float | None = None) -> dict[str, float]:
    """Ray options for one batch-inference actor (``map_batches(..., num_gpus=, num_cpus=)``)."""
    g = _resolve(gpus, GPUS_PER_ACTOR)
    return {"num_gpus": g, "num_cpus": CPUS_PER_ACTOR if g > 0 else CPU_ACTOR_CPUS}


def replica_options(gpus: float | None = None) -> dict[str, float]:
    """``ray_actor_options`` for one Serve replica."""
    g = _resolve(gpus, GPUS_PER_REPLICA)
    return {"num_gpus": g, "num_cpus": CPUS_PER_REPLICA if g > 0 else CPU_ACTOR_CPUS}


# -- can the cluster ever hold one actor? (driver) ----------------------------------------------------
class Unschedulable(ValueError):
    """No node of the cluster, now or after the autoscaler adds one, can hold the bundle asked for."""


def _fits(total: Mapping[str, float], demand: Mapping[str, float]) -> bool:
    return all(total.get(k, 0.0) + 1e-9 >= v for k, v in demand.items() if v > 0)


def _short(totals: list[Mapping[str, float]], demand: Mapping[str, float]) -> list[str]:
    """Resources of ``demand`` that no node has enough of (all of them when only the combination fails)."""
    short = [k for k, v in demand.items() if v > 0 and all(t.get(k, 0.0) + 1e-9 < v for t in totals)]
    return short or [k for k, v in demand.items() if v > 0]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _message(what: str, demand: Mapping[str, float], totals: list[Mapping[str, float]], why: str) -> str:
    names = _short(totals, demand)
    have = ", ".join(f"{k} {_fmt(max((t.get(k, 0.0) for t in totals), default=0.0))}" for k in names)
    want = ", ".join(f"{k} {_fmt(demand[k])}" for k in names)
    return (
        f"not enough {' and '.join(names)}: {what} needs {want} on one node "
        f"({json.dumps({k: v for k, v in demand.items() if v > 0})}), but no node of this cluster has that "
        f"now (the most on one node: {have}) and {why}"
    )


def _alive_totals() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _bundles(requests) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.resources_bundle.items()} for r in requests]


def _autoscaler_view(probe_hex: str, demand: Mapping[str, float]) -> dict:
    """What the autoscaler says about the probe now.

    v2 (it reports its state to the GCS): ``decided`` once its last decision used a cluster snapshot in
    which the probe was already pending (``last_seen_cluster_resource_state_version`` past the version
    of the first snapshot that showed the probe), ``infeasible`` if it listed the probe as such. v1 (a
    JSON status in the GCS KV): only ``launching`` (a node launch is pending)."""
    import ray
    from ray._private import ray_constants
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    from ray.experimental.internal_kv import _internal_kv_get

    view = {"v2": False, "pending_at": None, "seen": -1, "infeasible": False, "launching": False}
    want = {k: float(v) for k, v in demand.items() if v > 0}
    try:
        reply = GetClusterStatusReply()
        reply.ParseFromString(ray._private.worker.global_worker.gcs_client.get_cluster_status(timeout_s=5))
        a, c = reply.autoscaling_state, reply.cluster_resource_state
        if a.autoscaler_state_version > 0 or a.last_seen_cluster_resource_state_version > 0:
            view.update(
                v2=True,
                seen=a.last_seen_cluster_resource_state_version,
                launching=bool(len(a.pending_instance_requests) or len(a.pending_instances)),
            )
            if any(probe_hex in g.details for g in c.pending_gang_resource_requests):
                view["pending_at"] = c.cluster_resource_state_version
            view["infeasible"] = any(
                probe_hex in g.details or want in _bundles(g.requests) for g in a.infeasible_gang_resource_requests
            )
            return view
    except Exception:  # noqa: BLE001 - an older or unreachable GCS: fall back to the v1 status
        pass
    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        view["launching"] = bool(report.get("pending_launches") or report.get("pending_nodes"))
    except Exception:  # noqa: BLE001
        pass
    return view


def check_schedulable(
    demand: Mapping[str, float],
    what: str = "one actor",
    *,
    can_grow: bool = True,
    wait_s: float = 45.0,
    poll_s: float = 0.5,
) -> str:
    """Raise ``Unschedulable`` (naming the resource) when the cluster can never place one ``demand``
    bundle; return how it can (a line for the log). Ray must be initialised; see the module contract.

    A probe placement group of one ``demand`` bundle asks the autoscaler the question Ray Data's actor
    would ask, without starting Ray Data: the v2 autoscaler decides on it within a round or two (5 s
    each by default) and lists it as infeasible when no node type can hold it (or the cluster is at
    ``max_workers``); with v1 a pending node launch is the only sign. A placed probe means a node fits.
    The probe is removed before returning.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    demand = {k: float(v) for k, v in demand.items() if v and v > 0}
    if not demand:
        return "nothing to place"
    totals = _alive_totals()
    if any(_fits(t, demand) for t in totals):
        return "fits a node of the cluster"
    if not can_grow:
        raise Unschedulable(_message(what, demand, totals, "this Ray cannot add nodes (an embedded local Ray)"))
    t0 = time.time()
    probe = placement_group([demand], strategy="PACK", name=f"skipray-probe-{ray.get_runtime_context().get_job_id()}")
    pending_at = None  # the first cluster snapshot version that showed the probe pending (v2)
    try:
        while True:
            if probe.wait(timeout_seconds=0):
                return f"a node that fits came up in {time.time() - t0:.1f}s"
            view = _autoscaler_view(probe.id.hex(), demand)
            if view["infeasible"]:
                raise Unschedulable(
                    _message(
                        what,
                        demand,
                        _alive_totals(),
                        "the autoscaler reports it infeasible: no node type can hold it (or the cluster is at "
                        "max_workers)",
                    )
                )
            if view["v2"]:
                pending_at = view["pending_at"] if pending_at is None else pending_at
                if pending_at is not None and view["seen"] > pending_at:  # decided with the probe in view
                    return "the autoscaler can add a node for it" + (" (launching)" if view["launching"] else "")
            elif view["launching"]:
                return "the autoscaler is launching a node"
            if time.time() - t0 > wait_s:
                raise Unschedulable(
                    _message(
                        what,
                        demand,
                        _alive_totals(),
                        f"the autoscaler started no node for it in {wait_s:g}s (no node type fits, or no autoscaler)",
                    )
                )
            time.sleep(poll_s)
    finally:
        remove_placement_group(probe)


# -- memory sizing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def params(self) -> int:
        """Parameter count of a Llama-style decoder (no biases, RMSNorm, gated MLP)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        embed = self.vocab * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * layer + embed + h

    @classmethod
    def from_config(cls, cfg: Any, name: str = "model") -> ModelShape:
        """From a Hugging Face Llama-style config object."""
        heads = cfg.num_attention_heads
        return cls(
            name,
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            heads,
            getattr(cfg, "num_key_value_heads", None) or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            cfg.vocab_size,
            bool(getattr(cfg, "tie_word_embeddings", False)),
        )


SMOLLM2_135M = ModelShape("SmolLM2-135M (default)", 30, 576, 1536, 9, 3, 64, 49152, tied_embeddings=True)
LLAMA2_7B = ModelShape("Llama-2-7B", 32, 4096, 11008, 32, 32, 128, 32000)
LLAMA3_8B = ModelShape("Llama-3-8B (GQA)", 32, 4096, 14336, 32, 8, 128, 128256)
KNOWN_SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}


def dtype_bytes(dtype: str | int) -> int:
    return dtype if isinstance(dtype, int) else DTYPE_BYTES[dtype]


def weights_bytes(shape: ModelShape, dtype: str | int = "bf16") -> int:
    return shape.params * dtype_bytes(dtype)


def kv_cache_bytes(shape: ModelShape, batch: int, length: int, dtype: str | int = "bf16") -> int:
    """K and V buffers for ``batch`` rows of ``length`` slots (prompt + new tokens), all layers."""
    return 2 * shape.num_layers * shape.kv_heads * shape.head_dim * dtype_bytes(dtype) * batch * length


def max_batch(
    shape: ModelShape,
    length: int,
    gpu_bytes: int,
    dtype: str | int = "bf16",
    utilization: float = 0.8,
    used_bytes: int | None = None,
) -> int:
    """Largest batch whose KV cache fits in ``utilization * gpu_bytes`` after ``used_bytes`` (default: the
    weights alone; an engine on a GPU measures its weights plus a profiled step's peak instead), by the
    engine's own rule (``skipray.core.memory.cache_rows_for_memory``). The default 0.8 leaves a fifth of the
    GPU for activations, logits, the CUDA context and allocator slack that this estimate does not measure."""
    used = weights_bytes(shape, dtype) if used_bytes is None else used_bytes
    return cache_rows_for_memory(gpu_bytes, used, kv_cache_bytes(shape, 1, length, dtype), utilization)


def sizing_table(
    shapes: Iterable[ModelShape] = (SMOLLM2_135M, LLAMA2_7B, LLAMA3_8B),
    batches: Sequence[int] = (1, 8, 32, 128),
    lengths: Sequence[int] = (512, 2048, 4096),
    dtype: str = "bf16",
) -> str:
    """Markdown table: weights, KV cache and total GiB per model, batch size and length."""
    rows = [
        "| model | params | weights GiB | batch | length | KV cache GiB | total GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in shapes:
        w = weights_bytes(s, dtype)
        for b in batches:
            for n in lengths:
                kv = kv_cache_bytes(s, b, n, dtype)
                rows.append(
                    f"| {s.name} | {s.params / 1e9:.2f}B | {w / GIB:.2f} | {b} | {n} | {kv / GIB:.2f} | "
                    f"{(w + kv) / GIB:.2f} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="skipray sizing", description="GPU memory for weights + KV cache")
    p.add_argument("--model", action="append", choices=sorted(KNOWN_SHAPES), help="repeatable (default: all)")
    p.add_argument("--batch", type=int, action="append", help="repeatable (default: 1 8 32 128)")
    p.add_argument("--length", type=int, action="append", help="prompt + new tokens, repeatable")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--gpu-gib", type=float, default=None, help="also print the largest batch per length")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.8,
        help="with --gpu-gib: the share of the GPU the engine may use (vLLM's name; the engine's default is 0.9 "
        "of what remains after its measured weights and profiled step, here 0.8 after the weights alone)",
    )
    p.add_argument(
        "--used-gib",
        type=float,
        default=None,
        help="with --gpu-gib: memory in use before the cache (the engine logs its measured figure; default: weights)",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="with --gpu-gib: generated tokens of each length, for the KV cache under skip schedules",
    )
    a = p.parse_args(argv)
    shapes = [KNOWN_SHAPES[m] for m in a.model] if a.model else list(KNOWN_SHAPES.values())
    lengths = a.length or [512, 2048, 4096]
    print(sizing_table(shapes, a.batch or [1, 8, 32, 128], lengths, a.dtype))
    if a.gpu_gib:
        for s in shapes:
            used = None if a.used_gib is None else int(a.used_gib * GIB)
            fits = ", ".join(
                f"len {n}: {max_batch(s, n, int(a.gpu_gib * GIB), a.dtype, a.gpu_memory_utilization, used)}"
                for n in lengths
            )
            print(f"{s.name} on {a.gpu_gib:g} GiB: max batch {fits}")
        print(skip_memory_tables(shapes, lengths, a.new_tokens, a.dtype, a.gpu_gib))
    return 0


def skip_memory_tables(
    shapes: Sequence[ModelShape],
    lengths: Sequence[int],
    new_tokens: int,
    dtype: str,
    gpu_gib: float,
    reserve: float = 0.2,
) -> str:
    """Per shape and length (prompt + ``new_tokens``): KV cache per row and the largest batch in ``gpu_gib``
    at full depth and under the benchmark's ~2x / ~3x schedules, where each layer's cache holds only what
    the schedule can fill (``skipray.core.memory``). Lengths not above ``new_tokens`` are skipped."""
    out = []
    for s in shapes:
        for n in lengths:
            if n <= new_tokens or s.num_layers < 23:
                continue
            rows = memory_report(
                preset_schedules(s.num_layers),
                s.kv_heads,
                s.head_dim,
                dtype_bytes(dtype),
                n - new_tokens,
                new_tokens,
                int(gpu_gib * GIB),
                weights_bytes(s, dtype),
                reserve,
            )
            out.append(
                format_report(
                    rows,
                    f"\n{s.name}, {dtype}, prompt {n - new_tokens} + {new_tokens} new tokens, "
                    f"{gpu_gib:g} GiB ({reserve:.0%} reserve), cache sized per layer",
                    gpu_gib,
                )
            )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
