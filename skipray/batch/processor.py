"""The skip-decoding processor on Ray Data: ``build_processor(config, preprocess, postprocess)``.

Contract (as Ray Data LLM's ``build_processor``): the processor is a callable ``Dataset -> Dataset``,
lazy like any Ray Data transform. ``processor(ds)`` runs

    preprocess (``ds.map``; its dict is merged into the row) ->
    ``repartition(target_num_rows_per_block=window)`` (streaming, no shuffle) ->
    ``skipray.batch.rows.prepare_rows`` (a task per block: tokenize, per-row params and seeds, bad rows) ->
    ``skipray.batch.actor.SkipDecodeEngineStage`` (``map_batches`` on an ``ActorPoolStrategy`` of
    ``config.pool`` actors, one engine of ``config.engine_rows`` rows each, one Ray Data batch of
    ``config.window`` rows per call; ``runtime_env``, ``accelerator_type`` and
    ``max_tasks_in_flight_per_actor`` as Ray Data LLM passes them) ->
    postprocess (``ds.map``; its dict is the output row).

``builder_kwargs`` takes what Ray Data LLM's vLLM builder takes that applies here:
``chat_template_kwargs`` (used where ``chat_template_stage`` gives none); another key is a ``TypeError``,
and the keys ``build_processor`` takes itself a ``ValueError``, as in Ray.

Without a postprocess the output rows are the input rows (columns that clash with the output names
renamed ``input_<name>``, see ``skipray.batch.rows``) plus ``num_input_tokens``, ``generated_text``,
``generated_tokens``, ``num_generated_tokens``, ``avg_layers``, ``finish_reason``, ``error`` (null
unless the row could not be generated) and ``error_kind`` ("input": the row's own input; "engine": a
failure of the engine that outlasted ``engine_retries``). The postprocess sees every row, error rows too.

``build_processor`` works in the driver: it resolves the model (a ``.gguf`` file is converted there,
once per node through the cache), reads its config on the meta device (depth, context), resolves the
default schedule and loads the tokenizer, which the tokenizing tasks get as bytes; they never load or
convert the model. Only the actors load weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skipray.batch import actor
from skipray.batch.actor import ActorSpec
from skipray.batch.rows import RowContext, ShippedTokenizer, SkipDecodeProcessorConfig, prepare_rows
from skipray.core.config import EngineConfig, context_length


@dataclass
class ModelFacts:
    """A model's facts without its weights (driver): where it is, its depth and context, its trained schedule."""

    base: Path
    adapter: Path | None
    num_layers: int
    max_positions: int
    trained: Any  # SkipSchedule | None
    cost: Any  # schedule.CostModel
    vocab_size: int = 0  # the logits' width
    eos_token_ids: tuple[int, ...] = ()


def model_facts(spec: str) -> ModelFacts:
    """Resolve ``spec`` and build the model on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from skipray.core.model import SkipModel
    from skipray.loading import resolve, trained_schedule

    base, adapter = resolve(spec)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        sm = SkipModel(AutoModelForCausalLM.from_config(config))
    try:
        eos = GenerationConfig.from_pretrained(base).eos_token_id
    except OSError:  # no generation_config.json: the model config's
        eos = config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ModelFacts(
        base,
        adapter,
        sm.num_layers,
        sm.max_positions,
        trained_schedule(base, adapter),
        sm.cost_model(),
        sm.vocab_size,
        eos_ids,
    )


def config_schedule(schedule: Any, facts: ModelFacts):
    """The config's ``schedule`` (skip flags, a ``SkipSchedule`` or its dict form, None) -> ``SkipSchedule``."""
    from skipray.core.schedule import SkipSchedule
    from skipray.options import schedule_from_flags

    if isinstance(schedule, SkipSchedule):
        return schedule
    if isinstance(schedule, dict) and "num_layers" in schedule:
        return SkipSchedule.from_dict(schedule)
    return schedule_from_flags(schedule, facts.num_layers, facts.trained).schedule


def _merge(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """Ray Data LLM's preprocess rule: the function's dict updates the row."""

    def merged(row: dict) -> dict:
        return {**row, **fn(row)}

    return merged


class SkipDecodeProcessor:
    """``Dataset -> Dataset`` (module contract). Built by ``build_processor``."""

    def __init__(
        self,
        config: SkipDecodeProcessorConfig,
        preprocess: Callable | None = None,
        postprocess: Callable | None = None,
        preprocess_map_kwargs: dict | None = None,
        postprocess_map_kwargs: dict | None = None,
        facts: ModelFacts | None = None,
        builder_kwargs: dict | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.preprocess, self.postprocess = preprocess, postprocess
        self.preprocess_map_kwargs = preprocess_map_kwargs or {}
        self.postprocess_map_kwargs = postprocess_map_kwargs or {}
        self.facts = facts or model_facts(config.model_source)
        self.schedule = config_schedule(config.schedule, self.facts)
        context = context_length(config.max_model_len, self.facts.max_positions)
        tokenizer = AutoTokenizer.from_pretrained(self.facts.base)
        chat = config.chat_template_stage
        if chat.get("chat_template"):
            tokenizer.chat_template = chat["chat_template"]  # the tasks get it with the tokenizer
        self.row_context = RowContext(
            tokenizer=ShippedTokenizer(tokenizer),
            max_model_len=context,
            num_layers=self.facts.num_layers,
            trained=self.facts.trained.to_dict() if self.facts.trained else None,
            apply_chat_template=config.apply_chat_template,
            chat_enabled=chat["enabled"],
            template_kwargs=config.template_kwargs(builder_kwargs),
            defaults=dict(config.sampling_params),
            id_column=config.id_column,
            vocab_size=self.facts.vocab_size or None,
            eos_token_ids=self.facts.eos_token_ids,
        )
        max_tokens = int(config.sampling_params.get("max_tokens") or 64)
        self.actor_spec = ActorSpec(
            model=config.model_source,
            schedule=self.schedule.to_dict(),
            engine=EngineConfig(
                max_num_seqs=config.engine_rows,
                max_model_len=min(context, 256 + max_tokens),
                max_num_batched_tokens=config.chunked_prefill_tokens,
                max_prefill_tokens=config.prefill_tokens or EngineConfig.max_prefill_tokens,
                enforce_eager=config.engine_kwargs.get("enforce_eager", EngineConfig.enforce_eager) is not False,
            ),
            bucket=config.bucket_window > 1,
            threads=config.torch_threads,
            max_actors=config.pool.max_actors,
            device=config.device,
            engine_retries=config.engine_retries,
            metrics=config.log_engine_metrics,
        )

    def __call__(self, ds):
        """preprocess -> generate -> postprocess (lazy)."""
        if self.preprocess is not None:
            ds = ds.map(_merge(self.preprocess), **self.preprocess_map_kwargs)
        ds = self.generate(ds)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess, **self.postprocess_map_kwargs)
        return ds

    def generate(self, ds):
        """The processor without pre/postprocess: rows in, rows with generations out (lazy)."""
        from ray.data import ActorPoolStrategy

        cfg = self.config
        spec = self.actor_spec
        ds = ds.repartition(target_num_rows_per_block=cfg.window)
        env = {"runtime_env": cfg.runtime_env} if cfg.runtime_env else {}
        ds = ds.map_batches(
            prepare_rows,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=0.5,
            fn_kwargs={"ctx": self.row_context},
            **env,
        )
        # an actor that crashes on a window (a device error that kills the process) is restarted and the window
        # retried engine_retries times; then the job fails, and rows not written are left for a re-run
        remote: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_actor, "max_task_retries": cfg.engine_retries, **env}
        if cfg.num_gpus_per_actor:
            remote["num_gpus"] = cfg.num_gpus_per_actor
        if cfg.accelerator_type:
            remote["accelerator_type"] = cfg.accelerator_type
        # looked up at call time, so a subclass set on the module (bench/bench_batch.py's timing) is used
        return ds.map_batches(
            actor.SkipDecodeEngineStage,
            fn_constructor_kwargs={"spec": spec},
            batch_format="pyarrow",
            batch_size=cfg.window,
            compute=ActorPoolStrategy(
                min_size=cfg.pool.min_actors,
                max_size=cfg.pool.max_actors,
                max_tasks_in_flight_per_actor=cfg.max_tasks_in_flight_per_actor,
            ),
            **remote,
        )


def build_processor(
    config: SkipDecodeProcessorConfig,
    preprocess: Callable | None = None,
    postprocess: Callable | None = None,
    preprocess_map_kwargs: dict | None = None,
    postprocess_map_kwargs: dict | None = None,
    builder_kwargs: dict | None = None,
) -> SkipDecodeProcessor:
    """A skip-decoding processor (module contract). Raises ``FileNotFoundError`` / ``ValueError`` for a
    model or schedule that cannot be used, before any Ray work; ``builder_kwargs`` as the module says."""
    given = dict(builder_kwargs or {})
    clash = sorted({"preprocess", "postprocess", "preprocess_map_kwargs", "postprocess_map_kwargs"} & set(given))
    if clash:
        raise ValueError(f"builder_kwargs cannot contain {clash}: pass them to build_processor directly")
    unknown = sorted(set(given) - {"chat_template_kwargs"})
    if unknown:
        raise TypeError(f"builder_kwargs: unexpected {unknown} (this builder takes chat_template_kwargs)")
    return SkipDecodeProcessor(
        config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs, builder_kwargs=given
    )
