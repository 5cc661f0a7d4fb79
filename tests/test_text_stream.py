"""skipray.text.TextStream, the server's incremental detokenizer: streamed deltas add up to the whole
reply (which the server sends non-streamed), stop strings cut it, no half characters are sent, and a
tokenizer whose decode cleans up spaces streams the same text as it returns whole.

Tokens are fed as the engine emits them: the token that completes a stop string is the last one
(``skipray.core.requests.finish_reason`` with the ``detokenizer`` hook is the engine's own test), and the
stream must never have sent any of the stop string.
"""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (SmolLM2: byte-level BPE), without loading the model."""
    from transformers import AutoTokenizer

    from skipray.loading import convert_gguf, default_gguf

    return AutoTokenizer.from_pretrained(convert_gguf(default_gguf()))


@pytest.fixture(scope="module")
def cleanup_tokenizer():
    """The same tokenizer with decode's space clean-up forced on (" ," -> ",", " n't" -> "n't", ...)."""
    from transformers import AutoTokenizer

    from skipray.loading import convert_gguf, default_gguf

    tok = AutoTokenizer.from_pretrained(
        convert_gguf(default_gguf()),
        clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )
    assert tok.decode(tok.encode("a , b", add_special_tokens=False)) == "a, b"  # it really cleans up
    return tok


def stream(tok, ids, stop=(), prompt=()):
    from skipray.text import TextStream

    ts = TextStream(tok, list(prompt), list(stop))
    deltas = [ts.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas, ts.text


@pytest.mark.parametrize("stop", [[], ["fox"], ["lazy dog"], ["ö"]])
def test_deltas_add_up_and_stop_strings_are_never_sent(tokenizer, stop):
    from skipray.core.requests import SamplingParams, finish_reason
    from skipray.text import detokenizer, truncate_at_stop

    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    params, detok = SamplingParams(max_tokens=len(ids), stop=stop), detokenizer(tokenizer)
    n = next(i + 1 for i in range(len(ids)) if finish_reason(ids[: i + 1], params, (), detok))  # the engine stops here
    deltas, whole = stream(tokenizer, ids[:n], stop)
    want = truncate_at_stop(tokenizer.decode(ids[:n], skip_special_tokens=True), stop)
    assert "".join(deltas) == whole == want
    assert all("\ufffd" not in d for d in deltas)  # no half characters sent
    if stop:
        assert n < len(ids) and stop[0] not in want


def test_random_ids_stream_the_decoded_text(tokenizer):
    """Any ids, special tokens and split UTF-8 included: the deltas add up to ``decode`` of all of them."""
    rng = random.Random(0)
    for _ in range(100):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(6)]
        ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.8 else rng.randrange(300) for _ in range(24)]
        deltas, whole = stream(tokenizer, ids, prompt=prompt)
        assert "".join(deltas) == whole == tokenizer.decode(ids, skip_special_tokens=True)


def test_cleanup_tokenizer_streams_what_it_returns_whole(cleanup_tokenizer):
    """With clean-up, slicing a re-decode of everything sends text that the whole reply does not have
    (a space already sent is removed later); the stream and the whole reply must still agree."""
    tok = cleanup_tokenizer
    rng = random.Random(1)
    cases = [tok.encode("Hello , world . I do n't know ' s it ?", add_special_tokens=False)]
    cases += [[rng.randrange(len(tok)) for _ in range(30)] for _ in range(50)]
    for ids in cases:
        deltas, whole = stream(tok, ids, prompt=tok.encode("Say:", add_special_tokens=False))
        assert "".join(deltas) == whole
    assert "Hello, world." in stream(tok, cases[0])[1]


def test_first_token_keeps_its_space_after_the_prompt(tokenizer):
    prompt = tokenizer.encode("Once upon a", add_special_tokens=False)
    ids = tokenizer.encode(" time there", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids, prompt=prompt)[0]) == " time there"
