"""The decode step compiles whole: no graph breaks under ``torch.compile(fullgraph=True)`` (``aot_eager``: no
compiler needed), for whole batches (the fast loop) and rows at different depths with a skip adapter (the
generic loop), and the compiled step gives the eager step's logits."""

import pytest
import torch
from conftest import tiny_llama
from test_skip_adapter import shuffled_order, with_random_lora

from skipray.core.engine import Engine, SamplingParams
from skipray.core.model import SkipModel, forward_segments
from skipray.core.schedule import SkipSchedule


def decode_segment(eng: Engine):
    """The next decode step's segment of ``eng``'s rows (as ``ModelRunner.execute`` builds it)."""
    live = eng.scheduler.live
    rows, _ = eng.scheduler.layer_rows()
    return eng.runner.decode_segment(
        [r.generated[-1] for r in live],
        [len(r.prompt) + r.step for r in live],
        rows,
        [r.schedule.skips(r.step) for r in live],
    )


@pytest.mark.parametrize("skipping", [False, True], ids=["full-depth", "mixed-depths-adapter"])
def test_the_decode_step_compiles_without_graph_breaks(skipping):
    import torch._dynamo as dynamo

    hf = tiny_llama(num_layers=6)
    if skipping:
        with_random_lora(hf)
    model = SkipModel(hf)
    sched = SkipSchedule(6, 6, 2, decay_tokens=4, drop_order=shuffled_order(6)) if skipping else None
    eng = Engine(model, sched, max_batch=4, max_len=64)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    eng.add_request([5, 6, 7], params)
    for _ in range(3):  # the first row runs ahead: rows at different steps (and depths when skipping)
        eng.step()
    eng.add_request([8, 9], params)
    eng.add_request([10, 11, 12, 13], params)
    eng.step()
    eng.step()
    seg = decode_segment(eng)
    if skipping:
        assert len({len(r) for r in eng.scheduler.layer_rows()[0]}) > 1  # some layers run on some rows only

    def step(seg):
        return forward_segments(model, [seg], eng.cache)[0]

    with torch.inference_mode():
        want = step(seg)  # cache writes are idempotent: the same keys and values at the same slots
        dynamo.reset()
        explained = dynamo.explain(step)(seg)
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(seg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
