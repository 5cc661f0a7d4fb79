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
