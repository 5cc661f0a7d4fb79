"""Decode steps in static shapes (skipray.core.graphs): the engine with ``enforce_eager=False`` gives the eager
engine's tokens (static batches, a skip adapter, continuous batching that falls back to eager shapes); every step
inside one batch size and slot bucket has the same shapes, so ``torch.compile(dynamic=False)`` compiles the pass
once for them (``aot_eager``: no compiler needed); steps that cannot take static shapes are refused."""

import pytest
import torch
from conftest import tiny_llama
from test_skip_adapter import shuffled_order, with_random_lora

from skipray.core.engine import Engine, SamplingParams
from skipray.core.graphs import SLOT_BUCKET, batch_sizes, static_decode
from skipray.core.model import SkipModel, forward_segments
from skipray.core.schedule import SkipSchedule


def test_batch_sizes_are_vllms_capture_sizes_up_to_the_rows():
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_sizes(5) == [1, 2, 4, 5] and batch_sizes(1) == [1] and batch_sizes(8) == [1, 2, 4, 8]


def engines(skipping: bool):
    hf = tiny_llama(num_layers=6)
    if skipping:
        with_random_lora(hf)
    model = SkipModel(hf)
    sched = SkipSchedule(6, 6, 2, decay_tokens=4, drop_order=shuffled_order(6)) if skipping else None
    return [Engine(model, sched, max_batch=6, max_len=160, enforce_eager=e) for e in (True, False)]


@pytest.mark.parametrize("skipping", [False, True], ids=["full-depth", "skip-adapter"])
def test_static_decode_gives_the_eager_tokens(skipping, monkeypatch):
    import skipray.core.runner as runner

    taken = []

    def counted(*args):
        out = static_decode(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(runner, "static_decode", counted)
    eager, static = engines(skipping)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14] * 9, [15, 16]]  # 5 rows: padded to 6
    params = SamplingParams(max_tokens=140, ignore_eos=True)  # past one slot bucket (128)
    want = [c.token_ids for c in eager.generate(prompts, params)]
    assert [c.token_ids for c in static.generate(prompts, params)] == want
    assert taken and all(taken), taken  # every decode step of the static batch took static shapes
    taken.clear()
    # continuous batching: rows at different steps (different depths when skipping) share the batch
    staggered = []
    for eng in (eager, static):
        ids = [eng.add_request(prompts[0], SamplingParams(max_tokens=30, ignore_eos=True))]
        for _ in range(3):
            eng.step()
        ids += [eng.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts[1:3]]
        out: dict = {i: [] for i in ids}
        while eng.has_work():
            for e in eng.step():
                out[e.request_id].append(e.token_id)
        staggered.append(list(out.values()))
    assert staggered[0] == staggered[1]
    if skipping:
        assert not all(taken)  # rows at different depths: eager shapes
    assert any(taken)


def host(values, dtype):
    return torch.as_tensor(values, dtype=dtype)


def plan_of(eng: Engine):
    """The decode step's inputs the runner would read (``ModelRunner.execute``)."""
    live = eng.scheduler.live
    rows, _ = eng.scheduler.layer_rows()
    return (
        [r.generated[-1] for r in live],
        [len(r.prompt) + r.step for r in live],
        [r.schedule.skips(r.step) for r in live],
        rows,
    )


def test_steps_inside_a_bucket_compile_once_and_match_eager():
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    eng, _ = engines(False)
    for p in ([5, 6, 7], [8, 9, 10], [11, 12, 13]):  # 3 rows at one step: padded to 4
        eng.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True))
    eng.step()
    counter = CompileCounter()
    dynamo.reset()

    def step(seg):
        return forward_segments(eng.model, [seg], eng.cache)[0]

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=counter)
    with torch.inference_mode():
        for _ in range(5):
            tokens, slots, adapter, rows = plan_of(eng)
            static = static_decode(tokens, slots, adapter, rows, 3, eng.cache.layer_lens, 6, host)
            assert static.segment.tokens.shape == (4, 1) and static.segment.end == SLOT_BUCKET
            torch.testing.assert_close(compiled(static.segment)[:3], step(static.segment)[:3])
            eager_seg = eng.runner.decode_segment(tokens, slots, rows, adapter)
            torch.testing.assert_close(
                step(static.segment)[:3], forward_segments(eng.model, [eager_seg], eng.cache)[0], atol=1e-5, rtol=1e-5
            )
            eng.step()
    assert counter.frame_count == 1, counter.frame_count  # one graph for five steps of growing length


def test_steps_that_cannot_be_static_are_refused():
    lens = [64] * 4
    rows = [[0, 1]] * 4
    args = ([1, 2], [5, 7], [False, False])
    assert static_decode(*args, rows, 2, lens, 4, host) is not None
    assert static_decode(*args, rows, 3, lens, 4, host) is None  # a prompt being prefilled in row 2
    assert static_decode(*args, [[0, 1], [0], [0, 1], []], 2, lens, 4, host) is None  # mixed depths
    assert static_decode(*args, rows, 2, lens, 1, host) is None  # more rows than the cache has
    with pytest.raises(IndexError, match="layer 1 holds 6 slots"):
        static_decode(*args, rows, 2, [64, 6, 64, 64], 4, host)


def test_a_shape_whose_capture_fails_runs_eagerly_and_is_not_retried(monkeypatch, caplog):
    """A capture that raises (an op that syncs, out of memory) is logged once; that shape then runs eagerly and
    gives the eager logits. (The capture itself needs CUDA: ``scripts/gpu_check.sh`` replays graphs there.)"""
    from contextlib import nullcontext

    from skipray.core.graphs import DecodeGraphs

    eng, _ = engines(False)
    for p in ([5, 6, 7], [8, 9, 10]):
        eng.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True))
    eng.step()
    tokens, slots, adapter, rows = plan_of(eng)
    static = static_decode(tokens, slots, adapter, rows, 2, eng.cache.layer_lens, 6, host)
    tries = []

    def refuse(seg):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = DecodeGraphs(eng.model, eng.cache)
    monkeypatch.setattr(graphs, "_capture", refuse)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    with torch.inference_mode():
        want = forward_segments(eng.model, [static.segment], eng.cache)[0]
        for _ in range(2):
            torch.testing.assert_close(graphs.run(static), want)
    assert tries == [1] and static.key in graphs.failed and not graphs.graphs
    assert "capture failed" in caplog.text
