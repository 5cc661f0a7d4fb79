"""The engine's configuration, its context and its length check (pure Python: no torch, no Ray).

Contract:

* ``EngineConfig`` is every limit of one ``skipray.core.engine.Engine``, frozen, passed whole to the
  ``Scheduler`` and the ``ModelRunner``, and built by the Serve app and the batch actor. Fields carry
  vLLM's names where vLLM has the setting (``max_num_seqs``, ``max_model_len``,
  ``max_num_batched_tokens``) and skipray's own otherwise. Construction validates and raises
  ``ValueError`` for a value no engine can run with. ``replace(**changes)`` is ``dataclasses.replace``
  that also accepts the older names ``max_batch`` (``max_num_seqs``) and ``max_len`` (``max_model_len``).
* ``context_length(max_model_len, max_positions)`` is the one definition of the context: the tokens a
  request's prompt plus its new tokens may take, ``max_model_len`` capped by the model's positions
  (``EngineConfig.context`` for an engine's config).
* ``check_length(prompt_len, max_tokens, context)`` is the one length check: the engine, the server and
  the batch rows call it, so a request too long for the context fails everywhere with the same message.

The defaults (32 rows of 512 slots, 64 waiting, 2048 prompt tokens per admission, chunked prefill off)
suit a library call on a CPU; vLLM's (256 sequences, the model's whole context) suit a GPU server with a
paged cache, while skipray preallocates ``max_num_seqs x max_model_len`` slots. The Serve app and the
batch actor set their own sizes from their configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OLD_NAMES = {"max_batch": "max_num_seqs", "max_len": "max_model_len"}  # earlier Engine keywords -> fields


@dataclass(frozen=True)
class EngineConfig:
    """Every limit of one engine (module contract).

    ``max_num_seqs``: cache rows, the requests that run at once. ``max_model_len``: cache slots per row,
    the context of requests that ``add_request`` takes (``context``; ``generate`` / ``stream`` grow the
    cache for longer calls, up to the model's positions). ``max_num_batched_tokens``: chunked prefill,
    the tokens of one iteration (a decode step per decoding row plus prompt chunks), at least
    ``max_num_seqs``; None: off. ``max_waiting``: online requests that may wait (beyond:
    ``QueueFull``). ``max_prefill_tokens``: padded prompt tokens admitted per iteration (at least one
    request is). ``max_offline_rows``: rows the offline admission class may hold (None: all but a
    quarter of ``max_num_seqs``). ``max_tokens`` and ``max_prompt_len`` size the cache per layer
    (``skipray.core.runner.ModelRunner``): the new tokens (None: ``max_model_len``) and the prompt
    tokens (None: ``max_model_len - max_tokens``, or ``max_model_len - 1``) a request may have.
    ``merge_adapter``: whether positions that all use the skip adapter may run merged weights (a second
    copy of every adapted linear, built on first use) instead of the base weights plus the low-rank
    update. None: on a CPU only, where merged weights are the fast path; never on a GPU, where that copy
    would be memory the cache sizing does not count. False also makes every row take one adapter path
    whatever its batch-mates, so greedy tokens are the same alone and batched in bf16.
    ``gpu_memory_utilization`` (vLLM's name and meaning, GPUs only): the share of the GPU's memory the engine
    may use; after loading, it profiles one full-depth prompt pass and keeps ``max_num_seqs`` to the rows
    that fit what the weights and that peak leave (``skipray.core.memory.cache_rows_for_memory``), refusing
    to start when not one row of ``max_model_len`` fits. ``enforce_eager`` (vLLM's name): True runs every pass
    eagerly; False lets decode-only steps take static shapes (``skipray.core.graphs``: batch sizes and slot
    buckets) and, on CUDA, replay one CUDA graph per shape. True by default, unlike vLLM, until the GPU check
    (``scripts/gpu_check.sh``) has run on a GPU; on a CPU static shapes only add padding."""

    max_num_seqs: int = 32
    max_model_len: int = 512
    max_num_batched_tokens: int | None = None
    max_waiting: int = 64
    max_prefill_tokens: int = 2048
    max_offline_rows: int | None = None
    max_tokens: int | None = None
    max_prompt_len: int | None = None
    merge_adapter: bool | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = True

    def __post_init__(self) -> None:
        n, length = self.max_num_seqs, self.max_model_len
        if n < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {n}")
        if length < 1:
            raise ValueError(f"max_model_len must be >= 1, got {length}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= length:
            raise ValueError(f"max_tokens must be in [1, max_model_len={length}], got {self.max_tokens}")
        if self.max_prompt_len is not None and not 1 <= self.max_prompt_len <= length - 1:
            raise ValueError(
                f"max_prompt_len must be in [1, max_model_len - 1 = {length - 1}], got {self.max_prompt_len}"
            )
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < n:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({n}), so every iteration can "
                f"step every decoding row and still prefill, got {self.max_num_batched_tokens}"
            )
        if self.max_offline_rows is not None and self.max_offline_rows < 0:
            raise ValueError(f"max_offline_rows must be >= 0, got {self.max_offline_rows}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def replace(self, **changes: int | None) -> EngineConfig:
        """A copy with ``changes`` (field names, or the older ``max_batch`` / ``max_len``). Raises
        ``TypeError`` for an unknown name or a field given under both names, ``ValueError`` as the
        constructor does."""
        fields = {f.name for f in dataclasses.fields(self)}
        new: dict[str, int | None] = {}
        for name, value in changes.items():
            field = OLD_NAMES.get(name, name)
            if field not in fields:
                raise TypeError(f"EngineConfig has no field {name!r}")
            if field in new:
                raise TypeError(f"{field} given twice (as {field} and as {name})")
            new[field] = value
        return dataclasses.replace(self, **new)

    def context(self, max_positions: int) -> int:
        """This engine's context for a model of ``max_positions`` positions (``context_length``)."""
        return context_length(self.max_model_len, max_positions)

    @property
    def prompt_limit(self) -> int:
        """The longest prompt ``add_request`` takes: ``max_prompt_len``, or the default the class docstring gives."""
        if self.max_prompt_len is not None:
            return self.max_prompt_len
        return self.max_model_len - (self.max_tokens or 1)

    @property
    def offline_limit(self) -> int:
        """Rows the offline admission class may hold: ``max_offline_rows``, or all but a quarter of the rows."""
        if self.max_offline_rows is not None:
            return self.max_offline_rows
        return self.max_num_seqs - max(1, self.max_num_seqs // 4)


def context_length(max_model_len: int | None, max_positions: int) -> int:
    """The context (module contract): ``max_model_len`` capped by the model's ``max_positions`` (None: those)."""
    return max_positions if max_model_len is None else min(max_model_len, max_positions)


def check_length(prompt_len: int, max_tokens: int, context: int, field: str = "max_tokens") -> None:
    """Raise ``ValueError`` unless a ``prompt_len``-token prompt and ``max_tokens`` (at least 1) new tokens
    fit ``context`` tokens; ``field`` names the request's field for ``max_tokens`` in the message."""
    if max_tokens < 1 or prompt_len + max_tokens > context:
        raise ValueError(
            f"this model's context is {context} tokens; the prompt has {prompt_len} and {field} is {max_tokens}"
        )
