"""Chunked prefill in the Engine: the same greedy tokens as unchunked prefill, one shared pass
per iteration within the token budget, decode rows stepping while a long prompt is chunked, faults
that stay with their request; and the engine's cache sized for a schedule."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_opt
from test_engine_requests import alone, run_staggered

from skipray.core.config import EngineConfig
from skipray.core.engine import Engine
from skipray.core.memory import layer_slots
from skipray.core.model import SkipModel
from skipray.core.requests import SamplingParams
from skipray.core.runner import ModelRunner
from skipray.core.schedule import SkipSchedule

BAD = 95  # a prompt of only this token marks the request a test makes fail


def long_jobs(vocab: int, n: int, seed: int, max_prompt: int = 40):
    rng = random.Random(seed)
    return [
        (
            rng.randint(0, 15),
            [rng.randrange(3, vocab - 3) for _ in range(rng.randint(2, max_prompt))],
            SamplingParams(max_tokens=rng.randint(4, 18)),
            None,
        )
        for _ in range(n)
    ]


class SpyRunner(ModelRunner):
    """A runner that records the segments of every shared pass it runs (``passes``)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.passes: list[list] = []

    def run(self, segments):
        self.passes.append(list(segments))
        return super().run(segments)


def spied(model, schedule=None, eos_token_ids=(), **config) -> tuple[Engine, list[list]]:
    """An engine over ``model`` whose runner records its passes; -> (engine, the passes)."""
    cfg = EngineConfig().replace(**config)
    runner = SpyRunner(model, cfg)
    return Engine(model, schedule, cfg, eos_token_ids, runner=runner), runner.passes


def is_decode(seg) -> bool:
    return seg.adapter is not None  # decode segments carry the adapter mask; prompt chunks never use it


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_chunked_prefill_equals_unchunked(arch):
    hf = tiny_llama(num_layers=8) if arch == "llama" else tiny_opt(num_layers=7)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, max_layers=L, min_layers=3, decay_tokens=10, warmup_layers=1)
    other = SkipSchedule(L, max_layers=L - 1, min_layers=2, decay_tokens=5, warmup_layers=1)
    jobs = long_jobs(model.vocab_size, 10, seed=2)
    jobs[3] = (*jobs[3][:3], other)
    jobs[6] = (*jobs[6][:3], SkipSchedule.full(L))
    chunked, passes = spied(model, sched, (2,), max_batch=4, max_len=64, max_num_batched_tokens=7)
    got = run_staggered(chunked, jobs)
    unchunked = run_staggered(Engine(model, sched, max_batch=4, max_len=64, eos_token_ids=(2,)), jobs)
    for k, (_, prompt, params, s) in enumerate(jobs):
        want = alone(model, prompt, params, s or sched, eos=(2,))
        assert got[f"r{k}"] == want == unchunked[f"r{k}"], f"request {k}"
    # prompts longer than the budget really were split, and each ran in shared passes with decode steps
    assert any(not is_decode(s) and s.start > 0 for p in passes for s in p)
    assert any(len(p) > 1 and is_decode(p[0]) for p in passes)
    assert chunked.num_running == 0 and chunked.num_waiting == 0


def test_decode_rows_keep_stepping_while_a_long_prompt_is_chunked():
    model = SkipModel(tiny_llama(num_layers=6))
    sched = SkipSchedule(6, max_layers=6, min_layers=2, decay_tokens=8, warmup_layers=1)
    eng, passes = spied(model, sched, max_batch=4, max_len=128, max_num_batched_tokens=8)
    short = [5, 6, 7]
    eng.add_request(short, SamplingParams(max_tokens=30), request_id="short")
    eng.step()  # admitted: its 3 prompt tokens in one chunk -> its first token
    long_prompt = [3 + (7 * i) % 90 for i in range(50)]
    eng.add_request(long_prompt, SamplingParams(max_tokens=5), request_id="long")
    per_step = []
    while any(r.request_id == "long" for r in eng.scheduler.prefilling) or eng.num_waiting:
        per_step.append([ev.request_id for ev in eng.step()])
    # 7 of the 8 tokens a pass carries are left for the long prompt: 50 tokens take 8 iterations, each one
    # pass, and the decoding row got its token at every one of them
    assert len(per_step) == 8 and len(passes) == 9
    assert all(evs.count("short") == 1 for evs in per_step)
    assert [evs.count("long") for evs in per_step] == [0] * 7 + [1]
    chunks = [s for p in passes[1:] for s in p if not is_decode(s)]
    assert [(s.start, s.tokens.shape[1]) for s in chunks] == [(7 * i, 7) for i in range(7)] + [(49, 1)]
    eng2 = Engine(model, sched, max_batch=4, max_len=128, max_num_batched_tokens=8)
    res = run_staggered(
        eng2, [(0, short, SamplingParams(max_tokens=30), None), (1, long_prompt, SamplingParams(max_tokens=5), None)]
    )
    assert res["r0"] == alone(model, short, SamplingParams(max_tokens=30), sched)
    assert res["r1"] == alone(model, long_prompt, SamplingParams(max_tokens=5), sched)


@pytest.mark.parametrize("budget, prefill_cap", [(6, 2048), (11, 2048), (16, 5)])
def test_token_budget_is_respected(budget, prefill_cap):
    model = SkipModel(tiny_llama(num_layers=4))
    sched = SkipSchedule(4, max_layers=4, min_layers=2, decay_tokens=4, warmup_layers=1)
    eng, passes = spied(
        model, sched, max_batch=5, max_len=64, max_num_batched_tokens=budget, max_prefill_tokens=prefill_cap
    )
    jobs = long_jobs(model.vocab_size, 12, seed=5, max_prompt=30)
    got = run_staggered(eng, jobs)
    for p in passes:
        tokens = sum(s.tokens.numel() for s in p)
        prefill = sum(s.tokens.numel() for s in p if not is_decode(s))
        assert tokens <= budget and prefill <= prefill_cap
        assert sum(is_decode(s) for s in p) <= 1  # one decode part, one pass per iteration
    if prefill_cap >= budget:  # some pass filled the budget exactly
        assert max(sum(s.tokens.numel() for s in p) for p in passes) == budget
    else:
        assert max(sum(s.tokens.numel() for s in p if not is_decode(s)) for p in passes) == prefill_cap
    for k, (_, prompt, params, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, sched), f"request {k}"
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(model, max_batch=8, max_num_batched_tokens=7)


def test_a_failing_chunk_ends_only_its_request():
    model = SkipModel(tiny_llama())
    sched = SkipSchedule(6, max_layers=6, min_layers=3, decay_tokens=6)
    failed_passes = []

    class FaultyRunner(ModelRunner):
        def run(self, segments):  # the bad request's second chunk fails, whoever shares its pass
            if any(not is_decode(s) and s.start > 0 and bool((s.tokens == BAD).all()) for s in segments):
                failed_passes.append(segments)
                raise RuntimeError("chunk fault")
            return super().run(segments)

    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16)
    eng = Engine(model, sched, cfg, runner=FaultyRunner(model, cfg))
    jobs = {"old": [4, 9, 11], "bad": [BAD] * 20, "mate": [7, 8, 9, 10]}
    params = SamplingParams(max_tokens=8)
    eng.add_request(jobs["old"], params, request_id="old")
    eng.step()
    eng.add_request(jobs["bad"], params, request_id="bad")
    eng.add_request(jobs["mate"], params, request_id="mate")
    evs: dict[str, list] = {k: [] for k in jobs}
    while eng.has_work():
        for ev in eng.step():
            evs[ev.request_id].append(ev)
    # the failing pass carried the decode step, bad's second chunk and mate's first; rerun alone, only bad's failed
    assert [[(is_decode(s), -1 if is_decode(s) else s.start) for s in p] for p in failed_passes] == [
        [(True, -1), (False, 15), (False, 0)],
        [(False, 15)],
    ]
    assert [(e.token_id, e.finish_reason) for e in evs["bad"]] == [(None, "error")]
    assert "chunk fault" in str(evs["bad"][0].error)
    assert len(evs["old"]) == 7 and len(evs["mate"]) == 8  # "old" made its first token before the loop
    assert [e.token_id for e in evs["mate"]] == alone(model, jobs["mate"], params, sched)[0]
    assert [e.token_id for e in evs["old"]] == alone(model, jobs["old"], params, sched)[0][1:]
    assert not eng.scheduler.live and not eng.scheduler.prefilling


def test_a_failing_decode_step_spares_the_prompts_being_chunked():
    model = SkipModel(tiny_llama())

    class FaultyRunner(ModelRunner):
        fail = False

        def run(self, segments):
            if self.fail and any(is_decode(s) for s in segments):
                raise RuntimeError("decode fault")
            return super().run(segments)

    cfg = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=6)
    runner = FaultyRunner(model, cfg)
    eng = Engine(model, config=cfg, runner=runner)
    eng.add_request([3, 4], SamplingParams(max_tokens=20), request_id="dec")
    eng.step()
    prompt = [10 + i for i in range(20)]
    eng.add_request(prompt, SamplingParams(max_tokens=4), request_id="chunked")
    eng.step()  # its first chunk
    runner.fail = True
    evs = eng.step()
    assert [(e.request_id, e.finish_reason) for e in evs] == [("dec", "error")]
    runner.fail = False
    toks = []
    while eng.has_work():
        toks += [e.token_id for e in eng.step()]
    assert toks == alone(model, prompt, SamplingParams(max_tokens=4), SkipSchedule.full(6))[0]


def test_abort_while_prefilling_frees_the_row():
    model = SkipModel(tiny_llama())
    eng = Engine(model, max_batch=2, max_len=64, max_num_batched_tokens=4)
    eng.add_request(list(range(3, 33)), SamplingParams(max_tokens=3), request_id="long")
    eng.step()
    assert [r.request_id for r in eng.scheduler.prefilling] == ["long"] and eng.scheduler.prefilling[0].prefilled == 4
    eng.abort("long")
    assert [(e.request_id, e.finish_reason) for e in eng.step()] == [("long", "abort")]
    assert not eng.scheduler.prefilling and not eng.has_work()


def test_continuous_cache_is_sized_for_its_schedule():
    model = SkipModel(tiny_llama(num_layers=6))
    sched = SkipSchedule(6, max_layers=5, min_layers=2, decay_tokens=4, warmup_layers=1)
    eng = Engine(
        model, sched, max_batch=3, max_len=64, max_prompt_len=16, cache_schedule=sched, max_num_batched_tokens=8
    )
    lens = [min(64, n) for n in layer_slots(sched, 16, 64)]
    assert eng.cache.layer_lens == lens and max(lens) == 64 and min(lens) == 16
    full = Engine(model, sched, max_batch=3, max_len=64).cache
    per_slot = 2 * 3 * model.kv_heads * model.head_dim * 4  # K and V, 3 rows, fp32
    assert full.nbytes - eng.cache.nbytes == per_slot * sum(64 - n for n in lens)
    jobs = [(k, [4 + k] * (3 + 4 * k), SamplingParams(max_tokens=12), None) for k in range(4)]
    got = run_staggered(eng, jobs)
    for k, (_, prompt, params, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, sched), f"request {k}"
    with pytest.raises(ValueError, match="cache slots at layer"):  # full depth runs layer 1 past its 16 slots
        eng.add_request([5, 6, 7], SamplingParams(max_tokens=20), SkipSchedule.full(6))
    with pytest.raises(ValueError, match="at most 16"):
        eng.add_request([5] * 17, SamplingParams(max_tokens=2))
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=13), SkipSchedule.full(6))  # 3 + 13 = 16 fits
    with pytest.raises(ValueError, match="max_prompt_len"):
        Engine(model, max_len=64, max_prompt_len=64)


def test_a_short_newcomer_rides_in_the_decode_pass():
    """A short newcomer rides in the decode pass: one pass per iteration, and the newcomer's prompt runs
    every layer while the decoding rows keep their own depth (layers per decode row unchanged)."""
    model = SkipModel(tiny_llama(num_layers=6))
    sched = SkipSchedule(6, max_layers=4, min_layers=2, decay_tokens=2, warmup_layers=1)
    eng, passes = spied(model, sched, max_batch=4, max_len=64, max_num_batched_tokens=16)
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=10), request_id="a")
    for _ in range(4):
        eng.step()
    eng.add_request([8, 9], SamplingParams(max_tokens=3), request_id="b")
    evs = eng.step()
    assert len(passes) == 5 and [is_decode(s) for s in passes[-1]] == [True, False]
    dec, chunk = passes[-1]
    assert [run is None for run in dec.plan] == [l not in sched.active_layers(3) for l in range(6)]
    assert all(run is not None for run in chunk.plan)
    assert [(e.request_id, e.layers) for e in evs] == [("a", sched.num_active(3)), ("b", 6)]
    assert torch.equal(chunk.tokens, torch.tensor([[8, 9]]))


@pytest.mark.parametrize("value, want", [(None, None), (32, 32)])
def test_serve_app_passes_the_budget_to_the_engine(monkeypatch, value, want):
    """``max_num_batched_tokens`` goes from the Serve builder args (config.yaml) to the engine."""
    import yaml

    import skipray.loading
    import skipray.metrics
    import skipray.serve.server
    from skipray.loading import Loaded
    from skipray.serve.app import server_from_args

    model = SkipModel(tiny_llama(num_layers=4))
    monkeypatch.setattr(skipray.loading, "load", lambda *a, **k: Loaded(model, None, None, "tiny", (2,)))
    monkeypatch.setattr(skipray.metrics, "EngineMetrics", lambda *a, **k: None)
    monkeypatch.setattr(skipray.serve.server, "OpenAIServer", lambda tok, engine, *a, **k: engine)
    engine = server_from_args({"max_batch": 16, "max_num_batched_tokens": value})
    assert engine.config.max_num_batched_tokens == want
    cfg = yaml.safe_load(open(Path(__file__).resolve().parents[2] / "skipray" / "serve" / "config.yaml"))
    assert "max_num_batched_tokens" in cfg["applications"][0]["args"]


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_chunked_prefill_equals_alone(smol):
    from skipray.text import encode_prompt

    model, L = smol.model, smol.model.num_layers
    sched = smol.schedule or SkipSchedule(L, max_layers=L, min_layers=L // 2, decay_tokens=12, warmup_layers=2)
    prompts = [
        encode_prompt(smol.tokenizer, p, chat=True)
        for p in ("What is the capital of France?", "Name three colors.", "Write a haiku about rain.")
    ]
    params = SamplingParams(max_tokens=12)
    jobs = [(0, prompts[0], params, None), (2, prompts[1], params, None), (3, prompts[2], params, None)]
    eng = Engine(
        model, sched, max_batch=4, max_len=128, eos_token_ids=smol.eos_token_ids, max_num_batched_tokens=12
    )  # ~30-token chat prompts: 3-4 chunks each
    got = run_staggered(eng, jobs)
    for k, (_, prompt, p, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, p, sched, smol.eos_token_ids)
