"""The lean decode loop (skipray.core.fastpath) gives the generic loop's logits, takes the passes it
should and no others, and never runs stale weights or adapter state."""

import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_other
from test_skip_adapter import with_random_lora

from skipray.core import fastpath
from skipray.core.cache import KVCache
from skipray.core.model import Segment, SkipModel, forward_segments, full_plan, step_plan
from skipray.core.runner import pad_prompts

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 3, 4, 3, 4, 3]]


def passes(model: SkipModel, adapter: bool, layers=None):
    """Logits of a right-padded prefill and two decode steps (the ``layers`` only, all rows on the adapter
    when ``adapter``) on a fresh cache, with the kernels the fast path resolved for each pass."""
    ids, real = pad_prompts(PROMPTS, side="right")
    n, P = ids.shape
    L = model.num_layers
    cache = model.new_cache(n, 32)
    seen, out = [], []
    segs = [
        Segment(
            ids,
            torch.arange(P).expand(n, P),
            full_plan(L, slice(0, n)),
            real,
            cache_rows=slice(0, n),
            start=0,
            logits_at=slice(P - 1, P),
        )
    ]
    for step in range(2):
        tok = torch.tensor([[7 + step]] * n)
        ones = torch.ones_like(tok, dtype=torch.bool)
        segs.append(
            Segment(
                tok,
                torch.full((n, 1), P + step),
                step_plan(layers or range(L), L, slice(0, n)),
                ones,
                cache_rows=slice(0, n),
                start=P + step,
                adapter=ones if adapter else None,
            )
        )
    orig = fastpath.layer_kernels

    def spy(*a):
        seen.append(orig(*a))
        return seen[-1]

    import skipray.core.model as model_module

    model_module.layer_kernels, saved = spy, model_module.layer_kernels
    try:
        with torch.no_grad():
            for s in segs:
                out.append(forward_segments(model, [s], cache)[0].float())
    finally:
        model_module.layer_kernels = saved
    return out, seen


def test_fast_loop_equals_generic_loop_with_merged_adapter():
    hf = tiny_llama()
    with_random_lora(hf)
    fast, generic = SkipModel(hf), SkipModel(hf, packed_linears=False)  # no packing: the generic loop
    L = fast.num_layers
    got, seen = passes(fast, adapter=True, layers=[0, 2, L - 1])
    want, seen_generic = passes(generic, adapter=True, layers=[0, 2, L - 1])
    assert all(k is not None for k in seen) and all(k is None for k in seen_generic)
    assert [k is None for k in seen[1]] == [l not in (0, 2, L - 1) for l in range(L)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_other("qwen2")], ids=["opt", "qwen2"])
def test_other_families_and_grad_take_the_generic_loop(make):
    model = SkipModel(make())
    _, seen = passes(model, adapter=False)
    qwen2 = model.arch == "qwen2"
    assert all((k is not None) == qwen2 for k in seen)  # Qwen2 (q/k/v bias) is Llama-family; OPT is not
    with torch.enable_grad():
        st = type("S", (), {"h": torch.zeros(1, 1, 4), "adapter": None})()
        seg = Segment(
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.long),
            full_plan(model.num_layers),
            torch.ones(1, 1, dtype=torch.bool),
        )
        assert fastpath.layer_kernels(model, [seg], [st], KVCache(model.num_layers, 1, 1, 4, 1)) is None


def test_fast_loop_follows_peft_toggles_and_weight_updates():
    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)
    base = SkipModel(tiny_llama())  # the same random init, without LoRA
    with_adapter, _ = passes(model, adapter=True)
    with peft_model.disable_adapter():
        disabled, seen = passes(model, adapter=True)
    plain, _ = passes(base, adapter=True)
    assert all(k is not None for k in seen)
    for d, p in zip(disabled, plain):
        torch.testing.assert_close(d, p, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(with_adapter[-1], plain[-1], atol=1e-3)
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.base_layer.weight.mul_(0.0)  # in place
        base.hf.model.layers[0].mlp.down_proj.weight.mul_(0.0)
    with peft_model.disable_adapter():
        after, _ = passes(model, adapter=True)
    plain_after, _ = passes(base, adapter=True)
    for a, p in zip(after, plain_after):
        torch.testing.assert_close(a, p, atol=2e-5, rtol=1e-4)


def test_fast_loop_follows_peft_merge_replaced_layers_and_adapters_and_cleared_packs():
    """Writes peft makes through ``.data`` (merge), a replaced decoder layer, a replaced adapter module
    and ``PackedLinears.clear()``: the fast loop's next pass reads the model as it is now."""
    import copy

    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = SkipModel(hf)

    def check(adapter: bool):
        got, seen = passes(model, adapter)
        want, _ = passes(SkipModel(hf, packed_linears=False), adapter)
        assert all(k is not None for k in seen)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)

    check(False)
    check(True)
    peft_model.merge_adapter()  # base weights += delta through .data: no version bump
    check(False)
    peft_model.unmerge_adapter()
    check(True)
    layers = hf.model.layers
    layers[1] = copy.deepcopy(layers[2])  # a replaced decoder layer
    check(False)
    q = layers[0].self_attn.q_proj
    name = q.active_adapters[0]
    q.lora_B[name] = torch.nn.Linear(q.lora_B[name].in_features, q.lora_B[name].out_features, bias=False)
    check(True)  # a replaced adapter module
    nbytes = model.packed_linears.nbytes
    model.packed_linears.clear()
    check(True)
    assert 0 < model.packed_linears.nbytes <= nbytes  # repacked once (without the replaced layer's), not held twice


def test_a_failing_onednn_product_in_the_fast_loop_falls_back_to_the_generic_loop(monkeypatch):
    hf = tiny_llama()
    model, generic = SkipModel(hf), SkipModel(hf, packed_linears=False)
    want, _ = passes(generic, adapter=False)
    passes(model, adapter=False)  # packs made, fast kernels resolved

    def refuse(x, packed):
        raise RuntimeError("oneDNN cannot run here")

    monkeypatch.setattr(fastpath.PackedLinears, "apply", staticmethod(refuse))
    got, seen = passes(model, adapter=False)
    assert seen[0] is not None and not model.packed_linears.enabled and not model.packed_linears.nbytes
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
