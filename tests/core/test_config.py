"""EngineConfig: its validation, the one definition of the context and the one length check, and that the
engine, the server and the batch rows all use them (no Ray started here)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
from conftest import tiny_llama

from skipray.core.config import EngineConfig, check_length, context_length
from skipray.core.engine import Engine
from skipray.core.model import SkipModel
from skipray.core.requests import SamplingParams


def message(prompt_len: int, max_tokens: int, context: int, field: str = "max_tokens") -> str:
    with pytest.raises(ValueError) as e:
        check_length(prompt_len, max_tokens, context, field)
    return str(e.value)


# -- the config --------------------------------------------------------------------------------------------
def test_defaults_and_vllm_names():
    c = EngineConfig()
    assert (c.max_num_seqs, c.max_model_len, c.max_num_batched_tokens) == (32, 512, None)
    assert (c.max_waiting, c.max_prefill_tokens, c.max_offline_rows, c.max_tokens, c.max_prompt_len) == (
        64,
        2048,
        None,
        None,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_num_seqs = 4  # type: ignore[misc]
    assert c == EngineConfig() and hash(c) == hash(EngineConfig())  # a value: usable as a default, in a spec


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
        ({"max_model_len": 0}, "max_model_len must be >= 1"),
        ({"max_model_len": 8, "max_tokens": 9}, r"max_tokens must be in \[1, max_model_len=8\], got 9"),
        ({"max_tokens": 0}, "max_tokens must be in"),
        ({"max_model_len": 64, "max_prompt_len": 64}, r"max_prompt_len must be in \[1, max_model_len - 1 = 63\]"),
        ({"max_prompt_len": 0}, "max_prompt_len must be in"),
        ({"max_waiting": -1}, "max_waiting must be >= 0"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens must be >= 1"),
        ({"max_num_seqs": 8, "max_num_batched_tokens": 7}, r"max_num_batched_tokens must be >= max_num_seqs \(8\)"),
        ({"max_offline_rows": -1}, "max_offline_rows must be >= 0"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


def test_valid_edges():
    EngineConfig(max_num_seqs=8, max_num_batched_tokens=8, max_waiting=0, max_offline_rows=0)
    EngineConfig(max_model_len=8, max_tokens=8)
    EngineConfig(max_model_len=64, max_prompt_len=63)


def test_derived_limits():
    assert EngineConfig(max_model_len=64).prompt_limit == 63
    assert EngineConfig(max_model_len=64, max_tokens=16).prompt_limit == 48
    assert EngineConfig(max_model_len=64, max_tokens=16, max_prompt_len=10).prompt_limit == 10
    assert EngineConfig(max_num_seqs=8).offline_limit == 6  # all but a quarter
    assert EngineConfig(max_num_seqs=2).offline_limit == 1  # at least one row stays online
    assert EngineConfig(max_num_seqs=8, max_offline_rows=0).offline_limit == 0


def test_replace_takes_the_older_names():
    c = EngineConfig().replace(max_batch=4, max_len=64, max_waiting=3)
    assert c == EngineConfig(max_num_seqs=4, max_model_len=64, max_waiting=3)
    assert c.replace(max_num_seqs=2).max_num_seqs == 2
    with pytest.raises(TypeError, match="given twice"):
        c.replace(max_batch=4, max_num_seqs=4)
    with pytest.raises(TypeError, match="no field 'max_rows'"):
        c.replace(max_rows=4)
    with pytest.raises(ValueError, match="max_prefill_tokens"):  # replace validates as construction does
        c.replace(max_prefill_tokens=0)


# -- the context and the length check ----------------------------------------------------------------------
def test_context_is_max_model_len_capped_by_the_model():
    assert context_length(512, 2048) == 512 and context_length(4096, 2048) == 2048
    assert context_length(None, 2048) == 2048  # no max_model_len: the model's
    assert EngineConfig(max_model_len=100).context(64) == 64 == context_length(100, 64)


def test_check_length():
    check_length(10, 54, 64)  # exactly fits
    assert message(10, 55, 64) == "this model's context is 64 tokens; the prompt has 10 and max_tokens is 55"
    assert message(64, 0, 64) == "this model's context is 64 tokens; the prompt has 64 and max_tokens is 0"
    assert message(1, 99, 64, "max_completion_tokens").endswith("max_completion_tokens is 99")


# -- the engine takes the config whole ---------------------------------------------------------------------
def test_engine_takes_the_config_whole():
    model = SkipModel(tiny_llama(num_layers=4))
    cfg = EngineConfig(max_num_seqs=3, max_model_len=40, max_waiting=5)
    eng = Engine(model, config=cfg)
    assert eng.config is cfg and eng.scheduler.config is cfg and eng.runner.config is cfg
    assert eng.cache.max_batch == 3 and eng.cache.max_len == 40
    assert eng.context == cfg.context(model.max_positions) == 40
    # the older keywords build the same config; keywords over a config replace its fields
    assert Engine(model, max_batch=3, max_len=40, max_waiting=5).config == cfg
    assert Engine(model, None, cfg, max_num_seqs=2).config == dataclasses.replace(cfg, max_num_seqs=2)
    with pytest.raises(TypeError, match="given twice"):
        Engine(model, max_len=40, max_model_len=40)
    with pytest.raises(TypeError, match="no field"):
        Engine(model, max_rows=3)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        Engine(model, None, 4)  # the older positional max_batch
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(model, max_batch=8, max_num_batched_tokens=7)


def test_the_engine_uses_the_one_length_check():
    model = SkipModel(tiny_llama(num_layers=4))
    eng = Engine(model, max_batch=2, max_len=40)
    with pytest.raises(ValueError) as e:
        eng.add_request([5] * 30, SamplingParams(max_tokens=11))
    assert str(e.value) == message(30, 11, 40)
    eng.add_request([5] * 30, SamplingParams(max_tokens=10))  # 30 + 10 = 40 fits
    # generate grows the cache past max_model_len: only the model's positions bound it, with the same message
    n = model.max_positions
    with pytest.raises(ValueError) as e:
        Engine(model, max_batch=2, max_len=40).generate([[5] * 10], SamplingParams(max_tokens=n))
    assert str(e.value) == "prompt 0: " + message(10, n, n)


# -- the server and the batch rows use the same check ------------------------------------------------------
def test_the_server_turns_the_length_check_into_a_400():
    from skipray.serve import protocol as P
    from skipray.serve.prepare import RequestPreparation

    class Prep(RequestPreparation):  # only what _prepare reads before the length check
        context, max_tokens_limit, default_max_tokens = 64, 512, 256
        model_name, scheduling_policy = "tiny", "fcfs"

    for field in ("max_tokens", "max_completion_tokens"):
        req = P.CompletionRequest.model_validate({"model": "tiny", "prompt": "x", field: 20})
        with pytest.raises(P.RequestError) as e:
            Prep()._prepare(req, [5] * 50)
        err = e.value
        assert (err.status, err.param, err.code) == (400, field, "context_length_exceeded")
        assert err.message == message(50, 20, 64, field)
    req = P.CompletionRequest.model_validate({"model": "tiny", "prompt": "x"})  # no max_tokens; the prompt fills it all
    with pytest.raises(P.RequestError) as e:
        Prep()._prepare(req, [5] * 64)
    assert e.value.message == message(64, 0, 64)


class WordTokenizer:
    """One token per word: enough for the tokenizing step (picklable, no files)."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [7] * len(text.split())

    def __len__(self) -> int:
        return 100


def test_the_batch_rows_use_the_same_check():
    from skipray.batch.rows import RowContext, ShippedTokenizer, prepare_rows

    ctx = RowContext(
        tokenizer=ShippedTokenizer(WordTokenizer()),
        max_model_len=context_length(64, 2048),
        num_layers=4,
        trained=None,
        defaults={"max_tokens": 8},
    )
    out = prepare_rows(pa.table({"prompt": ["a b c", "w " * 60]}), ctx).to_pylist()
    assert out[0]["error"] is None and out[0]["num_input_tokens"] == 3
    assert out[1]["error"] == "prompt too long: " + message(60, 8, 64)


# -- the Serve app and the batch processor build theirs through EngineConfig --------------------------------
def test_the_serve_app_builds_its_engine_config():
    pytest.importorskip("ray")
    from skipray.serve.app import engine_config

    assert engine_config({}, 2048) == EngineConfig(max_num_seqs=16, max_model_len=1024, max_waiting=32)
    assert engine_config({}, 512).max_model_len == 512  # capped by the model's context
    old = {"max_batch": 8, "max_len": 256, "max_waiting": 4, "max_prefill_tokens": 100, "max_offline_rows": 2}
    want = EngineConfig(max_num_seqs=8, max_model_len=256, max_waiting=4, max_prefill_tokens=100, max_offline_rows=2)
    assert engine_config(old, 2048) == want
    assert engine_config({"max_num_seqs": 8, "max_model_len": "256"}, 2048) == EngineConfig(
        max_num_seqs=8, max_model_len=256, max_waiting=32
    )
    for off in (None, 0):
        assert engine_config({"max_num_batched_tokens": off}, 2048).max_num_batched_tokens is None
    assert engine_config({"max_num_batched_tokens": 32}, 2048).max_num_batched_tokens == 32
    assert engine_config({}, 2048).enforce_eager and not engine_config({"enforce_eager": "false"}, 2048).enforce_eager
    assert not engine_config({"enforce_eager": False}, 2048).enforce_eager
    with pytest.raises(ValueError, match="true or false"):
        engine_config({"enforce_eager": "maybe"}, 2048)
    with pytest.raises(TypeError, match="given twice"):
        engine_config({"max_batch": 8, "max_num_seqs": 8}, 2048)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        engine_config({"max_batch": 16, "max_num_batched_tokens": 8}, 2048)
