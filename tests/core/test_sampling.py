"""sampling.sample: greedy below MIN_TEMPERATURE (no overflow from dividing by a tiny temperature),
seeded draws repeat, non-finite logits raise a clear error instead of a torch internals one."""

from __future__ import annotations

import pytest
import torch

from skipray.core.sampling import MIN_TEMPERATURE, sample


@pytest.mark.parametrize("temperature", [0.0, 1e-45, 1e-30, MIN_TEMPERATURE / 2])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 30
    assert sample(logits, temperature) == int(logits.argmax())
    assert sample(logits, temperature, top_p=0.5, generator=torch.Generator().manual_seed(1)) == int(logits.argmax())


def test_small_but_usable_temperature_samples_and_seeds_repeat():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    draws = [sample(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert len(set(draws)) > 1
    assert draws == [sample(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert sample(logits, MIN_TEMPERATURE * 2, generator=torch.Generator().manual_seed(0)) == int(logits.argmax())


def test_non_finite_logits_raise_floating_point_error():
    logits = torch.zeros(10)
    logits[3] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        sample(logits, 0.7, generator=torch.Generator().manual_seed(0))


def test_sample_rows_batches_rows_with_their_own_params_and_isolates_faults():
    from skipray.core.requests import SamplingParams
    from skipray.core.sampling import sample_rows

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[2, 7] = float("inf")  # row 2's model fault
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=5, logprobs=3),
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=5, seed=6),
    ]
    gens = [None, torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(6)]
    picked, lps = sample_rows(logits, params, gens)
    assert picked[0] == int(logits[0].argmax())  # greedy rows: one batched argmax
    assert picked[1] == sample(logits[1], 0.8, generator=torch.Generator().manual_seed(5))  # as alone
    assert picked[3] == sample(logits[3], 0.8, 5, generator=torch.Generator().manual_seed(6))
    assert isinstance(picked[2], FloatingPointError)  # its own exception, the others sampled
    assert [x is None for x in lps] == [True, False, True, True]
    want = torch.log_softmax(logits[1], -1)
    assert lps[1].top_ids == want.topk(3).indices.tolist() and lps[1].logprob == pytest.approx(float(want[picked[1]]))


def test_the_exponential_race_draws_from_the_filtered_distribution():
    """4,000 rows, each with its own seeded generator, in one batched call: the tokens' frequencies follow the
    softmax (within 0.03), and top-k / top-p / min-p rows never draw a token their filter removed."""
    from skipray.core.requests import SamplingParams
    from skipray.core.sampling import sample_rows

    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0])
    n = 4000
    logits = base.expand(n, -1).clone()
    gens = [torch.Generator().manual_seed(s) for s in range(n)]
    picked, _ = sample_rows(logits, [SamplingParams(temperature=1.0)] * n, gens)
    freq = torch.bincount(torch.tensor(picked), minlength=8).float() / n
    assert (freq - torch.softmax(base, -1)).abs().max() < 0.03, freq
    probs = torch.softmax(base, -1)
    nucleus = int((probs.cumsum(-1) - probs < 0.7).sum())  # the tokens top_p=0.7 keeps
    for params, allowed in (
        (SamplingParams(temperature=1.0, top_k=3), 3),
        (SamplingParams(temperature=1.0, top_p=0.7), nucleus),
        (SamplingParams(temperature=1.0, min_p=0.2), int((probs >= 0.2 * probs.max()).sum())),
    ):
        got, _ = sample_rows(logits[:500], [params] * 500, gens[:500])
        assert max(got) < allowed and len(set(got)) == allowed, (params, sorted(set(got)))
