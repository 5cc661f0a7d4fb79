"""sampling.sample: greedy below MIN_TEMPERATURE (no overflow from dividing by a tiny temperature),
seeded draws repeat, non-finite logits raise a clear error instead of a torch internals one."""

from __future__ import annotations

import pytest
import torch

from skipray.sampling import MIN_TEMPERATURE, sample


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
