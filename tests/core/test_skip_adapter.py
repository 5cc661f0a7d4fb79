"""The skip adapter applies to generated tokens of skipping schedules only; any drop order keeps
cached decoding equal to the parallel training forward; cached teacher top-k gives the KL."""

import math

import pytest
import torch
from conftest import decode_step, tiny_llama, tiny_opt

from skipray.core.engine import Engine, SamplingParams
from skipray.core.model import Segment, SkipModel, forward, training_plan
from skipray.core.runner import pad_prompts
from skipray.core.schedule import SkipSchedule
from skipray.training.train import adapter_mask, divergence, topk_kl

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 3, 4, 3, 4, 3], [50]]


def with_random_lora(hf, seed=1):
    """A peft LoRA on every projection, with non-zero B (peft starts B at zero) so it changes outputs."""
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in hf.named_modules()}
    targets = [
        t
        for t in ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")
        if t in names
    ]
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model


def shuffled_order(L):
    order = list(range(L))
    g = torch.Generator().manual_seed(7)
    return [order[i] for i in torch.randperm(L, generator=g).tolist()]


@pytest.mark.parametrize("max_depth", ["skips-from-step-0", "full-depth-first-steps"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_cached_decode_equals_training_forward_with_adapter_and_drop_order(make, max_depth):
    hf = make()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)
    L = model.num_layers
    top = L - 1 if max_depth == "skips-from-step-0" else L
    sched = SkipSchedule(L, top, 2, decay_tokens=6, shape="power", power=2.0, drop_order=shuffled_order(L))
    full_steps = sum(not sched.skips(i) for i in range(10))
    assert full_steps == (0 if top < L else 3)
    engine = Engine(model, sched, max_batch=4, max_len=64)
    n = 10
    logits = engine.runner.prefill(PROMPTS)
    P = max(map(len, PROMPTS))
    positions = torch.tensor([len(p) for p in PROMPTS])
    steps, toks = [logits], []
    for i in range(n):
        tok = logits.argmax(-1)
        toks.append(tok)
        logits = decode_step(
            engine.runner, tok[:, None], positions + i, P + i, sched.active_layers(i), adapter=sched.skips(i)
        )
        steps.append(logits)
    gen, step_logits = torch.stack(toks, 1), torch.stack(steps, 1)
    prompt, prompt_real = pad_prompts(PROMPTS)
    tokens = torch.cat([prompt, gen], 1)
    real = torch.cat([prompt_real, torch.ones_like(gen, dtype=torch.bool)], 1)
    pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    adapter = adapter_mask(sched, len(PROMPTS), P, P + n)
    par = forward(
        model,
        Segment(tokens, pos, training_plan(sched, P, P + n), real, logits_at=slice(P - 1, P + n), adapter=adapter),
    )
    torch.testing.assert_close(par.detach(), step_logits, atol=1e-4, rtol=1e-4)
    # the adapter really changes the skip output (else the test above would prove nothing about it)
    plain = forward(model, Segment(tokens, pos, training_plan(sched, P, P + n), real, logits_at=slice(P - 1, P + n)))
    assert (plain.detach() - step_logits).abs().max() > 1e-2
    # full-depth steps (the prompt's pass and the steps before the first drop) are the base model's
    torch.testing.assert_close(
        plain[:, : full_steps + 1].detach(), step_logits[:, : full_steps + 1], atol=1e-4, rtol=1e-4
    )
    # the engine decides the same per step: its tokens are those of greedy decoding over these logits
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=n))
    assert [c.token_ids for c in out] == [gen[b, : len(c.token_ids)].tolist() for b, c in enumerate(out)]
    with torch.no_grad(), peft_model.disable_adapter():  # and Hugging Face's base model agrees
        for b, p in enumerate(PROMPTS):
            ids = torch.tensor([p + gen[b, :full_steps].tolist()])
            ref = hf(ids).logits[0, len(p) - 1 :].float()
            torch.testing.assert_close(ref, step_logits[b, : full_steps + 1].float(), atol=1e-4, rtol=1e-4)


def test_full_depth_with_adapter_equals_base_model():
    base_out = Engine(SkipModel(tiny_llama()), max_batch=4, max_len=64).generate(PROMPTS, SamplingParams(max_tokens=12))
    hf = tiny_llama()
    with_random_lora(hf)
    model = SkipModel(hf)
    engine = Engine(model, max_batch=4, max_len=64)
    full = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert [c.token_ids for c in full] == [c.token_ids for c in base_out]
    # a skipping schedule uses the adapter where it drops layers: its first token (the prompt's pass) and
    # its second (step 0 runs every layer) are still the base's
    sched = SkipSchedule(model.num_layers, model.num_layers, model.num_layers - 1, decay_tokens=1, drop_order=[3])
    skip = engine.generate(PROMPTS, SamplingParams(max_tokens=12), sched)
    assert [c.token_ids[:2] for c in skip] == [c.token_ids[:2] for c in base_out]
    assert [c.token_ids for c in skip] != [c.token_ids for c in base_out]


def test_continuous_engine_applies_adapter_per_row():

    hf = tiny_llama()
    with_random_lora(hf)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, L - 1, 3, decay_tokens=4, drop_order=shuffled_order(L))
    alone = Engine(model, max_batch=4, max_len=64)
    want_full = alone.generate(PROMPTS[:2], SamplingParams(max_tokens=8))
    want_skip = alone.generate(PROMPTS[2:], SamplingParams(max_tokens=8), sched)
    ce = Engine(model, max_batch=4, max_len=64)
    ids = [ce.add_request(p, SamplingParams(max_tokens=8)) for p in PROMPTS[:2]]
    ids += [ce.add_request(p, SamplingParams(max_tokens=8), schedule=sched) for p in PROMPTS[2:]]
    got = {i: [] for i in ids}
    while ce.has_work():
        for ev in ce.step():
            got[ev.request_id].append(ev.token_id)
    assert [got[i] for i in ids] == [c.token_ids for c in want_full + want_skip]


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_an_upper_bound_below():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(3, 5, 40, generator=g) * 2, -1)
    s = torch.log_softmax(torch.randn(3, 5, 40, generator=g) * 2, -1)
    exact = (t.exp() * (t - s)).sum(-1)
    vals, ids = t.topk(40, -1)
    torch.testing.assert_close(topk_kl(vals, ids, s), exact, atol=1e-5, rtol=1e-5)
    vals, ids = t.topk(8, -1)
    approx = topk_kl(vals, ids, s)
    assert (approx <= exact + 1e-5).all() and (approx >= 0).all()  # merging outcomes never raises KL


def test_reverse_kl_and_jsd_match_their_formulas_and_bound_below_with_a_top_k():
    g = torch.Generator().manual_seed(1)
    t = torch.log_softmax(torch.randn(2, 4, 30, generator=g) * 2, -1)
    s = torch.log_softmax(torch.randn(2, 4, 30, generator=g) * 2, -1)
    p, q = t.exp(), s.exp()
    m = (p + q) / 2
    want = {
        "forward": (p * (t - s)).sum(-1),
        "reverse": (q * (s - t)).sum(-1),
        "jsd": 0.5 * (p * (t - m.log())).sum(-1) + 0.5 * (q * (s - m.log())).sum(-1),
    }
    vals, ids = t.topk(30, -1)
    for kind, exact in want.items():
        torch.testing.assert_close(divergence(t, s, kind), exact, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(topk_kl(vals, ids, s, kind), exact, atol=1e-5, rtol=1e-5)
    assert (want["jsd"] <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(divergence(s, t, "jsd"), want["jsd"])  # symmetric
    k_vals, k_ids = t.topk(6, -1)
    for kind, exact in want.items():
        approx = topk_kl(k_vals, k_ids, s, kind)
        assert (approx <= exact + 1e-5).all() and (approx >= -1e-6).all(), kind
    with pytest.raises(ValueError, match="divergence"):
        divergence(t, s, "tvd")


def test_engine_logprobs_are_the_step_log_softmax():
    model = SkipModel(tiny_llama())
    engine = Engine(model, max_batch=2, max_len=64)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=4, logprobs=3))[0]
    assert len(out.logprobs) == 4
    tokens = torch.tensor([PROMPTS[0] + out.token_ids])
    real = torch.ones_like(tokens, dtype=torch.bool)
    P = len(PROMPTS[0])
    from skipray.core.model import full_plan

    seg = Segment(
        tokens, torch.arange(tokens.shape[1])[None], full_plan(model.num_layers), real, logits_at=slice(P - 1, P + 3)
    )
    lp = torch.log_softmax(forward(model, seg)[0], -1)
    for i, x in enumerate(out.logprobs):
        assert x.top_ids == lp[i].topk(3).indices.tolist()
        assert x.logprob == pytest.approx(lp[i, out.token_ids[i]].item(), abs=1e-4)
        assert x.top_logprobs == pytest.approx(lp[i].topk(3).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_answer_logits_after_cached_prompt_equal_the_parallel_forward(make):
    """Training runs the prompt once without gradients, then the answer: same logits, same gradients."""
    from skipray.training.data import Example, collate
    from skipray.training.train import answer_logits

    hf = make()
    with_random_lora(hf)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, L - 1, 2, decay_tokens=5, drop_order=shuffled_order(L))
    batch = collate(
        [
            Example([5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26]),
            Example([9, 10], [30, 31, 32]),
            Example([3, 4, 5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]),
        ],
        pad_id=0,
    )
    tokens, real, pos, P = batch.tokens, batch.real, batch.positions, batch.prompt_len
    T = tokens.shape[1]
    whole = forward(
        model,
        Segment(
            tokens,
            pos,
            training_plan(sched, P, T),
            real,
            logits_at=slice(P - 1, T - 1),
            adapter=adapter_mask(sched, 3, P, T),
        ),
    )
    split = answer_logits(model, batch, sched)
    mask = batch.loss_mask[:, P - 1 :]
    torch.testing.assert_close(split[mask], whole[mask].float(), atol=1e-4, rtol=1e-4)
    lora = [p for n, p in hf.named_parameters() if "lora_" in n]
    g_whole = torch.autograd.grad(whole[mask].float().square().sum(), lora, allow_unused=True)
    g_split = torch.autograd.grad(split[mask].square().sum(), lora, allow_unused=True)
    assert sum(g is not None for g in g_split) > len(lora) // 2
    for a, b in zip(g_whole, g_split):
        assert (a is None) == (b is None)  # a layer the schedule never runs on answers gets no gradient
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_inference_weights_are_built_once_and_rebuilt_on_request():
    """Decode steps use base + LoRA merged when the engine is created; an optimizer step on the adapter
    changes nothing until ``Engine.refresh_weights``, which rebuilds them from the adapter as it is now."""
    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, L - 1, 2, decay_tokens=4, drop_order=shuffled_order(L))
    engine = Engine(model, sched, max_batch=4, max_len=64)
    before = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert any(g.merged is not None for g in model.inference_weights.groups.values())  # merged on a CPU
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(-3.0)
    stale = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert [c.token_ids for c in stale] == [c.token_ids for c in before]  # built once: not re-read
    engine.refresh_weights()
    after = engine.generate(PROMPTS, SamplingParams(max_tokens=8))
    # the same tokens the module path gives for the updated adapter (training forward, grad on)
    for c, p in zip(after, PROMPTS):
        toks = torch.tensor([p + c.token_ids[:-1]])
        real = torch.ones_like(toks, dtype=torch.bool)
        T = toks.shape[1]
        logits = forward(
            model,
            Segment(
                toks,
                torch.arange(T)[None],
                training_plan(sched, len(p), T),
                real,
                logits_at=slice(len(p) - 1, T),
                adapter=adapter_mask(sched, 1, len(p), T),
            ),
        )
        assert logits[0].argmax(-1).tolist() == c.token_ids
    assert [c.token_ids for c in before] != [c.token_ids for c in after]


@pytest.mark.parametrize("merge", [True, False])
def test_inference_weights_equal_peft_for_the_adapter_state_they_were_built_in(merge):
    """Merged, low-rank (a partial mask) and base-only answers equal peft's own layers, for the adapter
    as it was at build time: enabled, disabled (``disable_adapter``), or with a weight assigned anew."""
    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)
    attn = hf.model.layers[0].self_attn
    mods = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 3, hf.config.hidden_size)
    every = torch.ones(2, 3, dtype=torch.bool)
    some = torch.tensor([[True, False, True], [False, False, True]])

    def check(expected_every, expected_base):
        weights = model.build_inference_weights(merge=merge)
        with torch.no_grad():
            for got, want in zip(weights(mods, x, every), expected_every()):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for got, e, base in zip(weights(mods, x, some), expected_every(), expected_base()):
                torch.testing.assert_close(got, torch.where(some[..., None], e, base), atol=1e-5, rtol=1e-5)
            for got, base in zip(weights(mods, x, None), expected_base()):
                torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-5)

    def peft_out():
        return [m(x) for m in mods]  # peft's own forward: base plus LoRA where enabled

    def base_out():
        return [m.base_layer(x) for m in mods]

    check(peft_out, base_out)
    with peft_model.disable_adapter():
        check(base_out, base_out)
    name = mods[0].active_adapters[0]
    mods[0].lora_B[name].weight = torch.nn.Parameter(torch.randn_like(mods[0].lora_B[name].weight))
    check(peft_out, base_out)
    assert (model.inference_weights.groups[mods].merged is not None) == merge


def test_on_policy_rollouts_are_the_skip_models_tokens_scored_by_the_base_model():
    """distill(policy=...): the answers are the skip model's own greedy tokens under the policy, and the
    teacher columns are the base model's (adapter off) top-k after the same prefix, as Hugging Face
    computes them."""
    from types import SimpleNamespace

    from skipray.training.distill_data import distill

    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)
    L = model.num_layers
    sched = SkipSchedule(L, L - 1, 2, decay_tokens=6, drop_order=shuffled_order(L))

    class Tok:  # the prompts are already token ids: "5 6 7" -> [5, 6, 7]
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(x) for x in text.split()]}

        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    loaded = SimpleNamespace(model=model, tokenizer=Tok(), eos_token_ids=())
    prompts = [" ".join(map(str, p)) for p in PROMPTS]
    rows = distill(loaded, prompts, chat=False, max_new_tokens=8, batch_size=3, topk=4, policy=sched)
    ref = Engine(model, sched, max_batch=4, max_len=64).generate(PROMPTS, SamplingParams(max_tokens=8))
    assert [r["response_ids"] for r in rows] == [c.token_ids for c in ref]
    with torch.no_grad(), peft_model.disable_adapter():
        for p, r in zip(PROMPTS, rows):
            ids = torch.tensor([p + r["response_ids"]])
            lp = torch.log_softmax(hf(ids).logits[0, len(p) - 1 : -1].float(), -1)
            vals, top = lp.topk(4, -1)
            assert r["teacher_top_ids"] == top.tolist()
            torch.testing.assert_close(torch.tensor(r["teacher_top_logprobs"]), vals, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="topk"):
        distill(loaded, prompts, chat=False, max_new_tokens=4, batch_size=2, policy=sched)


def test_bf16_greedy_tokens_alone_equal_batched_with_one_adapter_path():
    """With ``merge_adapter=False`` every adapter row runs the base weights plus the low-rank update whatever
    its batch-mates (no merged copy of the weights either), so in bf16 a greedy request gives the same tokens
    (and log-probs) alone and in a batch of rows at other steps and schedules. ``None`` merges on a CPU only."""
    hf = tiny_llama(num_layers=6, seed=3)
    with_random_lora(hf, seed=5)
    model = SkipModel(hf.to(torch.bfloat16))
    L = model.num_layers
    sched = SkipSchedule(L, L, 2, decay_tokens=3, drop_order=shuffled_order(L))
    other = SkipSchedule(L, L - 1, 4, decay_tokens=6)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)

    def alone(p, s):
        c = Engine(model, s, max_batch=1, max_len=64, merge_adapter=False).generate([p], params)[0]
        return list(zip(c.token_ids, [lp.logprob for lp in c.logprobs]))

    want = [alone(p, sched if i % 2 else other) for i, p in enumerate(PROMPTS)]
    eng = Engine(model, max_batch=4, max_len=64, merge_adapter=False)
    assert all(g.merged is None for g in model.inference_weights.groups.values())  # no merged copy of any weight
    ids, got = {}, {i: [] for i in range(len(PROMPTS))}

    def step():
        for ev in eng.step():
            got[ids[ev.request_id]].append((ev.token_id, ev.logprobs.logprob))

    for i, p in enumerate(PROMPTS):  # staggered: rows at different steps and depths share every step
        ids[eng.add_request(p, params, schedule=sched if i % 2 else other)] = i
        step()
    while eng.has_work():
        step()
    assert [got[i] for i in range(len(PROMPTS))] == want  # tokens and their log-probs, bit for bit
    Engine(model, max_batch=1, max_len=8)
    assert any(g.merged is not None for g in model.inference_weights.groups.values())  # the CPU default
