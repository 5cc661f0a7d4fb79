"""Model-written prompts (Magpie) with openings: every prompt keeps the opening it continued, and prompts too close
to a held-out question are dropped (the default model: a random one never ends a question)."""

from __future__ import annotations


def test_self_prompts_continue_their_openings_and_skip_held_out_questions():
    from skipray.loading import load
    from skipray.training.distill_data import _norm, self_prompts, too_close

    loaded = load("default")
    starts = ["Who was", "What year"]
    held = ["Who was the first president of the United States?"]
    got = self_prompts(loaded, 6, seed=0, batch_size=8, max_new_tokens=32, exclude=held, progress=False, starts=starts)
    assert got, "no question ended within 32 tokens"
    assert all(p.startswith(tuple(starts)) for p in got), got
    assert len({_norm(p) for p in got}) == len(got)
    assert not [p for p in got if too_close(p, [set(_norm(h).split()) for h in held])]
