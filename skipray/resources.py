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
  ``skipray.cache.KVCache`` (``2 * layers * kv_heads * head_dim * bytes * batch * length``). Skipping
  does not shrink it: the cache is preallocated for every layer. ``weights_bytes`` is params * bytes.
* ``sizing_table(...)`` renders a markdown table; ``python -m skipray.resources`` prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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


def device_for(num_gpus: float) -> str:
    """The device string an actor given ``num_gpus`` should load on (Ray sets CUDA_VISIBLE_DEVICES)."""
    return "cuda" if num_gpus > 0 else "cpu"


def actor_options(gpus: float | None = None) -> dict[str, float]:
    """Ray options for one batch-inference actor (``map_batches(..., num_gpus=, num_cpus=)``)."""
    g = _resolve(gpus, GPUS_PER_ACTOR)
    return {"num_gpus": g, "num_cpus": CPUS_PER_ACTOR if g > 0 else CPU_ACTOR_CPUS}


def replica_options(gpus: float | None = None) -> dict[str, float]:
    """``ray_actor_options`` for one Serve replica."""
    g = _resolve(gpus, GPUS_PER_REPLICA)
    return {"num_gpus": g, "num_cpus": CPUS_PER_REPLICA if g > 0 else CPU_ACTOR_CPUS}


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
    def from_config(cls, cfg: Any, name: str = "model") -> "ModelShape":
        """From a Hugging Face Llama-style config object."""
        heads = cfg.num_attention_heads
        return cls(
            name, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, heads,
            getattr(cfg, "num_key_value_heads", None) or heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, cfg.vocab_size,
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


def total_bytes(shape: ModelShape, batch: int, length: int, dtype: str | int = "bf16") -> int:
    return weights_bytes(shape, dtype) + kv_cache_bytes(shape, batch, length, dtype)


def max_batch(shape: ModelShape, length: int, gpu_bytes: int, dtype: str | int = "bf16", reserve: float = 0.2) -> int:
    """Largest batch whose weights + KV cache fit in ``(1 - reserve) * gpu_bytes`` (reserve: activations,
    logits, CUDA context, allocator slack)."""
    free = gpu_bytes * (1 - reserve) - weights_bytes(shape, dtype)
    return max(int(free // kv_cache_bytes(shape, 1, length, dtype)), 0)


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
                    f"| {s.name} | {s.params / 1e9:.2f}B | {w / GIB:.2f} | {b} | {n} | {kv / GIB:.2f} | {(w + kv) / GIB:.2f} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="skipray sizing", description="GPU memory for weights + KV cache")
    p.add_argument("--model", action="append", choices=sorted(KNOWN_SHAPES), help="repeatable (default: all)")
    p.add_argument("--batch", type=int, action="append", help="repeatable (default: 1 8 32 128)")
    p.add_argument("--length", type=int, action="append", help="prompt + new tokens, repeatable")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--gpu-gib", type=float, default=None, help="also print the largest batch per length")
    a = p.parse_args(argv)
    shapes = [KNOWN_SHAPES[m] for m in a.model] if a.model else list(KNOWN_SHAPES.values())
    lengths = a.length or [512, 2048, 4096]
    print(sizing_table(shapes, a.batch or [1, 8, 32, 128], lengths, a.dtype))
    if a.gpu_gib:
        for s in shapes:
            fits = ", ".join(f"len {n}: {max_batch(s, n, int(a.gpu_gib * GIB), a.dtype)}" for n in lengths)
            print(f"{s.name} on {a.gpu_gib:g} GiB: max batch {fits}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
