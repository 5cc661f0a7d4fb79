"""The Serve app's incremental detokenizer: streamed deltas add up to the whole reply, stop strings cut it.

Tokens are fed as the engine emits them: the token that completes a stop string is the last one
(``stop_checker`` is the engine's own test), and the stream must never have sent any of the stop string.
"""

from __future__ import annotations

import pytest


@pytest.mark.real_model
@pytest.mark.parametrize("stop", [[], ["fox"], ["lazy dog"], ["ö"]])
def test_deltas_add_up_and_emit_false_agrees(smol, stop):
    from skipray.serve.app import _TextStream
    from skipray.text import stop_checker, truncate_at_stop

    text = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ done"
    ids = smol.tokenizer.encode(text, add_special_tokens=False)
    stops = stop_checker(smol.tokenizer, stop)
    n = next((i + 1 for i in range(len(ids)) if stops and stops(ids[: i + 1])), len(ids))  # the engine stops here
    ids = ids[:n]
    streamed, whole = _TextStream(smol.tokenizer, stop), _TextStream(smol.tokenizer, stop)
    deltas = [streamed.add(t, final=i == n - 1) for i, t in enumerate(ids)]
    quiet = [whole.add(t, final=i == n - 1, emit=False) for i, t in enumerate(ids)]
    want = truncate_at_stop(smol.tokenizer.decode(ids, skip_special_tokens=True), stop)
    assert "".join(deltas) == streamed.final_text() == want
    assert whole.final_text() == want and not any(quiet[:-1])  # nothing decoded before the end
    assert all("\ufffd" not in d for d in deltas)  # no half characters sent
    if stop:
        assert n < len(smol.tokenizer.encode(text, add_special_tokens=False)) and stop[0] not in want
