"""`skipray calibrate`: block-influence and greedy-KL drop orders on a tiny model."""

import torch
from conftest import tiny_llama

from skipray.core.model import SkipModel
from skipray.core.schedule import SkipSchedule
from skipray.training.calibrate import block_influence_order, greedy_kl_order, zero_shot_agreement

SEQS = [([5, 6, 7, 8], list(range(20, 32))), ([9, 10], list(range(40, 52))), ([3, 4, 5, 6, 7, 8], list(range(60, 72)))]


def test_block_influence_is_a_ranking_of_all_layers():
    model = SkipModel(tiny_llama())
    order, scores = block_influence_order(model, SEQS, length=8)
    assert sorted(order) == list(range(model.num_layers))
    assert [scores[l] for l in order] == sorted(scores)


def test_greedy_kl_first_drop_is_the_cheapest_single_layer():
    model = SkipModel(tiny_llama())
    L = model.num_layers
    order, kls = greedy_kl_order(model, SEQS, length=8, min_layers=2, progress=False)
    assert sorted(order) == list(range(L)) and len(kls) == L - 2
    # brute force: teacher-forced agreement/KL with one layer skipped for every answer token
    from skipray.core.model import Segment, forward, full_plan
    from skipray.training.calibrate import _batch

    tokens, real, pos, P = _batch(SEQS, 8)
    T = tokens.shape[1]
    cols = slice(P, T)

    def logp(skip):
        plan = full_plan(L)
        if skip is not None:
            plan[skip] = (slice(None), P)  # the layer runs on the prompt only
        with torch.no_grad():
            return torch.log_softmax(forward(model, Segment(tokens, pos, plan, real, logits_at=cols)).float(), -1)

    t = logp(None)
    single = [float((t.exp() * (t - logp(l))).sum(-1).mean()) for l in range(L)]
    assert order[0] == min(range(L), key=single.__getitem__)
    assert abs(kls[0] - min(single)) < 1e-4


def test_zero_shot_agreement_is_one_at_full_depth():
    model = SkipModel(tiny_llama())
    assert zero_shot_agreement(model, SEQS, SkipSchedule.full(model.num_layers), length=8) == 1.0
    skip = SkipSchedule(model.num_layers, 3, 2, 4, drop_order=[1, 2, 3, 4])
    assert 0.0 <= zero_shot_agreement(model, SEQS, skip, length=8) < 1.0


def test_greedy_kl_continues_from_a_started_order():
    model = SkipModel(tiny_llama())
    whole, kls = greedy_kl_order(model, SEQS, length=8, min_layers=2, progress=False)
    resumed, kls2 = greedy_kl_order(model, SEQS, length=8, min_layers=2, progress=False, start=whole[:2])
    assert resumed == whole and kls2 == kls[2:]


def test_greedy_kl_over_sublayers_first_drops_the_cheapest_block_per_flop():
    """Units ``2l`` (attention) and ``2l + 1`` (MLP): the first drop minimizes the KL per layer equivalent saved
    (brute force over every single block), and the order covers every unit down to the budget."""
    from skipray.core.model import LayerRun, Segment, SplitRun, forward, full_plan
    from skipray.training.calibrate import _batch, greedy_kl_units, unit_plan

    model = SkipModel(tiny_llama())
    model.build_inference_weights()  # as the command does: the passes meet the fast loop's checks
    L, share = model.num_layers, model.attention_share()
    order, kls = greedy_kl_units(model, SEQS, length=8, min_layers=3.0, attn_share=share, progress=False)
    assert sorted(order) == list(range(2 * L))
    dropped = order[: len(kls)]
    assert L - sum(share if u % 2 == 0 else 1 - share for u in dropped) <= 3.0 + 1e-9
    tokens, real, pos, P = _batch(SEQS, 8)
    cols = slice(P, tokens.shape[1])

    def logp(units):
        plan = list(full_plan(L))
        if units:  # the blocks skipped on the answer only: the prompt runs them (as its full-depth pass does)
            for l in range(L):
                a = LayerRun(slice(None), P) if 2 * l in units else LayerRun(slice(None), None)
                m = LayerRun(slice(None), P) if 2 * l + 1 in units else LayerRun(slice(None), None)
                plan[l] = SplitRun(a, m)
        with torch.no_grad():
            return torch.log_softmax(forward(model, Segment(tokens, pos, plan, real, logits_at=cols)).float(), -1)

    t = logp(set())
    cost = [
        float((t.exp() * (t - logp({u}))).sum(-1).mean()) / (share if u % 2 == 0 else 1 - share) for u in range(2 * L)
    ]
    assert order[0] == min(range(2 * L), key=cost.__getitem__)
    assert unit_plan(set(), L) == full_plan(L)
