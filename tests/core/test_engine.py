"""Engine on tiny random models: parity with Hugging Face, skip decode == training forward,
padding invariance, cache discipline, sampling determinism, stop handling and bad arguments."""

import pytest
import torch
from conftest import decode_step

from skipray.core.engine import Engine
from skipray.core.model import Segment, SkipModel, forward, training_plan
from skipray.core.requests import SamplingParams
from skipray.core.runner import pad_prompts
from skipray.core.schedule import SkipSchedule

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 3, 4, 3, 4, 3], [50]]


def hf_greedy(hf, prompts, n):
    ids, real = pad_prompts(prompts)
    P = ids.shape[1]
    out = hf.generate(
        ids, attention_mask=real.long(), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return [row[P:].tolist() for row in out]


def schedule_for(model):
    L = model.num_layers
    return SkipSchedule(L, L - 1, 2, decay_tokens=6, warmup_layers=1)


def test_full_depth_matches_hf_generate(hf_model):
    model = SkipModel(hf_model)
    engine = Engine(model, max_batch=4, max_len=64)
    batched = engine.generate(PROMPTS, SamplingParams(max_tokens=10))
    assert [c.token_ids for c in batched] == hf_greedy(hf_model, PROMPTS, 10)
    for p, c in zip(PROMPTS, batched):  # and one by one
        assert engine.generate([p], SamplingParams(max_tokens=10))[0].token_ids == hf_greedy(hf_model, [p], 10)[0]
        assert c.finish_reason == "length" and c.layers_per_token == [model.num_layers] * 10


def decode_logits(engine, prompts, schedule, n):
    """Greedy decode through the engine's phases, returning generated ids and per-step logits."""
    logits = engine.runner.prefill(prompts)
    P = max(map(len, prompts))
    positions = torch.tensor([len(p) for p in prompts])
    steps, toks = [logits], []
    for i in range(n):
        tok = logits.argmax(-1)
        toks.append(tok)
        logits = decode_step(engine.runner, tok[:, None], positions + i, P + i, schedule.active_layers(i))
        steps.append(logits)
    return torch.stack(toks, 1), torch.stack(steps, 1)


@pytest.mark.parametrize("sized", [False, True], ids=["uniform-cache", "schedule-sized-cache"])
def test_cached_skip_decode_equals_training_forward(hf_model, sized):
    model = SkipModel(hf_model)
    sched = schedule_for(model)
    n = 12
    P0 = max(map(len, PROMPTS))
    engine = Engine(
        model,
        sched,
        max_batch=4,
        max_len=P0 + n if sized else 64,
        max_tokens=n if sized else None,
        cache_schedule=sched,
    )
    if sized:  # the skipped layers hold fewer slots than the others
        assert min(engine.cache.layer_lens) < max(engine.cache.layer_lens) == P0 + n
    gen, step_logits = decode_logits(engine, PROMPTS, sched, n)
    prompt, prompt_real = pad_prompts(PROMPTS)
    P = prompt.shape[1]
    tokens = torch.cat([prompt, gen], 1)
    real = torch.cat([prompt_real, torch.ones_like(gen, dtype=torch.bool)], 1)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    seg = Segment(tokens, positions, training_plan(sched, P, P + n), real, logits_at=slice(P - 1, P + n))
    with torch.no_grad():
        par = forward(model, seg)
    torch.testing.assert_close(par, step_logits, atol=1e-4, rtol=1e-4)
    # and the same with gradients on (the training path clones hidden states)
    par_grad = forward(model, seg)
    torch.testing.assert_close(par_grad.detach(), step_logits, atol=1e-4, rtol=1e-4)


def test_batched_equals_unbatched_under_skipping(hf_model):
    model = SkipModel(hf_model)
    sched = schedule_for(model)
    engine = Engine(model, sched, max_batch=4, max_len=64)
    batched = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    for p, c in zip(PROMPTS, batched):
        alone = engine.generate([p], SamplingParams(max_tokens=12))[0]
        assert alone.token_ids == c.token_ids
        assert c.layers_per_token == sched.layers_per_token(12)


def test_skipped_layers_leave_cache_untouched(llama):
    model = SkipModel(llama)
    sched = SkipSchedule(model.num_layers, 4, 2, decay_tokens=3, warmup_layers=1)
    engine = Engine(model, sched, max_batch=2, max_len=32)
    prompts = [[4, 5, 6], [7, 8]]
    logits = engine.runner.prefill(prompts)
    cache = engine.cache
    assert cache.filled[:, :2].eq(3).all()
    positions = torch.tensor([3, 2])
    for i in range(5):
        before_k, before_v, before_f = [t.clone() for t in cache.k], [t.clone() for t in cache.v], cache.filled.clone()
        active = sched.active_layers(i)
        logits = decode_step(engine.runner, logits.argmax(-1)[:, None], positions + i, 3 + i, active)
        for l in range(model.num_layers):
            if l in active:
                assert cache.filled[l, :2].eq(3 + i + 1).all()
                assert not torch.equal(cache.k[l][:2, :, 3 + i], before_k[l][:2, :, 3 + i])
            else:
                assert torch.equal(cache.k[l], before_k[l]) and torch.equal(cache.v[l], before_v[l])
                assert torch.equal(cache.filled[l], before_f[l])
    # a layer holds exactly the slots its row computed: warm-up all, top layer all, skipped block the prompt
    assert cache.filled[0, 0] == 8 and cache.filled[model.num_layers - 1, 0] == 8
    assert cache.filled[1, 0] == 3


def test_seeded_sampling_is_reproducible(llama):
    engine = Engine(SkipModel(llama), max_batch=2, max_len=64)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    a = engine.generate([[5, 6, 7]], p)[0].token_ids
    b = engine.generate([[5, 6, 7]], p)[0].token_ids
    c = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=16, temperature=1.0, seed=8))[0].token_ids
    assert a == b and a != c
    # a row's sample does not depend on its batch neighbours
    both = engine.generate([[5, 6, 7], [9, 9]], [p, SamplingParams(max_tokens=4, temperature=1.0, seed=1)])
    assert both[0].token_ids == a


def test_stop_tokens_and_compaction(llama):
    model = SkipModel(llama)
    sched = schedule_for(model)
    engine = Engine(model, sched, max_batch=4, max_len=64)
    free = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    stop_tok = free[1].token_ids[3]  # row 1 stops at its 4th token; the others run on
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))
    for f, o in zip(free, outs):
        k = f.token_ids.index(stop_tok) + 1 if stop_tok in f.token_ids else len(f.token_ids)
        assert o.token_ids == f.token_ids[:k]
        assert o.finish_reason == ("stop" if stop_tok in f.token_ids else "length")
    stopper = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, stop_fn=lambda ids: len(ids) == 5))
    assert len(stopper[0].token_ids) == 5 and stopper[0].finish_reason == "stop"


def test_ignore_eos_generates_through_eos(llama):
    model = SkipModel(llama)
    free = Engine(model, max_batch=4, max_len=64).generate(PROMPTS, SamplingParams(max_tokens=8))
    eos = free[0].token_ids[2]  # EOS for this engine: row 0 would stop at its 3rd token
    engine = Engine(model, max_batch=4, max_len=64, eos_token_ids=(eos,))
    stopped = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert stopped[0].token_ids == free[0].token_ids[:3] and stopped[0].finish_reason == "stop"
    through = engine.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in through] == [f.token_ids for f in free]
    assert all(o.finish_reason == "length" for o in through)
    stop_tokens_still_stop = engine.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(eos,))
    )
    assert stop_tokens_still_stop[0].token_ids == free[0].token_ids[:3]


def test_stream_yields_tokens_in_order(llama):
    engine = Engine(SkipModel(llama), max_batch=2, max_len=64)
    events = list(engine.stream([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=5)))
    assert len(events) == 10
    per_row = {0: [e.token_id for e in events if e.index == 0], 1: [e.token_id for e in events if e.index == 1]}
    ref = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=5))
    assert per_row[0] == ref[0].token_ids and per_row[1] == ref[1].token_ids
    assert [e.finish_reason for e in events if e.index == 0][-1] == "length"


@pytest.mark.parametrize(
    "prompts, params, match",
    [
        ([[]], SamplingParams(), "empty"),
        ([[1, 2, 10_000]], SamplingParams(), "token ids outside"),
        ([[1, 2]], SamplingParams(max_tokens=0), "max_tokens"),
        ([[1, 2]], SamplingParams(temperature=-1), "temperature"),
        ([[1, 2]], SamplingParams(top_p=0), "top_p"),
        ([[1, 2]], SamplingParams(top_k=-3), "top_k"),
        ([[1] * 250], SamplingParams(max_tokens=10), "context"),
    ],
)
def test_bad_arguments(llama, prompts, params, match):
    engine = Engine(SkipModel(llama), max_batch=2, max_len=16)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, params)


def test_schedule_must_fit_model(llama):
    with pytest.raises(ValueError, match="layers"):
        Engine(SkipModel(llama), SkipSchedule(30, 20, 8, 10))


def test_forward_takes_the_batch_as_a_segment(llama):
    from skipray.core.model import full_plan

    model = SkipModel(llama)
    tokens = torch.tensor([[5, 6, 7]])
    real, pos = torch.ones_like(tokens, dtype=torch.bool), torch.arange(3)[None]
    with pytest.raises(TypeError, match="Segment"):  # a bare tensor where the layout belongs fails loudly
        forward(model, tokens)
    seg = Segment(tokens, pos, full_plan(model.num_layers), real)
    with pytest.raises(ValueError, match="prefix"):
        forward(model, seg, cache=model.new_cache(1, 8), prefix=model.new_cache(1, 8))
    with pytest.raises(ValueError, match="plan has"):
        forward(model, Segment(tokens, pos, full_plan(model.num_layers - 1), real))


def test_cache_grows_and_reports_memory(llama):
    model = SkipModel(llama)
    engine = Engine(model, max_batch=1, max_len=8)
    small = engine.cache.nbytes
    got = engine.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=10))
    # the second prompt takes the row the first one freed; the slots grew to what the call needs
    assert engine.cache.max_batch == 1 and engine.cache.max_len >= 13 and engine.cache.nbytes > small
    L, H, D = model.num_layers, model.kv_heads, model.head_dim
    assert engine.cache.nbytes >= L * 2 * H * 13 * D * 4
    wide = Engine(model, max_batch=2, max_len=16).generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=10))
    assert [c.token_ids for c in got] == [c.token_ids for c in wide]


def test_pad_prompts_both_sides():
    tokens, real = pad_prompts([[5, 6, 7], [8]], pad_id=1)
    assert tokens.tolist() == [[5, 6, 7], [1, 1, 8]] and real.tolist() == [[True] * 3, [False, False, True]]
    tokens, real = pad_prompts([[5, 6, 7], [8]], pad_id=1, side="right")
    assert tokens.tolist() == [[5, 6, 7], [8, 1, 1]] and real.tolist() == [[True] * 3, [True, False, False]]
    with pytest.raises(ValueError, match="side"):
        pad_prompts([[5]], side="middle")


def test_cache_shrinks_with_the_schedule(llama):
    from skipray.core.memory import cache_bytes_per_row, layer_slots

    model = SkipModel(llama)
    L, H, D = model.num_layers, model.kv_heads, model.head_dim
    sched = SkipSchedule(L, 4, 2, decay_tokens=3, warmup_layers=1)
    P, n = max(map(len, PROMPTS)), 12
    skip = Engine(model, sched, max_batch=4, max_len=P + n, max_tokens=n, cache_schedule=sched)
    full = Engine(model, max_batch=4, max_len=P + n)
    # layers 1-2 never run after the prompt, layer 3 runs step 0, layer 4 steps 0-2, layers 0 and 5 always
    lens = layer_slots(sched, P, n)
    assert lens == [P + n, P, P, P + 1, P + 3, P + n] and skip.cache.layer_lens == lens
    assert full.cache.layer_lens == [P + n] * L
    # each layer saves exactly the slots it never fills: K and V x 4 rows x heads x head_dim x 4 bytes
    assert full.cache.nbytes - skip.cache.nbytes == 2 * 4 * H * D * 4 * sum(P + n - x for x in lens)
    assert skip.cache.nbytes == 4 * cache_bytes_per_row(lens, H, D, 4)
    # decoding through the smaller cache gives the uniform cache's tokens and does not reallocate it
    cache = skip.cache
    got = skip.generate(PROMPTS, SamplingParams(max_tokens=n))
    assert skip.cache is cache
    assert [c.token_ids for c in got] == [
        c.token_ids for c in full.generate(PROMPTS, SamplingParams(max_tokens=n), sched)
    ]
    # a full-depth call needs more: the cache grows to what it needs, and the answer is full depth's
    deep = skip.generate(PROMPTS, SamplingParams(max_tokens=n), SkipSchedule.full(L))
    assert skip.cache is not cache and skip.cache.layer_lens == [P + n] * L
    assert [c.token_ids for c in deep] == [c.token_ids for c in full.generate(PROMPTS, SamplingParams(max_tokens=n))]
    with pytest.raises(ValueError, match="max_tokens"):
        Engine(model, sched, max_len=8, max_tokens=9)


def test_writing_past_a_layers_slots_raises(llama):
    from skipray.core.cache import KVCache

    model = SkipModel(llama)
    sched = SkipSchedule(model.num_layers, 4, 2, decay_tokens=3, warmup_layers=1)
    engine = Engine(
        model, sched, max_batch=2, max_len=10, max_tokens=4, cache_schedule=sched
    )  # prompt budget 6: layer 1 has 6 slots
    assert engine.cache.layer_lens[1] == 6
    logits = engine.runner.prefill([[4, 5, 6]])
    tok = logits.argmax(-1)[:, None]
    decode_step(engine.runner, tok, torch.tensor([3]), 3, sched.active_layers(0))  # within every layer's slots
    with pytest.raises(IndexError, match="layer 1 holds 6 slots"):  # a full-depth step at slot 6
        decode_step(engine.runner, tok, torch.tensor([6]), 6, range(model.num_layers))
    c = KVCache(2, 2, 1, 5, 4, layer_lens=[5, 3])
    k = torch.ones(2, 1, 1, 4)
    c.write(1, slice(0, 2), torch.tensor([1, 2]), k, k)
    with pytest.raises(IndexError, match="layer 1 holds 3 slots"):
        c.write(1, slice(0, 2), torch.tensor([1, 3]), k, k)
    with pytest.raises(IndexError):
        c.write(1, slice(0, 2), 2, torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4))
    kk, vv, readable = c.keys(1, slice(0, 2), 5)  # reads stop at the layer's length
    assert kk.shape[2] == 3 and readable.shape == (2, 3)
    with pytest.raises(ValueError, match="layer_lens"):
        KVCache(2, 2, 1, 5, 4, layer_lens=[5, 6])


def test_more_prompts_than_rows_refill_rows_and_change_no_sample(llama):
    """Continuous batching in generate: 5 prompts on 2 rows with mixed lengths, schedules and seeds; each
    row's tokens are what it makes alone (a refilled row changes no row's sample)."""
    model = SkipModel(llama)
    sched = schedule_for(model)
    prompts = [[5, 6, 7], [9, 9], [3, 4, 3, 4, 3], [50], [11, 12, 13, 14]]
    params = [
        SamplingParams(max_tokens=n, temperature=0.9, seed=k) if k % 2 else SamplingParams(max_tokens=n)
        for k, n in enumerate([3, 12, 5, 9, 2])
    ]
    schedules = [sched, None, SkipSchedule.full(model.num_layers), sched, None]
    engine = Engine(model, sched, max_batch=2, max_len=64)
    steps = engine.steps
    got = engine.generate(prompts, params, schedules)
    assert engine.steps - steps < sum(p.max_tokens for p in params) - 1  # rows really ran side by side
    for p, sp, s, c in zip(prompts, params, schedules, got):
        alone = Engine(model, sched, max_batch=1, max_len=64).generate([p], sp, s)[0]
        assert (c.token_ids, c.layers_per_token, c.finish_reason) == (
            alone.token_ids,
            alone.layers_per_token,
            alone.finish_reason,
        )


def test_a_failing_row_raises_or_ends_alone(llama):
    engine = Engine(SkipModel(llama), max_batch=2, max_len=64)

    def broken(ids):
        if len(ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer error")
        return False

    params = [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, stop_fn=broken), SamplingParams(max_tokens=4)]
    with pytest.raises(UnicodeDecodeError):
        engine.generate([[5, 6], [7, 8], [9, 10]], params)
    got = engine.generate([[5, 6], [7, 8], [9, 10]], params, raise_errors=False)  # the engine was left idle
    assert [c.finish_reason for c in got] == ["length", "error", "length"]
    assert isinstance(got[1].error, UnicodeDecodeError) and len(got[1].token_ids) == 2
    assert got[0].token_ids == engine.generate([[5, 6]], params[0])[0].token_ids
    with pytest.raises(ValueError, match="stop strings need"):
        engine.generate([[5, 6]], SamplingParams(stop=["x"]))


def test_rms_norm_is_hugging_faces_in_fp32_and_the_module_otherwise(llama):
    from skipray.core.architectures import rms_norm

    d = llama.config.hidden_size
    norm = type(llama.model.layers[0].input_layernorm)(d, eps=1e-5)  # a fresh one: the fixture stays as it is
    with torch.no_grad():
        norm.weight.normal_()
        x = torch.randn(3, 5, d) * 4
        assert torch.equal(rms_norm(norm, x), norm(x))
        norm.to(torch.bfloat16)
        assert torch.equal(rms_norm(norm, x.bfloat16()), norm(x.bfloat16()))
