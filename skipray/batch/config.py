"""The skip-decoding processor's config: Ray Data LLM's ``vLLMEngineProcessorConfig`` fields plus skipray's own.

Contract (pydantic 2; no Ray, no torch):

* ``SkipDecodeProcessorConfig`` accepts every field of Ray 2.60's ``vLLMEngineProcessorConfig``
  (``RAY_FIELDS`` says what each does here) and skipray's own fields (``OWN_FIELDS``); any other name
  is refused (``pydantic.ValidationError``, a ``ValueError``), as Ray's config refuses it.
* A setting that skipray cannot apply (a Ray field or an ``engine_kwargs`` key with no effect on a
  skip-decoding engine) is accepted and named in one ``SkipDecodeConfigWarning`` per config instance,
  never per row and never silently dropped. ``task_type`` other than ``"generate"`` is refused: this
  processor generates text only.
* Sizes, Ray's meanings: ``batch_size`` is the rows of one Ray Data batch, handed to one actor call
  (``window``); ``engine_kwargs["max_num_seqs"]`` is the rows the engine runs at once
  (``engine_rows``, at most the batch: an actor holds one batch at a time). Given neither, the engine
  runs 32 rows and a batch is ``32 x bucket_window`` rows; given one, the other follows from it
  (``max_num_seqs`` defaults to ``batch_size``; ``batch_size`` to ``max_num_seqs x bucket_window``).
  ``concurrency``: ``n`` is an autoscaling pool of 1 to ``n`` actors (Ray's engine stage,
  ``ProcessorConfig.get_concurrency(autoscaling_enabled=True)``), ``(min, max)`` as given (``pool``).
* ``engine_kwargs`` keys mapped onto the engine: ``max_num_seqs``, ``max_model_len`` (the context of
  the length check, as the ``max_model_len`` field), ``max_num_batched_tokens`` and
  ``enable_chunked_prefill`` (``chunked_prefill_tokens``, ``prefill_tokens``), ``enforce_eager``
  (``EngineConfig.enforce_eager``; default True), and ``task_type`` (must match the field).
* The chat template (``chat_template_stage``: a bool, a dict or Ray's ``ChatTemplateStageConfig``):
  ``enabled`` (False: ``messages`` rows are error rows), ``chat_template`` (a Jinja template that
  replaces the model's) and ``chat_template_kwargs`` (the template's variables, e.g.
  ``{"enable_thinking": False}``); ``build_processor(builder_kwargs={"chat_template_kwargs": ...})``
  gives them where the stage does not (``template_kwargs``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from skipray.batch.params import resolve

DEFAULT_ENGINE_ROWS = 32  # engine rows when neither batch_size nor engine_kwargs["max_num_seqs"] is given
DEFAULT_CHUNK_TOKENS = 2048  # chunked prefill's budget when enable_chunked_prefill comes without one

# Ray 2.60's vLLMEngineProcessorConfig fields -> what skipray does with each (the reference docs' table):
# implemented; mapped (onto the engine); accepted (the output is what Ray's would be, or documented);
# warned (no effect: named in the config's warning when given)
RAY_FIELDS = {
    "batch_size": "implemented",
    "accelerator_type": "implemented",
    "concurrency": "implemented",
    "model_source": "implemented",
    "runtime_env": "implemented",
    "max_pending_requests": "warned",
    "max_concurrent_batches": "warned",
    "max_tasks_in_flight_per_actor": "implemented",
    "should_continue_on_error": "accepted",
    "chat_template_stage": "implemented",
    "tokenize_stage": "accepted",
    "detokenize_stage": "accepted",
    "prepare_multimodal_stage": "warned",
    "engine_kwargs": "mapped",
    "task_type": "implemented",
    "log_engine_metrics": "implemented",
    "dynamic_lora_loading_path": "warned",
    "placement_group_config": "warned",
}
OWN_FIELDS = (
    "bucket_window",
    "num_gpus_per_actor",
    "num_cpus_per_actor",
    "torch_threads",
    "device",
    "apply_chat_template",
    "sampling_params",
    "schedule",
    "id_column",
    "max_model_len",
    "engine_retries",
)
ENGINE_KWARGS = (
    "max_num_seqs",
    "max_model_len",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "enforce_eager",
    "task_type",
)

# Ray's stage configs' fields (ray.llm._internal.batch.stages.configs), stage -> its own fields
STAGE_BASE = ("enabled", "batch_size", "concurrency", "runtime_env", "num_cpus", "memory")
STAGE_FIELDS = {
    "chat_template_stage": ("model_source", "chat_template", "chat_template_kwargs"),
    "tokenize_stage": ("model_source",),
    "detokenize_stage": ("model_source",),
    "prepare_multimodal_stage": ("model_config_kwargs", "chat_template_content_format", "apply_sys_msg_formatting"),
}


class SkipDecodeConfigWarning(UserWarning):
    """A setting of ``SkipDecodeProcessorConfig`` that has no effect in skipray (module contract)."""


class ActorPool(NamedTuple):
    """How many generating actors a processor runs: between ``min_actors`` and ``max_actors`` (autoscaling)."""

    min_actors: int
    max_actors: int


def stage_settings(name: str, value: Any) -> dict[str, Any]:
    """A stage config (bool, dict, or Ray's typed ``*StageConfig``) as the dict of its settings that were
    given (``enabled`` always present); ``ValueError`` for a name the stage does not have."""
    if isinstance(value, bool):
        out: dict[str, Any] = {"enabled": value}
    elif isinstance(value, dict):
        out = dict(value)
    elif hasattr(value, "model_dump"):  # Ray's ChatTemplateStageConfig & co.
        out = value.model_dump(exclude_unset=True)
    else:
        raise ValueError(f"{name} must be a bool, a dict or Ray's stage config, got {type(value).__name__}")
    unknown = sorted(set(out) - set(STAGE_BASE) - set(STAGE_FIELDS[name]))
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown}")
    out.setdefault("enabled", name != "prepare_multimodal_stage")
    if not isinstance(out["enabled"], bool):
        raise ValueError(f"{name}.enabled must be a bool")
    return out


class SkipDecodeProcessorConfig(BaseModel):
    """The skip-decoding processor's config (module contract; every field: docs/reference/configs.md).

    Ray's fields: ``model_source`` (alias ``model``: a ``skipray.loading.load`` spec), ``batch_size``
    (rows per Ray Data batch), ``concurrency``, ``accelerator_type``, ``runtime_env`` (the tokenizing tasks'
    and the actors'), ``max_tasks_in_flight_per_actor``, ``engine_kwargs``, the stage configs,
    ``log_engine_metrics``, ``should_continue_on_error`` (skipray always continues: a row that fails is an
    output row with ``error`` set) and the ones warned about. skipray's: ``bucket_window`` (sort each batch
    by prompt length when > 1; engine batches per Ray Data batch when ``batch_size`` is not given),
    ``num_gpus_per_actor``, ``num_cpus_per_actor``, ``torch_threads`` (0: the node's cores / max actors),
    ``device`` (``cpu`` / ``cuda``; ``device="cuda"`` or an ``accelerator_type`` without GPUs asked for
    requests one GPU per actor), ``apply_chat_template`` (``prompt`` rows as one user turn),
    ``sampling_params`` (every row's defaults), ``schedule`` (skip flags or a ``SkipSchedule``; None: the
    model's trained schedule), ``id_column`` (keys per-row seeds), ``max_model_len`` (the context of the
    length check; None: the model's) and ``engine_retries``.
    """

    model_config = ConfigDict(
        protected_namespaces=(), arbitrary_types_allowed=True, populate_by_name=True, extra="forbid"
    )

    # Ray Data LLM's fields (Ray 2.60's vLLMEngineProcessorConfig)
    model_source: str = Field("default", validation_alias=AliasChoices("model_source", "model"))
    batch_size: int | None = Field(None, ge=1)
    accelerator_type: str | None = None
    concurrency: int | tuple[int, int] = 1
    runtime_env: dict[str, Any] | None = None
    max_pending_requests: int | None = None
    max_concurrent_batches: int = Field(1, ge=1)
    max_tasks_in_flight_per_actor: int | None = Field(None, ge=1)
    should_continue_on_error: bool = False
    chat_template_stage: Any = Field(True, validate_default=True)
    tokenize_stage: Any = Field(True, validate_default=True)
    detokenize_stage: Any = Field(True, validate_default=True)
    prepare_multimodal_stage: Any = Field(False, validate_default=True)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    task_type: Literal["embed", "score", "classify", "generate"] = "generate"
    log_engine_metrics: bool = True
    dynamic_lora_loading_path: str | None = None
    placement_group_config: dict[str, Any] | None = None
    # skipray's own
    bucket_window: int = Field(4, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    torch_threads: int = Field(0, ge=0)
    device: str | None = None
    apply_chat_template: bool = False
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    schedule: Any = None  # dict of skip flags | SkipSchedule | None
    id_column: str | None = "id"
    max_model_len: int | None = Field(None, ge=1)
    engine_retries: int = Field(2, ge=0)

    _ignored: list[str] = PrivateAttr(default_factory=list)  # what the warning named

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v is not None and v.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {v!r}")
        return v

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v):
        lo, hi = (1, v) if isinstance(v, int) else v
        if not 1 <= lo <= hi:
            raise ValueError(f"concurrency wants n >= 1 or (min, max) with 1 <= min <= max, got {v!r}")
        return v

    @field_validator("sampling_params")
    @classmethod
    def _sampling(cls, v):
        resolve(v, {})  # the defaults of every row: refused fields and bad values fail the config at once
        return v

    @field_validator("task_type")
    @classmethod
    def _task(cls, v):
        if v != "generate":
            raise ValueError(f"task_type {v!r}: this processor generates text only (task_type='generate')")
        return v

    @field_validator("chat_template_stage", "tokenize_stage", "detokenize_stage", "prepare_multimodal_stage")
    @classmethod
    def _stage(cls, v, info):
        return stage_settings(info.field_name, v)

    @model_validator(mode="after")
    def _resolve(self):
        if (self.accelerator_type or (self.device or "").startswith("cuda")) and not self.num_gpus_per_actor:
            self.num_gpus_per_actor = 1.0
        self._engine_kwargs()
        chat = self.chat_template_stage
        if self.apply_chat_template and not chat["enabled"]:
            raise ValueError("apply_chat_template needs the chat template: chat_template_stage is disabled")
        check_template_kwargs(chat.get("chat_template_kwargs"))
        from skipray.core.config import EngineConfig

        EngineConfig(  # the engine's limits fail the config, before any model is read
            max_num_seqs=self.engine_rows,
            max_num_batched_tokens=self.chunked_prefill_tokens,
            max_prefill_tokens=self.prefill_tokens or 2048,
        )
        self._ignored = self._no_effect()
        if self._ignored:
            warnings.warn(
                "SkipDecodeProcessorConfig: these settings have no effect in skipray: " + "; ".join(self._ignored),
                SkipDecodeConfigWarning,
                stacklevel=3,  # the code that built the config
            )
        return self

    def _engine_kwargs(self) -> None:
        """Check the mapped ``engine_kwargs`` keys; ``max_model_len`` becomes the field's value."""
        kw = self.engine_kwargs
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = kw.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"engine_kwargs[{key!r}] must be an int >= 1, got {v!r}")
        for key in ("enable_chunked_prefill", "enforce_eager"):
            if kw.get(key) not in (None, True, False):
                raise ValueError(f"engine_kwargs[{key!r}] must be a bool, got {kw[key]!r}")
        if kw.get("task_type", self.task_type) != self.task_type:
            raise ValueError(
                f"engine_kwargs['task_type'] {kw['task_type']!r} differs from task_type {self.task_type!r}"
            )
        length = kw.get("max_model_len")
        if length is not None:
            if self.max_model_len is not None and self.max_model_len != length:
                raise ValueError(
                    f"max_model_len {self.max_model_len} and engine_kwargs['max_model_len'] {length} disagree"
                )
            self.max_model_len = length

    def _no_effect(self) -> list[str]:
        """The settings given that skipray cannot apply, each with why (module contract)."""
        out = []
        if self.max_pending_requests is not None:
            out.append("max_pending_requests (an actor's engine takes one batch at a time, all of it queued)")
        if self.max_concurrent_batches != 1:
            out.append("max_concurrent_batches (an actor runs one batch at a time; size batches with batch_size)")
        if self.dynamic_lora_loading_path is not None:
            out.append("dynamic_lora_loading_path (an adapter is the model_source itself)")
        if self.placement_group_config is not None:
            out.append("placement_group_config (one actor, one device: num_gpus_per_actor, accelerator_type)")
        for name in ("chat_template_stage", "tokenize_stage", "detokenize_stage"):
            kept = (
                ("enabled", "chat_template", "chat_template_kwargs") if name == "chat_template_stage" else ("enabled",)
            )
            extra = sorted(
                k
                for k, v in getattr(self, name).items()
                if k not in kept and v is not None and not (k == "model_source" and v == self.model_source)
            )
            if extra:
                out.append(
                    f"{name} {extra} (templating and tokenizing run in one task per block, with the model's tokenizer)"
                )
        if self.prepare_multimodal_stage["enabled"]:
            out.append("prepare_multimodal_stage (the models take text only: a row with image parts is an error row)")
        extra = sorted(k for k in self.engine_kwargs if k not in ENGINE_KWARGS)
        if extra:
            out.append(f"engine_kwargs {extra} (skipray maps only {list(ENGINE_KWARGS[:-1])})")
        return out

    @property
    def ignored(self) -> list[str]:
        """The settings the config's warning named (empty: every setting given applies)."""
        return list(self._ignored)

    @property
    def pool(self) -> ActorPool:
        """The actor pool's size: ``(min, max)`` actors (an int ``n``: 1 to ``n``, as Ray's engine stage)."""
        c = self.concurrency
        return ActorPool(1, c) if isinstance(c, int) else ActorPool(*c)

    @property
    def max_num_seqs(self) -> int:
        """``engine_kwargs["max_num_seqs"]``, else ``batch_size``, else 32."""
        return self.engine_kwargs.get("max_num_seqs") or self.batch_size or DEFAULT_ENGINE_ROWS

    @property
    def window(self) -> int:
        """Rows per Ray Data batch (one actor call): ``batch_size``, else ``max_num_seqs x bucket_window``."""
        return self.batch_size or self.max_num_seqs * self.bucket_window

    @property
    def engine_rows(self) -> int:
        """The engine's rows (``EngineConfig.max_num_seqs``): ``max_num_seqs``, at most the batch."""
        return min(self.max_num_seqs, self.window)

    @property
    def chunked_prefill_tokens(self) -> int | None:
        """Chunked prefill's tokens per iteration, or None (off): ``max_num_batched_tokens`` unless
        ``enable_chunked_prefill`` is False; ``enable_chunked_prefill`` alone: max(2048, engine rows)."""
        kw = self.engine_kwargs
        on, budget = kw.get("enable_chunked_prefill"), kw.get("max_num_batched_tokens")
        if on is False:
            return None
        if budget is None:
            return max(DEFAULT_CHUNK_TOKENS, self.engine_rows) if on else None
        return budget

    @property
    def prefill_tokens(self) -> int | None:
        """Prompt tokens admitted per iteration without chunked prefill (``EngineConfig.max_prefill_tokens``):
        ``max_num_batched_tokens`` when ``enable_chunked_prefill`` is False, else None (the engine's default)."""
        kw = self.engine_kwargs
        return kw.get("max_num_batched_tokens") if kw.get("enable_chunked_prefill") is False else None

    def template_kwargs(self, builder_kwargs: dict | None = None) -> dict[str, Any]:
        """The chat template's variables: ``chat_template_stage``'s, else ``builder_kwargs``' (as Ray)."""
        stage = self.chat_template_stage.get("chat_template_kwargs")
        given = stage if stage is not None else (builder_kwargs or {}).get("chat_template_kwargs")
        check_template_kwargs(given)
        return dict(given or {})


def check_template_kwargs(kwargs: Any) -> None:
    """``ValueError`` unless ``kwargs`` is None or a dict without the chat template call's own arguments."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"chat_template_kwargs must be a dict, got {type(kwargs).__name__}")
    from skipray.serve.protocol import TEMPLATE_RESERVED

    reserved = sorted(set(kwargs) & TEMPLATE_RESERVED)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}")
