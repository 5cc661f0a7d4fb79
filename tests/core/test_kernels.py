"""Products: fused, prepacked (oneDNN) linear layers equal the layers they stand for, and are copies."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from skipray.core.engine import Engine, SamplingParams
from skipray.core.kernels import CPU_BF16_SLOW, apply, can_pack, cpu_bf16_packing, onednn_available, product
from skipray.core.model import SkipModel
from skipray.core.schedule import SkipSchedule


@pytest.mark.parametrize("pack", [False, True])
def test_a_product_equals_its_linear_layers(pack):
    if pack and not onednn_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    q, k, v = nn.Linear(48, 48, bias=False), nn.Linear(48, 16), nn.Linear(48, 16, bias=False)  # mixed biases
    x3 = torch.randn(4, 9, 48)
    for layers in ((q,), (k,), (q, k, v)):
        p = product([m.weight for m in layers], [m.bias for m in layers], pack)
        assert p.packed == pack and (p.splits is None) == (len(layers) == 1)
        for x in (torch.randn(1, 48), torch.randn(3, 7, 48), x3[:, 2:5]):  # 2-D, 3-D, strided
            with torch.inference_mode():
                got = apply(x, p)
            got = got if isinstance(got, tuple) else (got,)
            for y, m in zip(got, layers, strict=True):
                torch.testing.assert_close(y, m(x).detach(), atol=1e-5, rtol=1e-5)


def test_products_are_copies_unless_told_to_share():
    lin, x = nn.Linear(16, 16), torch.randn(2, 16)
    pack = onednn_available()
    copied = product([lin.weight], [lin.bias], pack)
    shared = product([lin.weight], [lin.bias], pack=False, copy=False)
    assert copied.nbytes > 0 and shared.nbytes == 0
    with torch.no_grad():
        before = lin(x)
        lin.weight.add_(1.0)  # an optimizer step, in place
        torch.testing.assert_close(apply(x, copied), before, atol=1e-5, rtol=1e-5)  # built once
        torch.testing.assert_close(apply(x, shared), lin(x), atol=1e-5, rtol=1e-5)  # the layer's own tensor


@pytest.mark.skipif(not cpu_bf16_packing(), reason="this CPU has no oneDNN bf16 packing (x86: no AVX-512 BF16 or AMX)")
def test_packed_bf16_close_to_module():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    p = product([lin.weight], [lin.bias], pack=True)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        got, want = apply(x, p), lin(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


def test_what_packs():
    cpu = torch.device("cpu")
    assert not can_pack(cpu, torch.float16) and not can_pack(torch.device("meta"), torch.float32)
    assert can_pack(cpu, torch.float32) == onednn_available()
    assert can_pack(cpu, torch.bfloat16) == cpu_bf16_packing()


def test_engine_with_and_without_packing_agree(monkeypatch):
    hf = tiny_llama(num_layers=6)
    sched = SkipSchedule(6, max_layers=6, min_layers=2, decay_tokens=8, warmup_layers=1)
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_tokens=12)
    packed, plain = SkipModel(hf), SkipModel(hf, packed_linears=False)
    a = Engine(packed, sched, max_batch=2, max_len=64).generate(prompts, params)
    b = Engine(plain, sched, max_batch=2, max_len=64).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert not plain.inference_weights.packed and plain.inference_weights.nbytes == 0  # the modules' own tensors
    assert packed.inference_weights.packed == onednn_available()
    groups = packed.inference_weights.groups
    assert len(groups) == 6 * 4 and sum(g.base.splits is not None for g in groups.values()) == 6 * 2  # q/k/v, gate/up
    from skipray.core import weights

    monkeypatch.setattr(weights, "can_pack", lambda device, dtype: False)  # a CPU where oneDNN cannot run
    cannot = Engine(SkipModel(hf), sched, max_batch=2, max_len=64)
    assert not cannot.model.inference_weights.packed
    assert [c.token_ids for c in cannot.generate(prompts, params)] == [c.token_ids for c in a]


def test_bf16_without_packing_runs_unpacked_and_loading_warns(monkeypatch, tiny_model_dir):
    """On a CPU that cannot pack bf16 the products run unpacked (the same numbers as the layer), and asking
    for bf16 warns what to expect."""
    import warnings

    from skipray import loading
    from skipray.core import kernels

    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "cpu_bf16_packing", lambda: False)
    assert not kernels.can_pack(torch.device("cpu"), torch.bfloat16)
    p = product([lin.weight], [lin.bias], pack=False)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(apply(x, p), lin(x))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loading.load(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert any(str(w.message) == CPU_BF16_SLOW for w in seen)
