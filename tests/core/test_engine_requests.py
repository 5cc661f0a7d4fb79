"""Engine: staggered requests equal the same request run alone (greedy), per-row skip depth."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_llama, tiny_opt

from skipray.core.config import EngineConfig
from skipray.core.engine import Engine
from skipray.core.model import SkipModel
from skipray.core.requests import QueueFull, SamplingParams
from skipray.core.runner import ModelRunner
from skipray.core.schedule import SkipSchedule


def run_staggered(engine: Engine, jobs: list[tuple[int, list[int], SamplingParams, SkipSchedule | None]]):
    """Submit job k at iteration ``jobs[k][0]``; run to completion. -> {rid: (tokens, layers, reason)}."""
    out: dict[str, tuple[list[int], list[int], str | None]] = {}
    order = []
    pending = sorted(enumerate(jobs), key=lambda x: x[1][0])
    it = 0
    while pending or engine.has_work():
        while pending and pending[0][1][0] <= it:
            k, (_, prompt, params, sched) = pending.pop(0)
            rid = engine.add_request(prompt, params, sched, request_id=f"r{k}")
            out[rid] = ([], [], None)
            order.append(rid)
        for ev in engine.step():
            toks, layers, _ = out[ev.request_id]
            toks.append(ev.token_id)
            layers.append(ev.layers)
            out[ev.request_id] = (toks, layers, ev.finish_reason)
        it += 1
        assert it < 10_000
    return out


def alone(model: SkipModel, prompt, params, schedule, eos=()):
    c = Engine(model, schedule, max_batch=1, max_len=256, eos_token_ids=eos).generate([prompt], params)[0]
    return c.token_ids, c.layers_per_token, c.finish_reason


def make_jobs(vocab: int, n: int, seed: int = 0, max_new=(4, 20)):
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        jobs.append((rng.randint(0, 15), prompt, SamplingParams(max_tokens=rng.randint(*max_new)), None))
    return jobs


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_staggered_equals_alone(arch):
    hf = tiny_llama(num_layers=8) if arch == "llama" else tiny_opt(num_layers=7)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, max_layers=L, min_layers=3, decay_tokens=10, warmup_layers=1)
    other = SkipSchedule(L, max_layers=L - 1, min_layers=2, decay_tokens=5, warmup_layers=1)
    jobs = make_jobs(model.vocab_size, 10, seed=1)
    # a few requests with their own schedule (non-contiguous rows) and full depth
    jobs[3] = (jobs[3][0], jobs[3][1], jobs[3][2], other)
    jobs[6] = (jobs[6][0], jobs[6][1], jobs[6][2], SkipSchedule.full(L))
    eng = Engine(model, sched, max_batch=4, max_len=64, eos_token_ids=(2,))
    got = run_staggered(eng, jobs)
    for k, (_, prompt, params, s) in enumerate(jobs):
        want = alone(model, prompt, params, s or sched, eos=(2,))
        assert got[f"r{k}"] == want, f"request {k}"
    assert not eng.scheduler.live and eng.num_waiting == 0


def test_rows_at_different_steps_run_different_layers():
    model = SkipModel(tiny_llama(num_layers=8))
    sched = SkipSchedule(8, max_layers=8, min_layers=2, decay_tokens=6, warmup_layers=1)
    eng = Engine(model, sched, max_batch=4, max_len=64)
    a = eng.add_request([5, 6, 7], SamplingParams(max_tokens=12))
    for _ in range(4):  # its prompt pass (token 0), then decode steps 0, 1, 2: a is at step 3 now
        eng.step()
    b = eng.add_request([8, 9], SamplingParams(max_tokens=12))
    evs = eng.step()
    plan, layers = eng.scheduler.layer_rows()
    assert [r.request_id for r in eng.scheduler.live] == [a, b]
    # a (older) runs fewer layers than b; every layer's active rows are a contiguous suffix
    assert layers == [sched.num_active(eng.scheduler.live[0].step), sched.num_active(eng.scheduler.live[1].step)]
    assert layers[0] < layers[1]
    for rows in plan:
        assert rows == list(range(2 - len(rows), 2))
    by = {}
    for ev in evs:
        by.setdefault(ev.request_id, []).append(ev.layers)
    assert by[a] == [sched.num_active(3)]  # a's decode step 3
    assert by[b] == [8]  # b's prompt-pass token; its step 0 runs at the next iteration
    # per-token layers recorded by the engine match the schedule for each request
    eng2 = Engine(model, sched, max_batch=4, max_len=64)
    got = run_staggered(
        eng2, [(0, [5, 6, 7], SamplingParams(max_tokens=12), None), (4, [8, 9], SamplingParams(max_tokens=12), None)]
    )
    for rid in ("r0", "r1"):
        assert got[rid][1] == sched.layers_per_token(12)


def test_simultaneous_arrivals_share_one_prefill(monkeypatch):
    model = SkipModel(tiny_llama(num_layers=6))
    sched = SkipSchedule(6, max_layers=6, min_layers=2, decay_tokens=8, warmup_layers=1)
    eng = Engine(model, sched, max_batch=8, max_len=64, eos_token_ids=(2,))
    passes = []
    real_prefill = eng.runner.prefill
    monkeypatch.setattr(
        eng.runner, "prefill", lambda prompts, row: passes.append(len(prompts)) or real_prefill(prompts, row)
    )
    jobs = [(0, [3 + k] * (2 + 3 * k), SamplingParams(max_tokens=6 + k), None) for k in range(5)]
    jobs.append((3, [9, 8, 7], SamplingParams(max_tokens=5), None))  # joins rows already decoding
    got = run_staggered(eng, jobs)
    assert passes == [5, 1]  # five prompts of lengths 2..14 in one right-padded pass, then the late one
    for k, (_, prompt, params, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, sched, eos=(2,)), f"request {k}"


def test_prefill_token_budget_splits_admission(monkeypatch):
    model = SkipModel(tiny_llama(num_layers=4))
    eng = Engine(model, max_batch=8, max_len=64, max_prefill_tokens=20)
    passes = []
    real_prefill = eng.runner.prefill
    monkeypatch.setattr(
        eng.runner,
        "prefill",
        lambda prompts, row: passes.append([len(p) for p in prompts]) or real_prefill(prompts, row),
    )
    jobs = [(0, [4 + k] * n, SamplingParams(max_tokens=3), None) for k, n in enumerate([4, 6, 30, 5, 5])]
    got = run_staggered(eng, jobs)
    # 2 x 6 padded tokens fit 20, a third would not; the 30-token prompt goes alone (never starved)
    assert passes == [[4, 6], [30], [5, 5]]
    for k, (_, prompt, params, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, SkipSchedule.full(4)), f"request {k}"
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, max_prefill_tokens=0)


def test_seeded_sampling_equals_alone():
    model = SkipModel(tiny_llama())
    sched = SkipSchedule(6, max_layers=6, min_layers=3, decay_tokens=8)
    jobs = [
        (k * 2, [4 + k, 9, 11], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=k), None)
        for k in range(4)
    ]
    got = run_staggered(Engine(model, sched, max_batch=3, max_len=64), jobs)
    for k, (_, prompt, params, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, sched)


def test_abort_frees_row_and_queue_bound():
    model = SkipModel(tiny_llama())
    eng = Engine(model, max_batch=2, max_len=64, max_waiting=1)
    a = eng.add_request([3, 4], SamplingParams(max_tokens=50))
    assert eng.cache_usage() == 0.0
    eng.step()
    assert eng.cache_usage() == pytest.approx(3 / (2 * 64))  # a: prompt 2 + the token of its prompt pass
    b = eng.add_request([5, 6], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.cache_usage() == pytest.approx((4 + 3) / (2 * 64))  # a: 2 + 2 tokens; b: 2 + its prompt-pass token
    c = eng.add_request([7, 8], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFull):
        eng.add_request([7, 8], SamplingParams(max_tokens=3))
    eng.step()
    assert eng.num_waiting == 1  # no free row for c yet
    eng.abort(a)
    evs = eng.step()
    assert any(e.request_id == a and e.finish_reason == "abort" for e in evs)
    assert [r.request_id for r in eng.scheduler.live] == [b, c]
    with pytest.raises(ValueError):
        eng.add_request([3] * 60, SamplingParams(max_tokens=10))  # over the context
    with pytest.raises(ValueError):
        eng.add_request([], SamplingParams())


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_staggered_equals_alone(smol):
    from skipray.text import encode_prompt

    model = smol.model
    L = model.num_layers
    sched = smol.schedule or SkipSchedule(L, max_layers=L, min_layers=L // 2, decay_tokens=12, warmup_layers=2)
    prompts = [
        encode_prompt(smol.tokenizer, p, chat=True)
        for p in ("What is the capital of France?", "Name three colors.", "Write a haiku about rain.")
    ]
    params = SamplingParams(max_tokens=16)
    jobs = [(0, prompts[0], params, None), (3, prompts[1], params, None), (7, prompts[2], params, None)]
    eng = Engine(model, sched, max_batch=4, max_len=128, eos_token_ids=smol.eos_token_ids)
    got = run_staggered(eng, jobs)
    for k, (_, prompt, p, _) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, p, sched, smol.eos_token_ids)


def test_two_schedules_run_every_layer_on_one_slice():
    """Rows grouped by schedule (the second group youngest first): with two schedules live, each layer's
    rows are one contiguous slice at every step, and every request still equals itself run alone."""
    model = SkipModel(tiny_llama(num_layers=8))
    a = SkipSchedule(8, max_layers=8, min_layers=3, decay_tokens=6, warmup_layers=1)
    b = SkipSchedule(8, max_layers=7, min_layers=2, decay_tokens=4, warmup_layers=1, drop_order=[5, 2, 6, 3, 4, 1])
    plans = []

    class SpyRunner(ModelRunner):  # records each decode pass's layer rows and the live rows' schedules
        def decode_segment(self, tokens, slots, layer_rows, adapter):
            plans.append(([list(r) for r in layer_rows], [r.schedule for r in eng.scheduler.live]))
            return super().decode_segment(tokens, slots, layer_rows, adapter)

    config = EngineConfig(max_num_seqs=6, max_model_len=64)
    eng = Engine(model, a, config, eos_token_ids=(2,), runner=SpyRunner(model, config))
    jobs = make_jobs(model.vocab_size, 12, seed=3, max_new=(3, 14))
    jobs = [(t, p, sp, b if k % 3 == 1 else None) for k, (t, p, sp, _) in enumerate(jobs)]
    got = run_staggered(eng, jobs)
    assert any(len(set(s)) == 2 for _, s in plans)  # both schedules shared decode steps
    for plan, _ in plans:
        assert all(rows == list(range(rows[0], rows[0] + len(rows))) for rows in plan if rows)
    for k, (_, prompt, params, s) in enumerate(jobs):
        assert got[f"r{k}"] == alone(model, prompt, params, s or a, eos=(2,)), f"request {k}"


def test_a_failing_row_ends_its_request_alone():
    model = SkipModel(tiny_llama())
    eng = Engine(model, max_batch=4, max_len=64)

    def broken_stop(ids):
        if len(ids) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer error")
        return False

    params = SamplingParams(max_tokens=8)
    good = [eng.add_request([4 + k, 9, 11], params, request_id=f"g{k}") for k in range(2)]
    eng.add_request([7, 8], SamplingParams(max_tokens=8, stop_fn=broken_stop), request_id="bad")
    evs = {}
    while eng.has_work():
        for ev in eng.step():
            evs.setdefault(ev.request_id, []).append(ev)
    assert [e.finish_reason for e in evs["bad"]] == [None, None, "error"]
    assert isinstance(evs["bad"][-1].error, UnicodeDecodeError) and evs["bad"][-1].token_id is not None
    for k, rid in enumerate(good):
        assert [e.token_id for e in evs[rid]] == alone(model, [4 + k, 9, 11], params, SkipSchedule.full(6))[0]
    assert not eng.scheduler.live


class FaultyRunner(ModelRunner):
    """A runner whose decode passes (``fail_decode``) or prompt passes (``fail_prefill``) raise on demand."""

    fail_decode = fail_prefill = False

    def run(self, segments):
        if self.fail_decode and any(s.adapter is not None for s in segments):  # decode segments carry the mask
            raise RuntimeError("kernel fault")
        return super().run(segments)

    def prefill(self, prompts, rows=None):
        if self.fail_prefill:
            raise RuntimeError("no memory")
        return super().prefill(prompts, rows)


def test_a_failing_decode_pass_answers_every_request():
    """A request that finished inside the failing step still gets its last event; the live ones get an
    error; a waiting request is served afterwards."""
    model = SkipModel(tiny_llama())
    config = EngineConfig(max_num_seqs=2, max_model_len=64)
    runner = FaultyRunner(model, config)
    eng = Engine(model, config=config, runner=runner)
    eng.add_request([3, 4], SamplingParams(max_tokens=20), request_id="long")
    eng.step()
    eng.add_request([5, 6], SamplingParams(max_tokens=1), request_id="one")  # done at its prefill
    eng.add_request([7, 8], SamplingParams(max_tokens=2), request_id="later")  # waits: no free row
    runner.fail_decode = True
    evs = {e.request_id: e for e in eng.step()}
    assert evs["one"].finish_reason == "length" and evs["one"].token_id is not None
    assert evs["long"].finish_reason == "error" and "kernel fault" in str(evs["long"].error)
    assert not eng.scheduler.live and eng.num_waiting == 1
    runner.fail_decode = False
    got = []
    while eng.has_work():
        got += eng.step()
    assert [e.finish_reason for e in got] == [None, "length"] and {e.request_id for e in got} == {"later"}


def test_a_failing_prefill_ends_only_its_newcomers():
    model = SkipModel(tiny_llama())
    config = EngineConfig(max_num_seqs=4, max_model_len=64)
    runner = FaultyRunner(model, config)
    eng = Engine(model, config=config, runner=runner)
    eng.add_request([3, 4], SamplingParams(max_tokens=6), request_id="old")
    toks = [e.token_id for e in eng.step()]
    eng.add_request([5, 6], SamplingParams(max_tokens=6), request_id="new")
    runner.fail_prefill = True
    evs = eng.step()
    assert [(e.request_id, e.finish_reason) for e in evs] == [("old", None), ("new", "error")]  # decode rows first
    runner.fail_prefill = False
    toks.append(evs[0].token_id)
    while eng.has_work():
        toks += [e.token_id for e in eng.step()]
    assert toks == alone(model, [3, 4], SamplingParams(max_tokens=6), SkipSchedule.full(6))[0]


def test_logprobs_equal_the_static_engine():
    model = SkipModel(tiny_llama())
    sched = SkipSchedule(6, max_layers=6, min_layers=3, decay_tokens=5)
    params = SamplingParams(max_tokens=6, logprobs=3)
    eng = Engine(model, sched, max_batch=3, max_len=64)
    eng.add_request([4, 9, 11], params, request_id="a")
    eng.add_request([5, 6], SamplingParams(max_tokens=6), request_id="b")  # asks for none
    got = {"a": [], "b": []}
    while eng.has_work():
        for ev in eng.step():
            got[ev.request_id].append(ev.logprobs)
    want = Engine(model, sched, max_batch=1, max_len=64).generate([[4, 9, 11]], params)[0].logprobs
    assert got["b"] == [None] * 6 and len(got["a"]) == 6
    for x, y in zip(got["a"], want):
        assert x.top_ids == y.top_ids and x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert x.top_logprobs == pytest.approx(y.top_logprobs, abs=1e-4)


def test_offline_requests_fill_only_rows_online_leaves_free():
    model = SkipModel(tiny_llama(num_layers=4))
    eng = Engine(model, max_batch=4, max_len=64, max_waiting=1, max_offline_rows=3)
    long = SamplingParams(max_tokens=40)
    offline = [eng.add_request([5, 6, 7], long, offline=True) for _ in range(6)]  # beyond max_waiting: no QueueFull
    assert eng.num_waiting == 0 and len(eng.scheduler.offline_waiting) == 6
    eng.step()
    assert len(eng.scheduler.live) == 3 and all(
        r.offline for r in eng.scheduler.live
    )  # one row stays free for online requests
    online = eng.add_request([8, 9], SamplingParams(max_tokens=30))
    with pytest.raises(QueueFull):  # the online bound is untouched by the offline queue
        eng.add_request([8, 9], SamplingParams(max_tokens=2))
    eng.step()
    assert (
        online in {r.request_id for r in eng.scheduler.live} and len(eng.scheduler.live) == 4
    )  # joined at the next iteration
    eng.abort(offline[0])
    eng.step()  # a row freed by an offline request: no online request waits, so offline fills it
    assert (
        len(eng.scheduler.live) == 4
        and sum(r.offline for r in eng.scheduler.live) == 3
        and len(eng.scheduler.offline_waiting) == 2
    )
    # while an online request waits, a freed row goes to it, never to an offline one
    eng.add_request([8, 9, 10], SamplingParams(max_tokens=30))
    eng.abort(offline[1])
    eng.step()
    assert sum(not r.offline for r in eng.scheduler.live) == 2 and len(eng.scheduler.offline_waiting) == 2
