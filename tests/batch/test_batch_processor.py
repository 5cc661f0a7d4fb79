"""The skip-decoding processor (``skipray.batch.build_processor``) and the job's scale and safety pieces:
per-row seeds, column clashes and types, resume planning per row group, the model cache under
concurrency, tokenizing without the model. Ray tests use the session's local Ray (conftest)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_batch import config, read_out, tiny_dir, write  # noqa: F401  (tiny_dir: fixture)

from skipray import batch
from skipray.batch.rows import row_seed, unique_renames


def proc_config(model, **kw) -> batch.SkipDecodeProcessorConfig:
    base = dict(
        model=str(model),
        engine_kwargs={"max_num_seqs": 2},  # engine rows; a Ray Data batch is bucket_window of them
        bucket_window=2,
        num_cpus_per_actor=0.5,
        torch_threads=1,
        sampling_params={"max_tokens": 4},
    )
    base.update(kw)
    return batch.SkipDecodeProcessorConfig(**base)


# -- no Ray ----------------------------------------------------------------------------------------------
def test_config_validates_like_ray_data_llm():
    c = batch.SkipDecodeProcessorConfig(model_source="x", concurrency=(1, 3))
    assert c.pool == (1, 3) and c.model_source == "x" and batch.SkipDecodeProcessorConfig(model="y").model_source == "y"
    assert batch.SkipDecodeProcessorConfig(concurrency=2).pool == (1, 2)  # Ray's engine stage: autoscaling 1..n
    assert batch.SkipDecodeProcessorConfig(concurrency=(2, 2)).pool == (2, 2)
    with pytest.raises(ValueError, match="concurrency"):
        batch.SkipDecodeProcessorConfig(concurrency=(3, 1))
    with pytest.raises(ValueError, match="unsupported sampling params.*guided_grammar"):
        batch.SkipDecodeProcessorConfig(sampling_params={"guided_grammar": "root ::= x"})


def _config_warnings(**kw) -> tuple[batch.SkipDecodeProcessorConfig, list[str]]:
    """A config and the messages of the SkipDecodeConfigWarnings its construction raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = batch.SkipDecodeProcessorConfig(**kw)
    return c, [str(w.message) for w in caught if issubclass(w.category, batch.SkipDecodeConfigWarning)]


def test_config_takes_every_field_of_rays_vllm_config():
    from ray.data.llm import ChatTemplateStageConfig, TokenizerStageConfig, vLLMEngineProcessorConfig

    from skipray.batch.config import RAY_FIELDS

    ray_fields = set(vLLMEngineProcessorConfig.model_fields)
    assert set(RAY_FIELDS) == ray_fields <= set(batch.SkipDecodeProcessorConfig.model_fields)
    # a Ray config, dumped with every field at Ray's default, is a skipray config
    c, said = _config_warnings(**vLLMEngineProcessorConfig(model_source="m").model_dump())
    assert c.model_source == "m" and c.batch_size == 32 and c.task_type == "generate"
    assert len(said) == 1 and "max_concurrent_batches" in said[0]  # Ray's 8 batches in flight per actor
    c, said = _config_warnings(
        model_source="m",
        chat_template_stage=ChatTemplateStageConfig(chat_template_kwargs={"enable_thinking": False}),
        tokenize_stage=TokenizerStageConfig(enabled=False),
        detokenize_stage=False,
        should_continue_on_error=True,
        runtime_env={"env_vars": {"A": "1"}},
        max_tasks_in_flight_per_actor=2,
        log_engine_metrics=False,
        accelerator_type="L4",
    )
    assert said == [] and c.template_kwargs() == {"enable_thinking": False} and c.num_gpus_per_actor == 1
    with pytest.raises(ValueError, match="max_num_sequences"):  # a name outside Ray's fields and skipray's
        batch.SkipDecodeProcessorConfig(max_num_sequences=4)
    with pytest.raises(ValueError, match="generates text only"):
        batch.SkipDecodeProcessorConfig(task_type="embed")
    with pytest.raises(ValueError, match="no field"):
        batch.SkipDecodeProcessorConfig(chat_template_stage={"chat_template_kwarg": {}})
    with pytest.raises(ValueError, match="may not set"):
        batch.SkipDecodeProcessorConfig(chat_template_stage={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_config_warns_once_about_what_cannot_apply():
    c, said = _config_warnings(
        max_pending_requests=10,
        max_concurrent_batches=4,
        dynamic_lora_loading_path="/loras",
        placement_group_config={"bundles": [{"GPU": 1}]},
        prepare_multimodal_stage=True,
        chat_template_stage={"batch_size": 16, "num_cpus": 2},
        engine_kwargs={"enable_prefix_caching": True, "tensor_parallel_size": 1, "max_num_seqs": 8},
    )
    assert len(said) == 1  # one warning per config, naming every setting that has no effect
    for name in (
        "max_pending_requests",
        "max_concurrent_batches",
        "dynamic_lora_loading_path",
        "placement_group_config",
        "prepare_multimodal_stage",
        "chat_template_stage ['batch_size', 'num_cpus']",
        "engine_kwargs ['enable_prefix_caching', 'tensor_parallel_size']",
    ):
        assert name in said[0], name
    assert len(c.ignored) == 7 and c.engine_rows == 8  # mapped keys are never named
    assert _config_warnings()[1] == [] and _config_warnings(engine_kwargs={"max_model_len": 64})[1] == []


def test_batch_size_and_max_num_seqs_take_rays_meanings(tiny_dir):
    from skipray.batch.processor import SkipDecodeProcessor

    C = batch.SkipDecodeProcessorConfig
    sizes = lambda c: (c.window, c.engine_rows)  # noqa: E731 - (rows per Ray Data batch, engine rows)
    assert sizes(C()) == (128, 32)  # neither: 32 engine rows, bucket_window (4) of them per batch
    assert sizes(C(batch_size=64)) == (64, 64)  # max_num_seqs defaults to batch_size
    assert sizes(C(engine_kwargs={"max_num_seqs": 8})) == (32, 8)
    assert sizes(C(batch_size=64, engine_kwargs={"max_num_seqs": 16})) == (64, 16)
    assert sizes(C(batch_size=64, engine_kwargs={"max_num_seqs": 256})) == (64, 64)  # one batch at a time
    assert (C(concurrency=3).pool, C(concurrency=(2, 4)).pool) == ((1, 3), (2, 4))
    chunk = lambda **kw: (C(engine_kwargs=kw).chunked_prefill_tokens, C(engine_kwargs=kw).prefill_tokens)  # noqa: E731
    assert chunk() == (None, None) and chunk(enable_chunked_prefill=True) == (2048, None)
    assert chunk(max_num_batched_tokens=4096) == chunk(enable_chunked_prefill=True, max_num_batched_tokens=4096)
    assert chunk(max_num_batched_tokens=4096) == (4096, None)
    assert chunk(enable_chunked_prefill=False, max_num_batched_tokens=4096) == (None, 4096)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_num_seqs"):
        C(engine_kwargs={"max_num_seqs": 64, "max_num_batched_tokens": 16})
    assert C(engine_kwargs={"max_model_len": 64}).max_model_len == C(max_model_len=64).max_model_len == 64
    with pytest.raises(ValueError, match="disagree"):
        C(max_model_len=32, engine_kwargs={"max_model_len": 64})
    with pytest.raises(ValueError, match="max_num_seqs"):
        C(engine_kwargs={"max_num_seqs": 0})
    # the file job's --batch-size (engine rows) and --bucket-window keep their meanings
    job = config(tiny_dir, batch_size=4, bucket_window=2, actors=(1, 2)).processor_config()
    assert sizes(job) == (8, 4) and job.pool == (1, 2)
    p = SkipDecodeProcessor(
        proc_config(tiny_dir, engine_kwargs={"max_num_seqs": 4, "max_num_batched_tokens": 64}, log_engine_metrics=False)
    )
    assert p.actor_spec.engine.max_num_seqs == 4 and p.actor_spec.engine.max_num_batched_tokens == 64
    assert p.actor_spec.metrics is False


def test_chat_template_settings_reach_the_template(tiny_dir):
    from skipray.batch.processor import SkipDecodeProcessor
    from skipray.batch.rows import TOKENS

    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if shout %}LOUD{% else %}quiet{% endif %}"
    block = pa.table({"messages": [[{"role": "user", "content": "hi"}]], "prompt": [None]})

    def text(builder_kwargs=None, **stage) -> str:
        cfg = proc_config(tiny_dir, chat_template_stage={"chat_template": template, **stage})
        p = SkipDecodeProcessor(cfg, builder_kwargs=builder_kwargs)
        ids = batch.prepare_rows(block, p.row_context).column(TOKENS).to_pylist()[0]
        return p.row_context.tokenizer.get().decode(ids)

    assert text() == "hi|quiet"
    assert text(chat_template_kwargs={"shout": True}) == "hi|LOUD"
    assert text({"chat_template_kwargs": {"shout": True}}) == "hi|LOUD"  # Ray's builder_kwargs
    assert text({"chat_template_kwargs": {"shout": True}}, chat_template_kwargs={"shout": False}) == "hi|quiet"
    off = SkipDecodeProcessor(proc_config(tiny_dir, chat_template_stage=False)).row_context
    assert "chat_template_stage is disabled" in batch.prepare_rows(block, off).column("error").to_pylist()[0]
    with pytest.raises(TypeError, match="unexpected"):
        batch.build_processor(proc_config(tiny_dir), builder_kwargs={"chat_template": template})
    with pytest.raises(ValueError, match="preprocess"):
        batch.build_processor(proc_config(tiny_dir), builder_kwargs={"preprocess": None})


def test_unique_renames_never_collide():
    assert unique_renames(["id", "error", "input_error"], {"error"}) == {"error": "input_error_2"}
    r = unique_renames(["error", "input_error", "input_error_2", "generated_text"], {"error", "generated_text"})
    assert r == {"error": "input_error_3", "generated_text": "input_generated_text"}


def test_row_seeds_depend_on_seed_and_key_only():
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(0, "b")
    assert row_seed(0, "a") != row_seed(1, "a") and row_seed(0, 1) != row_seed(0, "1")
    assert 0 <= row_seed(123, ("x", 3)) < 2**63


def test_rows_are_keyed_by_id_else_text_and_rank(tmp_path, tiny_dir):
    from skipray.batch.processor import SkipDecodeProcessor
    from skipray.batch.rows import PARAMS

    cfg = proc_config(tiny_dir, sampling_params={"max_tokens": 4, "temperature": 1.0, "seed": 7})
    ctx = SkipDecodeProcessor(cfg).row_context
    same = "Tell me a story."
    with_ids = batch.prepare_rows(pa.table({"id": ["a", "b", "a"], "prompt": [same] * 3}), ctx)
    seeds = [p["seed"] for p in with_ids.column(PARAMS).to_pylist()]
    assert seeds[0] == seeds[2] == row_seed(7, "a") != seeds[1] == row_seed(7, "b")
    no_ids = batch.prepare_rows(pa.table({"prompt": [same, "other", same]}), ctx)
    seeds = [p["seed"] for p in no_ids.column(PARAMS).to_pylist()]
    assert len(set(seeds)) == 3  # identical texts: their rank in the block tells them apart
    own = batch.prepare_rows(pa.table({"id": ["a"], "prompt": [same], "sampling_params": [{"seed": 5}]}), ctx)
    assert own.column(PARAMS).to_pylist()[0]["seed"] == 5  # a row's own seed is used as is


def test_tokenizing_never_loads_or_converts_the_model(tiny_dir, monkeypatch):
    import pickle

    import skipray.loading as loading
    from skipray.batch.processor import SkipDecodeProcessor

    ctx = SkipDecodeProcessor(proc_config(tiny_dir)).row_context  # the driver's work
    shipped = pickle.loads(pickle.dumps(ctx))  # as a task receives it
    for name in ("resolve", "convert_gguf", "load", "load_hf"):
        monkeypatch.setattr(loading, name, lambda *a, **k: pytest.fail("a tokenizing task touched the model"))
    out = batch.prepare_rows(pa.table({"prompt": ["Hello there"]}), shipped)
    assert out.column("error").to_pylist() == [None] and out.column("num_input_tokens").to_pylist()[0] > 0


def test_the_processor_sizes_its_engine_through_engine_config(tiny_dir):
    from skipray.batch.processor import SkipDecodeProcessor
    from skipray.core.config import EngineConfig, context_length

    p = SkipDecodeProcessor(proc_config(tiny_dir))
    assert p.row_context.max_model_len == p.facts.max_positions == 96  # no max_model_len: the model's context
    assert p.actor_spec.engine == EngineConfig(max_num_seqs=2, max_model_len=96)  # min(context, 256 + max_tokens)
    eager = SkipDecodeProcessor(proc_config(tiny_dir, engine_kwargs={"max_num_seqs": 2, "enforce_eager": False}))
    assert not eager.actor_spec.engine.enforce_eager  # vLLM's engine kwarg: CUDA graphs on a GPU
    with pytest.raises(ValueError, match="enforce_eager"):
        proc_config(tiny_dir, engine_kwargs={"enforce_eager": "no"})
    p = SkipDecodeProcessor(proc_config(tiny_dir, max_model_len=80, sampling_params={"max_tokens": 4}))
    assert p.row_context.max_model_len == context_length(80, 96) == 80
    assert p.actor_spec.engine.max_model_len == 80


def test_invalid_rows_become_error_rows(tiny_dir):
    from skipray.batch.processor import SkipDecodeProcessor

    ctx = SkipDecodeProcessor(proc_config(tiny_dir)).row_context
    block = pa.Table.from_pylist(
        [
            {"prompt": "ok", "sampling_params": None, "skip": None, "messages": None},  # from_pylist: keys of row 0
            {"prompt": "bad param", "sampling_params": {"logits_processors": ["x"]}},
            {"prompt": "bad temperature", "sampling_params": {"temperature": -1.0}},
            {"prompt": "bad skip", "skip": {"max_layers": 99}},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "text": None}]}]},
        ]
    )
    errs = batch.prepare_rows(block, ctx).column("error").to_pylist()
    assert errs[0] is None
    assert "logits_processors" in errs[1] and "temperature" in errs[2] and "skip" in errs[3]
    assert "text only" in errs[4]


def test_mixed_column_types_across_files(tmp_path, tiny_dir):
    write(
        tmp_path / "a" / "1.parquet",
        [{"id": 1, "prompt": "p"}],
        pa.schema([("id", pa.int64()), ("prompt", pa.string())]),
    )
    write(tmp_path / "a" / "2.parquet", [{"id": "x", "prompt": "q"}])
    with pytest.raises(
        batch.InputError, match=r"column 'id' has type int64 in .*1\.parquet but string in .*2\.parquet"
    ):
        batch.check_input(str(tmp_path / "a"), None, "prompt", "id")
    write(
        tmp_path / "b" / "1.parquet",
        [{"id": 1, "prompt": "p", "score": 1}],
        pa.schema([("id", pa.int32()), ("prompt", pa.string()), ("score", pa.int32())]),
    )
    write(
        tmp_path / "b" / "2.parquet",
        [{"id": 2, "prompt": "q", "score": 0.5}],
        pa.schema([("id", pa.int64()), ("prompt", pa.large_string()), ("score", pa.float64())]),
    )
    chk = batch.check_input(str(tmp_path / "b"), None, "prompt", "id")  # widening types: read as one
    assert chk.schema.field("id").type == pa.int64() and chk.schema.field("score").type == pa.float64()
    write(tmp_path / "c" / "1.parquet", [{"id": 1.5, "prompt": "p"}])
    write(tmp_path / "c" / "2.parquet", [{"id": 2, "prompt": "q"}])
    with pytest.raises(batch.InputError, match="column 'id' has type double"):  # ids do not become floats
        batch.check_input(str(tmp_path / "c"), None, "prompt", "id")


def test_resume_plan_is_per_row_group(tmp_path):
    from skipray.batch.resume import plan_units, read_done, unbits

    path = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"id": i, "prompt": "p"} for i in range(12)] + [{"id": None, "prompt": "p"}]),
        path,
        row_group_size=4,
    )
    done = write(
        tmp_path / "out" / "1.parquet",
        [{"id": i, "source_file": str(path), "source_row": i} for i in range(5)]
        + [{"id": None, "source_file": str(path), "source_row": 12}],
    )
    chk = batch.check_input(str(path), None, "prompt", "id")
    units, pending = plan_units(chk, read_done([str(done)], None), None)
    assert pending == 7 and [u["row_group"] for u in units] == [1, 2]  # group 0 done; the null id (row 12) too
    assert list(unbits(units[0]["done"], 4)) == [True, False, False, False] and units[1]["done"] is None
    assert all(len(u["done"] or b"") <= 1 for u in units)  # a unit carries its own rows' bits, not the done ids


# -- the model cache under concurrency ------------------------------------------------------------------
class _Saves:
    """A stand-in for a model or tokenizer: ``save_pretrained`` writes one file (and maybe runs a hook)."""

    def __init__(self, name: str, hook=None) -> None:
        self.name, self.hook = name, hook

    def save_pretrained(self, d) -> None:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / self.name).write_text(str(os.getpid()))
        if self.hook:
            self.hook()


def _save(out: str, barrier) -> None:
    from skipray.loading import save_to_cache

    barrier.wait()
    save_to_cache(_Saves("model.safetensors"), _Saves("tokenizer_config.json"), Path(out))


def test_save_to_cache_tolerates_a_finished_twin(tmp_path):
    from skipray.loading import cached, save_to_cache

    out = tmp_path / "m"

    def twin() -> None:  # another process finishes the same conversion just before our rename
        save_to_cache(_Saves("model.safetensors"), _Saves("tokenizer_config.json"), out)

    assert save_to_cache(_Saves("model.safetensors"), _Saves("tokenizer_config.json", hook=twin), out) == out
    assert cached(out) and sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "junk").write_text("x")
    with pytest.raises(OSError):  # something incomplete in the way is not taken for a finished twin
        save_to_cache(_Saves("model.safetensors"), _Saves("tokenizer_config.json"), tmp_path / "partial")


def test_save_to_cache_from_many_processes_at_once(tmp_path):
    from skipray.loading import cached

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_save, args=(str(tmp_path / "m"), barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert cached(tmp_path / "m") and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# -- on the session's local Ray ------------------------------------------------------------------------------
def test_processor_on_a_users_dataset(ray_local, tiny_dir):
    import ray

    processor = batch.build_processor(
        proc_config(tiny_dir),
        preprocess=lambda row: {
            "prompt": f"Question {row['n']}: {row['question']}",
            "sampling_params": {"max_tokens": 2 if row["n"] % 2 else 3},
        },
        postprocess=lambda row: {
            "n": row["n"],
            "answer": row["generated_text"],
            "tokens": row["num_generated_tokens"],
            "error": row["error"],
        },
    )
    rows = processor(ray.data.from_items([{"n": i, "question": "what is skip decoding?"} for i in range(6)])).take_all()
    assert sorted(r["n"] for r in rows) == list(range(6))
    assert all(r["error"] is None and isinstance(r["answer"], str) for r in rows)
    assert all(1 <= r["tokens"] <= (2 if r["n"] % 2 else 3) for r in rows)

    plain = batch.build_processor(proc_config(tiny_dir, apply_chat_template=True))
    ds = ray.data.from_items(
        [
            {"prompt": "Hi", "error": "mine", "input_error": "also mine"},
            {
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "skip": {"full": True},
            },
            {"prompt": ""},
        ]
    )
    out = {r["input_error_2"] if r["input_error_2"] else r["error"] or "chat": r for r in plain(ds).take_all()}
    for name in (
        "generated_text",
        "generated_tokens",
        "num_input_tokens",
        "num_generated_tokens",
        "avg_layers",
        "logprobs",
        "finish_reason",
        "error",
        "input_error",
        "input_error_2",
    ):
        assert all(name in r for r in out.values()), name
    assert out["mine"]["input_error"] == "also mine" and out["mine"]["error"] is None
    assert out["chat"]["num_generated_tokens"] == len(out["chat"]["generated_tokens"]) >= 1
    assert out["mine"]["num_input_tokens"] > 5 and out["chat"]["num_input_tokens"] > 5  # "Hi" in the chat template
    assert out["prompt is empty"]["generated_text"] is None and out["prompt is empty"]["num_generated_tokens"] == 0


def test_samples_depend_on_the_row_not_its_batch_or_actors(ray_local, tiny_dir):
    import ray

    rows = [{"id": f"r{i}", "prompt": "Tell me a story."} for i in range(6)]
    sampling = {"max_tokens": 5, "temperature": 1.0, "seed": 0}

    def tokens(**kw) -> dict[str, list[int]]:
        p = batch.build_processor(proc_config(tiny_dir, sampling_params=sampling, **kw))
        return {r["id"]: list(r["generated_tokens"]) for r in p(ray.data.from_items(rows)).take_all()}

    a = tokens(engine_kwargs={"max_num_seqs": 4}, bucket_window=2)
    b = tokens(engine_kwargs={"max_num_seqs": 1}, bucket_window=1, concurrency=(2, 2))
    assert a == b  # other batch-mates, other actors: the same sample per row
    assert len({tuple(t) for t in a.values()}) == len(rows)  # the same prompt, other ids: other samples


def test_job_resumes_null_ids_and_clashing_columns(ray_local, tmp_path, tiny_dir):
    schema = pa.schema(
        [("id", pa.int32()), ("prompt", pa.string()), ("error", pa.string()), ("input_error", pa.string())]
    )
    write(
        tmp_path / "in" / "a.parquet",
        [{"id": i, "prompt": f"p{i}", "error": "e", "input_error": "ie"} for i in range(3)]
        + [{"id": None, "prompt": "no id", "error": "e", "input_error": "ie"}],
        schema,
    )
    write(
        tmp_path / "in" / "b.parquet",
        [{"id": 10, "prompt": "p10"}],
        pa.schema([("id", pa.int64()), ("prompt", pa.string())]),
    )
    cfg = config(tiny_dir)
    s1 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    t = read_out(tmp_path / "out")
    assert (s1.rows, s1.errors) == (5, 1) and t.schema.field("id").type == pa.int64()
    assert {"input_error", "input_error_2", "source_file", "source_row"} <= set(t.column_names)
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert by_id[0]["input_error"] == "ie" and by_id[0]["input_error_2"] == "e" and by_id[10]["input_error"] is None
    assert by_id[None]["error"] == "id is null" and by_id[None]["source_row"] == 3
    s2 = batch.run(str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert (s2.rows, s2.skipped) == (0, 5)  # the null-id row is not written again


def test_vllm_sampling_params_in_batch_rows(tiny_dir):
    """Ray Data LLM's documented example params work; every implemented vLLM field is accepted; n > 1 and
    refused fields are error rows naming them."""
    from skipray.batch.processor import SkipDecodeProcessor

    ctx = SkipDecodeProcessor(proc_config(tiny_dir)).row_context
    rows = [
        {"prompt": "a", "sampling_params": {"temperature": 0.3, "max_tokens": 20, "detokenize": False}},
        {
            "prompt": "b",
            "sampling_params": {
                "presence_penalty": 0.5,
                "frequency_penalty": 0.1,
                "repetition_penalty": 1.2,
                "min_p": 0.05,
                "min_tokens": 2,
                "stop_token_ids": [3],
                "bad_words": ["x"],
                "logit_bias": {"5": 1.0},
                "ignore_eos": True,
                "include_stop_str_in_output": True,
                "skip_special_tokens": True,
            },
        },
        {"prompt": "c", "sampling_params": {"n": 2}},
        {"prompt": "d", "sampling_params": {"guided_decoding": {"regex": "a", "choice": ["b"]}}},
    ]
    out = batch.prepare_rows(pa.Table.from_pylist(rows), ctx)
    errs = out.column("error").to_pylist()
    assert errs[:2] == [None, None] and "n > 1" in errs[2] and "guided_decoding" in errs[3]
    from skipray.batch.params import sampling_params
    from skipray.batch.rows import PARAMS

    sp = sampling_params(out.column(PARAMS).to_pylist()[1])
    assert sp.min_tokens == 2 and sp.logit_bias == {5: 1.0} and sp.bad_words_ids and sp.ignore_eos


def test_logprobs_column_in_batch_rows(ray_local, tiny_dir):
    """``sampling_params.logprobs`` k fills the row's ``logprobs``: per generated token its id, log-prob and the
    k most likely tokens (greedy: the sampled one is the top one); rows without it hold null; k > 20 is an
    error row."""
    import ray

    processor = batch.build_processor(proc_config(tiny_dir))
    ds = ray.data.from_items(
        [
            {"prompt": "Hello", "sampling_params": {"max_tokens": 4, "logprobs": 2}},
            {"prompt": "Hello", "sampling_params": {"max_tokens": 4, "logprobs": 0}},
            {"prompt": "Hello", "sampling_params": {"max_tokens": 4}},
            {"prompt": "Hello", "sampling_params": {"max_tokens": 4, "logprobs": 21}},
        ]
    )
    rows = sorted(processor(ds).take_all(), key=lambda r: (r["error"] is not None, r["logprobs"] is None))
    two, zero, none, bad = rows[0], rows[1], rows[2], rows[3]
    if len(zero["logprobs"] or []) and len(zero["logprobs"][0]["top_logprobs"]) == 2:
        two, zero = zero, two
    assert [e["token_id"] for e in two["logprobs"]] == list(two["generated_tokens"])
    for e in two["logprobs"]:
        tops = e["top_logprobs"]
        assert len(tops) == 2 and tops[0]["logprob"] >= tops[1]["logprob"] and e["logprob"] <= 0
        assert tops[0]["token_id"] == e["token_id"] and e["logprob"] == pytest.approx(tops[0]["logprob"])
    assert [e["top_logprobs"] for e in zero["logprobs"]] == [[]] * len(zero["generated_tokens"])
    assert none["logprobs"] is None and none["error"] is None
    assert "logprobs" in bad["error"] and bad["logprobs"] is None


def _ray_examples() -> list[str]:
    """The code of Ray 2.60's ``ray.data.llm.build_processor`` docstring examples (its ``testcode`` blocks)."""
    import textwrap

    from ray.data.llm import build_processor

    out = []
    for part in build_processor.__doc__.split(".. testcode::")[1:]:
        lines = part.splitlines()[1:]
        while lines and (not lines[0].strip() or lines[0].strip().startswith(":")):
            lines.pop(0)
        indent = len(lines[0]) - len(lines[0].lstrip())
        end = next((i for i, x in enumerate(lines) if x.strip() and len(x) - len(x.lstrip()) < indent), len(lines))
        out.append(textwrap.dedent("\n".join(lines[:end])))
    return out


def test_rays_build_processor_examples_run_on_skipray(ray_local, tiny_dir):
    """Ray's examples with the config class swapped to skipray's, the model to the tiny one and ``max_tokens``
    made small (the tiny model's context is 96 tokens). Ray's second example reads ``row["prompt"]`` from
    ``ray.data.range`` rows, which have only ``id`` (it fails so in Ray too): there a ``prompt`` column is added."""
    import re
    import warnings

    examples = _ray_examples()
    assert len(examples) == 3 and all("build_processor(" in e for e in examples)
    counts = []
    for i, code in enumerate(examples):
        code = code.replace(
            "from ray.data.llm import vLLMEngineProcessorConfig, build_processor",
            "from skipray.batch import SkipDecodeProcessorConfig, build_processor",
        ).replace("vLLMEngineProcessorConfig(", "SkipDecodeProcessorConfig(")
        code = re.sub(r'model_source="[^"]+"', f"model_source={str(tiny_dir)!r}", code)
        code = re.sub(r"max_tokens=\d+", "max_tokens=3", code)
        if 'row["prompt"]' in code:
            code = code.replace(
                "ray.data.range(300)", "ray.data.range(300).map(lambda r: {**r, 'prompt': str(r['id'])})"
            )
        assert "vLLMEngineProcessorConfig" not in code and "SkipDecodeProcessorConfig(" in code
        rows: list[dict] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"<Ray's build_processor example {i + 1}>", "exec"), {"print": rows.append})
        said = [str(w.message) for w in caught if issubclass(w.category, batch.SkipDecodeConfigWarning)]
        if i == 0:  # engine_kwargs: enable_prefix_caching has no effect, the chunked prefill keys are mapped
            assert len(said) == 1 and "['enable_prefix_caching']" in said[0]
        else:
            assert said == []
        assert all(r.get("error") is None for r in rows), [r["error"] for r in rows if r.get("error")][:3]
        assert all(isinstance(r.get("resp", r.get("generated_text")), str) for r in rows)
        counts.append(len(rows))
    assert counts == [300, 300, 1]
