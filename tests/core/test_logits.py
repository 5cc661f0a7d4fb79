"""vLLM's logits controls (skipray.core.logits) equal Hugging Face's matching logits processors on the same
logits; the penalties follow OpenAI's formula; rows that ask for nothing are untouched; the engine applies
them per row, so a row's greedy tokens do not depend on its batch-mates' controls."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from skipray.core.logits import min_p_filter, process
from skipray.core.requests import SamplingParams

V = 50


def logits(n: int = 3, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, V) * 3


PROMPT = [1, 2, 3, 7, 7]
OUT = [4, 7, 9, 9, 9, 11]


def test_repetition_penalty_equals_hugging_face():
    x = logits(1)
    got = process(x, [SamplingParams(repetition_penalty=1.3)], [PROMPT], [OUT])
    want = hf.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([PROMPT + OUT]), x.clone())
    torch.testing.assert_close(got, want)


def test_min_p_equals_hugging_face():
    x = logits(1)[0] / 0.7  # after temperature, as both apply it
    got = min_p_filter(x, 0.1)
    want = hf.MinPLogitsWarper(0.1)(torch.tensor([[0]]), x[None].clone())[0]
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(
        got[~torch.isinf(got)], x[~torch.isinf(got)]
    )


def test_min_tokens_equals_hugging_face():
    x = logits(1)
    p = SamplingParams(min_tokens=8, max_tokens=16, stop_token_ids=(5,))
    got = process(x, [p], [PROMPT], [OUT], eos_token_ids=(2,))  # 6 generated: EOS (2) and stop token 5 banned
    want = hf.MinNewTokensLengthLogitsProcessor(len(PROMPT), 8, [2, 5])(torch.tensor([PROMPT + OUT]), x.clone())
    torch.testing.assert_close(got, want)
    assert torch.equal(process(x, [p], [PROMPT], [OUT + [1, 1]], eos_token_ids=(2,)), x)  # 8 reached: nothing


def test_bad_words_equal_hugging_face():
    x = logits(1)
    bad = ((13,), (11, 12), (4, 8))  # 13 always; 12 after an 11 (the output ends with 11); 8 only after a 4
    got = process(x, [SamplingParams(bad_words_ids=bad)], [PROMPT], [OUT])
    want = hf.NoBadWordsLogitsProcessor([list(w) for w in bad], eos_token_id=2)(torch.tensor([OUT]), x.clone())
    torch.testing.assert_close(got, want)
    assert torch.isinf(got[0, 13]) and torch.isinf(got[0, 12]) and not torch.isinf(got[0, 8])


def test_logit_bias_equals_hugging_face():
    x = logits(1)
    got = process(x, [SamplingParams(logit_bias={3: 5.0, 10: -100.0})], [PROMPT], [OUT])
    want = hf.SequenceBiasLogitsProcessor({(3,): 5.0, (10,): -100.0})(torch.tensor([OUT]), x.clone())
    torch.testing.assert_close(got, want)


def test_presence_and_frequency_follow_openais_formula():
    x = logits(1)
    got = process(x, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [PROMPT], [OUT])
    want = x.clone()
    for tok in set(OUT):
        want[0, tok] -= 0.5 + 0.25 * OUT.count(tok)  # output tokens only; the prompt's 1, 2, 3 untouched
    torch.testing.assert_close(got, want)


def test_rows_without_controls_are_untouched_and_rows_are_independent():
    x = logits(3)
    plain = SamplingParams()
    assert process(x, [plain] * 3, [PROMPT] * 3, [OUT] * 3) is x
    got = process(x, [plain, SamplingParams(repetition_penalty=2.0), plain], [PROMPT] * 3, [OUT] * 3)
    torch.testing.assert_close(got[[0, 2]], x[[0, 2]])
    assert not torch.equal(got[1], x[1])


@pytest.mark.parametrize(
    "field,value",
    [
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("min_p", 1.5),
        ("min_tokens", 99),
        ("logit_bias", {1: 101.0}),
        ("bad_words_ids", ((),)),
    ],
)
def test_impossible_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field.split("_ids")[0]):
        SamplingParams(max_tokens=16, **{field: value}).validate()


def test_engine_applies_controls_per_row():
    """A greedy row's tokens are the same alone and beside a row with penalties, and the penalized row
    follows its controls (no token repeated with a huge repetition penalty; bad words never generated)."""
    from conftest import tiny_llama

    from skipray.core.engine import Engine
    from skipray.core.model import SkipModel

    model = SkipModel(tiny_llama())
    eng = Engine(model, max_batch=2, max_len=64)
    prompt = [1, 2, 3, 4]
    alone = eng.generate([prompt], SamplingParams(max_tokens=12))[0].token_ids
    strict = SamplingParams(max_tokens=12, repetition_penalty=1e6, bad_words_ids=((alone[0],),))
    both = eng.generate([prompt, prompt], [SamplingParams(max_tokens=12), strict])
    assert both[0].token_ids == alone
    got = both[1].token_ids
    assert alone[0] not in got and len(set(got)) == len(got) and not set(got) & set(prompt)


def test_controls_run_on_the_rows_device():
    """Index and count tensors are made on the row's device (a CUDA row wants CUDA indices); the meta
    device checks it on a CPU, as a device mismatch raises there too."""
    p = SamplingParams(
        logit_bias={1: 1.0},
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        bad_words_ids=((3,),),
        min_tokens=5,
        max_tokens=9,
    )
    got = process(torch.zeros(2, V, device="meta"), [p, SamplingParams()], [PROMPT] * 2, [OUT] * 2, (2,))
    assert got.device.type == "meta"


def test_a_row_with_every_token_banned_is_its_own_input_error():
    from skipray.core.sampling import sample_rows

    x = logits(2)
    every = SamplingParams(bad_words_ids=tuple((t,) for t in range(V)))
    for temperature in (0.0, 1.0):
        p = SamplingParams(temperature=temperature, bad_words_ids=every.bad_words_ids)
        picked, _ = sample_rows(x, [p, SamplingParams()], [None, None], [PROMPT] * 2, [OUT] * 2)
        assert isinstance(picked[0], ValueError) and "every token is banned" in str(picked[0])
        assert picked[1] == int(x[1].argmax())
