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


def built(model: SkipModel) -> SkipModel:
    model.build_inference_weights()
    return model


def test_fast_loop_equals_generic_loop_with_merged_adapter():
    hf = tiny_llama()
    with_random_lora(hf)
    fast, generic = built(SkipModel(hf)), SkipModel(hf)  # no inference weights: the modules, generic loop
    L = fast.num_layers
    got, seen = passes(fast, adapter=True, layers=[0, 2, L - 1])
    want, seen_generic = passes(generic, adapter=True, layers=[0, 2, L - 1])
    assert all(k is not None for k in seen) and all(k is None for k in seen_generic)
    assert [k is None for k in seen[1]] == [l not in (0, 2, L - 1) for l in range(L)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_opt, lambda: tiny_other("qwen2")], ids=["opt", "qwen2"])
def test_other_families_and_grad_take_the_generic_loop(make):
    model = built(SkipModel(make()))
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


def test_weights_are_read_once_and_a_rebuild_reads_the_model_as_it_is_now():
    """Disabling the adapter, an in-place weight update, peft's merge (writes through ``.data``), a replaced
    decoder layer and a replaced adapter module: the built weights keep what they read; after
    ``build_inference_weights`` the fast loop gives what the modules give now."""
    import copy

    hf = tiny_llama()
    peft_model = with_random_lora(hf)
    model = built(SkipModel(hf))

    def check(adapter: bool, rebuild: bool = True):
        if rebuild:
            model.build_inference_weights()
        got, seen = passes(model, adapter)
        want, _ = passes(SkipModel(hf), adapter)
        assert all(k is not None for k in seen)
        return all(torch.allclose(g, w, atol=2e-5, rtol=1e-4) for g, w in zip(got, want))

    assert check(False) and check(True)
    with peft_model.disable_adapter():
        assert not check(True, rebuild=False)  # still the adapter it was built with
        assert check(True)
    model.build_inference_weights()
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.base_layer.weight.mul_(0.5)  # in place
    assert not check(False, rebuild=False) and check(False)
    peft_model.merge_adapter()  # base weights += delta through .data: no version bump
    assert check(False)
    peft_model.unmerge_adapter()
    assert check(True)
    layers = hf.model.layers
    layers[1] = copy.deepcopy(layers[2])  # a replaced decoder layer
    assert check(False)
    q = layers[0].self_attn.q_proj
    name = q.active_adapters[0]
    q.lora_B[name] = torch.nn.Linear(q.lora_B[name].in_features, q.lora_B[name].out_features, bias=False)
    assert check(True)  # a replaced adapter module


def test_a_replaced_layer_without_a_rebuild_is_an_error_not_stale_output():
    import copy

    hf = tiny_opt()  # the generic loop, which looks each layer's weights up by its modules
    model = built(SkipModel(hf))
    hf.model.decoder.layers[1] = copy.deepcopy(hf.model.decoder.layers[2])
    with pytest.raises(KeyError, match="rebuild"):
        passes(model, adapter=False)
