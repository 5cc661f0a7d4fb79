"""Sublayer skipping: a layer's attention and MLP blocks drop separately, by a FLOP-weighted budget. The attention
blocks of a later step are a subset of an earlier step's (the KV cache invariant); cached decoding equals the
teacher-forced training forward; a row's tokens are the same alone and in a continuous batch of rows at other
steps; the cache is sized by the attention blocks alone."""

import pytest
import torch

from skipray.core.engine import Engine
from skipray.core.model import Segment, SkipModel, SplitRun, forward, training_plan
from skipray.core.requests import SamplingParams
from skipray.core.runner import pad_prompts
from skipray.core.schedule import SkipSchedule, theoretical_speedup

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 3, 4, 3, 4, 3], [50]]


def sublayer_schedule(L: int, order=None) -> SkipSchedule:
    return SkipSchedule(L, L, 2, decay_tokens=7, sublayers=True, attn_share=0.3, drop_order=order)


def test_units_drop_by_a_flop_weighted_budget_and_attention_stays_nested():
    s = sublayer_schedule(6, order=[3, 5, 2, 9, 4, 7, 11, 6, 1, 8])  # units: 2l attention, 2l + 1 MLP of layer l
    for step in range(12):
        attn, mlp = s.runs(step)
        kept = 0.3 * len(attn) + 0.7 * len(mlp)
        assert s.num_active(step) == pytest.approx(kept)
        assert kept >= s.budget(step) - 1e-9  # never below the budget ...
        if step:
            prev_attn, prev_mlp = s.runs(step - 1)
            assert set(attn) <= set(prev_attn) and set(mlp) <= set(prev_mlp)  # ... and monotone
    assert s.runs(0) == (tuple(range(6)), tuple(range(6))) and not s.skips(0)
    # at the floor (2.0): units 3 5 2 9 4 7 dropped (6.0 - 3.4 = 2.6 left; dropping 11 would leave 1.9)
    assert s.runs(8) == ((0, 3, 4, 5), (0, 5)) and s.num_active(8) == pytest.approx(2.6)
    assert s.layers_per_token(3)[0] == 6 and isinstance(s.num_active(5), float)
    assert SkipSchedule.from_dict(s.to_dict()) == s
    # the cache holds what attention ran: layer 1's attention (unit 2) stops at the step its unit drops
    assert s.steps_running(1, 20) == next(i for i in range(20) if 1 not in s.runs(i)[0])
    assert s.steps_running(1, 20, "mlp") == next(i for i in range(20) if 1 not in s.runs(i)[1])
    default = sublayer_schedule(4)
    assert default.order == (3, 2, 5, 4, 7, 6)  # SkipDecode's layers from the bottom, each MLP before attention
    with pytest.raises(ValueError, match="attn_share"):
        SkipSchedule(4, 4, 2, 4, sublayers=True, attn_share=1.0)
    with pytest.raises(ValueError, match="units in"):
        SkipSchedule(4, 4, 2, 4, sublayers=True, drop_order=[8])
    with pytest.raises(ValueError, match="drop only down to"):
        SkipSchedule(4, 4, 1, 4, sublayers=True, drop_order=[1, 3])


def test_theoretical_speedup_counts_the_blocks_that_run():
    from conftest import tiny_llama

    cost = SkipModel(tiny_llama()).cost_model()
    whole = SkipSchedule(6, 6, 3, decay_tokens=0)
    # the MLPs drop first: 3 layer equivalents keep every attention block and two MLPs
    mlp_first = SkipSchedule(6, 6, 3, decay_tokens=0, sublayers=True, drop_order=[3, 5, 7, 9, 11, 2, 4, 6, 8, 10])
    assert mlp_first.num_active(0) == 3.0 and mlp_first.num_attention(0) == 6 and whole.num_attention(0) == 3
    ctx = [8 + i + 1 for i in range(31)]
    want = sum(cost.token_flops(6, c) for c in ctx) / sum(cost.token_flops(3.0, c, 6) for c in ctx)
    assert theoretical_speedup(mlp_first, cost, 8, 32) == pytest.approx(want)
    assert 1.5 < theoretical_speedup(mlp_first, cost, 8, 32) < theoretical_speedup(whole, cost, 8, 32)


@pytest.mark.parametrize("sized", [False, True], ids=["uniform-cache", "schedule-sized-cache"])
def test_cached_sublayer_decode_equals_training_forward(hf_model, sized):
    model = SkipModel(hf_model)
    sched = sublayer_schedule(model.num_layers)
    n = 12
    P0 = max(map(len, PROMPTS))
    eng = Engine(
        model,
        sched,
        max_batch=4,
        max_len=P0 + n if sized else 64,
        max_tokens=n if sized else None,
        cache_schedule=sched,
    )
    if sized:
        assert min(eng.cache.layer_lens) < max(eng.cache.layer_lens)
    done = eng.generate(PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True, logprobs=1))
    assert all(isinstance(x, float) for x in done[0].layers_per_token[1:])
    prompt, prompt_real = pad_prompts(PROMPTS)
    P = prompt.shape[1]
    gen = torch.tensor([c.token_ids for c in done])
    tokens = torch.cat([prompt, gen], 1)
    real = torch.cat([prompt_real, torch.ones_like(gen, dtype=torch.bool)], 1)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    plan = training_plan(sched, P, P + n)
    assert any(isinstance(e, SplitRun) for e in plan)
    with torch.no_grad():
        par = forward(model, Segment(tokens, positions, plan, real, logits_at=slice(P - 1, P + n - 1)))
    assert torch.equal(par.argmax(-1), gen)  # teacher-forced on its own output: the same greedy tokens
    want = torch.log_softmax(par.float(), -1).gather(-1, gen[..., None])[..., 0]
    got = torch.tensor([[lp.logprob for lp in c.logprobs] for c in done])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rows_at_other_steps_do_not_change_a_rows_tokens(llama):
    model = SkipModel(llama)
    sched = sublayer_schedule(model.num_layers)
    eng = Engine(model, sched, max_batch=4, max_len=64)
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    alone = [eng.generate([p], params)[0].token_ids for p in PROMPTS[:3]]
    ids = [eng.add_request(PROMPTS[0], params)]
    out = {ids[0]: []}
    for _ in range(4):
        for e in eng.step():
            out[e.request_id].append(e.token_id)
    ids += [eng.add_request(p, params) for p in PROMPTS[1:3]]
    out.update({i: [] for i in ids[1:]})
    split = False
    while eng.has_work():
        split |= any(isinstance(r, tuple) for r in eng.scheduler.layer_rows()[0])
        for e in eng.step():
            out[e.request_id].append(e.token_id)
    assert split  # some layer ran its attention and its MLP on different rows
    assert [out[i] for i in ids] == alone


def test_sublayer_flags_and_the_models_attention_share(llama):
    from skipray.cli import build_parser
    from skipray.core.schedule import resolve_schedule
    from skipray.training.train_cli import config_from_args

    share = SkipModel(llama).attention_share()  # q, k, v, o against the gated MLP's three matrices
    assert share == pytest.approx((32 * 32 * 2 + 32 * 16 * 2) / (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64))
    s = resolve_schedule({"sublayers": True, "min_layers": 3, "attn_share": share}, 6, trained=None).schedule
    assert s.sublayers and s.attn_share == share and s.num_active(100) >= 3
    args = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--max-layers", "6", "--min-layers", "3", "--sublayers"]
    )
    assert config_from_args(args).schedule["sublayers"] is True
