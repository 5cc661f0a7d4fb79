"""PackedLinears: prepacked oneDNN fp32 linears equal the module they stand for, and never go stale."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from skipray.core.engine import Engine, SamplingParams
from skipray.core.kernels import CPU_BF16_SLOW, PackedLinears, cpu_bf16_packing, onednn_available
from skipray.core.model import SkipModel
from skipray.core.schedule import SkipSchedule

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN (the module path is used)")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_module(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    packed = PackedLinears()
    for x in (torch.randn(1, 48), torch.randn(3, 7, 48), torch.randn(4, 9, 48)[:, 2:5]):  # 2-D, 3-D, strided
        with torch.inference_mode():
            got, want = packed(lin, x), lin(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(packed._packs) == 1 and packed.nbytes > 0  # one pack, reused


@pytest.mark.skipif(not cpu_bf16_packing(), reason="this CPU has no oneDNN bf16 packing (x86: no AVX-512 BF16 or AMX)")
def test_packed_bf16_close_to_module():
    torch.manual_seed(0)
    lin, packed = nn.Linear(64, 96).to(torch.bfloat16), PackedLinears()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, want = packed(lin, x), lin(x)
    assert got.dtype == torch.bfloat16 and len(packed._packs) == 1
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


@needs_onednn
def test_repacks_after_weight_changes_and_skips_autograd():
    lin, packed = nn.Linear(16, 16), PackedLinears()
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = packed(lin, x)
        lin.weight.add_(1.0)  # an optimizer step, in place
        after = packed(lin, x)
    torch.testing.assert_close(after, lin(x).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    y = packed(lin, x)  # grad enabled: the module itself, so training gets gradients
    assert y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None


def test_falls_back_to_the_module():
    class Doubling(nn.Linear):  # a subclass (like a LoRA layer) is not plain nn.Linear: called as is
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Doubling(8, 8)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinears()(lin, x), lin(x))
        off = PackedLinears(enabled=False)
        assert off(nn.Linear(8, 4), x).shape == (2, 4) and not off._packs
        half = nn.Linear(8, 8).to(torch.float16)  # fp16: not packed
        assert PackedLinears()(half, x.to(torch.float16)).dtype == torch.float16


def test_engine_with_and_without_packing_agree():
    hf = tiny_llama(num_layers=6)
    sched = SkipSchedule(6, max_layers=6, min_layers=2, decay_tokens=8, warmup_layers=1)
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_tokens=12)
    packed, plain = SkipModel(hf), SkipModel(hf, packed_linears=False)
    a = Engine(packed, sched, max_batch=2, max_len=64).generate(prompts, params)
    b = Engine(plain, sched, max_batch=2, max_len=64).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert not plain.packed_linears._packs
    if onednn_available():
        # per layer one pack each for o and down, one fused pack each for q/k/v and gate/up; and the lm_head
        assert len(packed.packed_linears._packs) == 6 * 2 + 1 and len(packed.packed_linears._fused) == 6 * 2


@needs_onednn
def test_many_runs_modules_that_share_an_input_as_one_matmul():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    q, k, v = nn.Linear(16, 16, bias=False), nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)
    with_bias = (nn.Linear(16, 4), nn.Linear(16, 4))  # biases are concatenated too
    mixed = (nn.Linear(16, 4), nn.Linear(16, 4, bias=False))  # one bias, one not: each module alone
    lin = PackedLinears()
    with torch.inference_mode():
        ys = lin.many((q, k, v), x)
        assert [tuple(y.shape) for y in ys] == [(3, 5, 16), (3, 5, 8), (3, 5, 8)] and len(lin._fused) == 1
        for y, m in zip(ys, (q, k, v)):
            torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
        for y, m in zip(lin.many(with_bias, x), with_bias):
            torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
        assert len(lin._fused) == 2
        for y, m in zip(lin.many(mixed, x), mixed):
            torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)
        assert len(lin._fused) == 2
        with torch.no_grad():
            q.weight.mul_(2)  # a changed weight remakes the fused pack
        torch.testing.assert_close(lin.many((q, k, v), x)[0], q(x), atol=1e-5, rtol=1e-5)


def test_a_cpu_that_cannot_pack_falls_back(monkeypatch):
    packed, lin, x = PackedLinears(), nn.Linear(8, 8), torch.randn(2, 8)

    def refuse(module):
        raise RuntimeError("oneDNN cannot pack here")

    monkeypatch.setattr(packed, "pack", refuse)
    packed.enabled = True  # as on a build that has the op but cannot use it
    with torch.inference_mode():
        torch.testing.assert_close(packed(lin, x), lin(x))
    assert not packed.enabled
    fused, pair = PackedLinears(), (nn.Linear(8, 4, bias=False), nn.Linear(8, 4, bias=False))
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)  # the fused pack fails the same way
    fused.enabled = True
    with torch.inference_mode():
        for y, m in zip(fused.many(pair, x), pair):
            torch.testing.assert_close(y, m(x))
    assert not fused.enabled and not fused._fused


def test_fused_and_single_packs_follow_replaced_weights():
    """A weight assigned anew (a new Parameter, not an in-place update) is seen too, by both paths."""
    a, b, packed = nn.Linear(16, 8), nn.Linear(16, 4), PackedLinears()
    x = torch.randn(3, 16)
    with torch.no_grad():
        packed.many((a, b), x), packed(a, x)
        a.weight = nn.Parameter(torch.randn(8, 16))
        ya, yb = packed.many((a, b), x)
        torch.testing.assert_close(ya, a(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(yb, b(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(a, x), a(x), atol=1e-5, rtol=1e-5)


def test_bf16_without_packing_falls_back_to_the_module_and_loading_warns(monkeypatch, tiny_model_dir):
    """On a CPU that cannot pack bf16 the module runs (same numbers), and asking for bf16 warns what to expect."""
    import warnings

    from skipray import loading
    from skipray.core import kernels

    torch.manual_seed(0)
    lin, packed = nn.Linear(64, 96).to(torch.bfloat16), PackedLinears()

    def refuse(w):
        raise RuntimeError("oneDNN: bf16 not supported on this CPU (the test's stand-in)")

    if onednn_available():
        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(packed(lin, x), lin(x))
    monkeypatch.setattr(kernels, "cpu_bf16_packing", lambda: False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loading.load(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert any(str(w.message) == CPU_BF16_SLOW for w in seen)
