"""The GPU check: the engine on a device gives the CPU's numbers (marked ``cuda``; run by scripts/gpu_check.sh).

The device is ``SKIPRAY_CHECK_DEVICE`` (default ``cuda``). ``scripts/gpu_check.sh --cpu`` runs the same checks
with the device replaced by the CPU (a dry run that CI makes, so the checks themselves stay tested); the normal
test command deselects them (``-m "not cuda"`` in pyproject.toml). Checks: logits on the device against the CPU
in fp32 within 2e-4 for every architecture family with a skip plan; a skip schedule with the adapter under
continuous batching gives the CPU's greedy tokens; seeded sampling repeats exactly; the training loss on the
device equals the CPU's within 1e-4; no CPU-only weight packs on CUDA; the cache's bytes match the sizing.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import tiny_llama, tiny_opt, tiny_other

from skipray.core.engine import Engine, SamplingParams
from skipray.core.model import Segment, SkipModel, forward, training_plan
from skipray.core.schedule import SkipSchedule

DEVICE = os.environ.get("SKIPRAY_CHECK_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="no GPU: scripts/gpu_check.sh --cpu runs these checks on the CPU",
    ),
]
FAMILIES = {
    "llama": tiny_llama,
    "opt": tiny_opt,
    "qwen2": lambda: tiny_other("qwen2"),
    "mistral": lambda: tiny_other("mistral"),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 3, 4, 3, 4, 3], [50]]


def schedule(num_layers: int) -> SkipSchedule:
    return SkipSchedule(num_layers, num_layers, 2, 6, warmup_layers=1)


def on_both(hf):
    """(SkipModel on the CPU, SkipModel on the device), fp32, the same weights."""
    cpu = SkipModel(copy.deepcopy(hf).float())
    return cpu, SkipModel(hf.float().to(DEVICE))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_on_the_device_match_the_cpu(family):
    cpu, dev = on_both(FAMILIES[family]())
    torch.manual_seed(0)
    P, T = 6, 14
    tokens = torch.randint(3, 90, (2, T))
    pos = torch.arange(T).expand(2, T)
    real = torch.ones(2, T, dtype=torch.bool)
    plan = training_plan(schedule(cpu.num_layers), P, T)
    with torch.inference_mode():
        want = forward(cpu, Segment(tokens, pos, plan, real, logits_at=slice(P - 1, T)))
        got = forward(dev, Segment(tokens.to(DEVICE), pos.to(DEVICE), plan, real.to(DEVICE), logits_at=slice(P - 1, T)))
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=2e-4, rtol=2e-4)


def staggered(model, sched) -> list[list[int]]:
    """Greedy tokens of PROMPTS, each admitted one step after the previous (continuous batching)."""
    eng = Engine(model, sched, max_batch=4, max_len=64)
    ids, out = [], {}
    for p in PROMPTS:
        ids.append(eng.add_request(p, SamplingParams(max_tokens=10)))
        for ev in eng.step():
            out.setdefault(ev.request_id, []).extend([ev.token_id] if ev.token_id is not None else [])
    while eng.has_work():
        for ev in eng.step():
            out.setdefault(ev.request_id, []).extend([ev.token_id] if ev.token_id is not None else [])
    return [out[i] for i in ids]


def test_skip_adapter_under_continuous_batching_gives_the_cpus_tokens():
    from test_skip_adapter import with_random_lora

    hf = tiny_llama()
    with_random_lora(hf)  # in place: hf's linears become LoRA layers
    cpu, dev = on_both(hf)
    sched = schedule(cpu.num_layers)
    assert staggered(dev, sched) == staggered(cpu, sched)


def test_seeded_sampling_repeats_exactly():
    _, dev = on_both(tiny_llama())
    eng = Engine(dev, schedule(dev.num_layers), max_batch=4, max_len=64)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234)
    first = [c.token_ids for c in eng.generate(PROMPTS, params)]
    assert [c.token_ids for c in eng.generate(PROMPTS, params)] == first


def test_no_cpu_only_packs_on_the_device_and_the_cache_matches_the_sizing():
    from skipray import resources as res

    hf = tiny_llama()
    _, dev = on_both(hf)
    eng = Engine(dev, max_batch=3, max_len=17)
    eng.generate(PROMPTS[:3], SamplingParams(max_tokens=4))
    if DEVICE == "cuda":
        assert not dev.inference_weights.packed, "oneDNN packs are CPU-only: a CUDA model runs plain products"
    assert all(t.device.type == torch.device(DEVICE).type for t in eng.cache.k + eng.cache.v)
    shape = res.ModelShape.from_config(hf.config, "tiny")
    assert res.kv_cache_bytes(shape, 3, 17, 4) == sum(t.nbytes for t in eng.cache.k + eng.cache.v)


def test_training_loss_on_the_device_equals_the_cpus(tmp_path, data_path, tiny_model_dir):
    from test_train import cfg, losses

    from skipray.training.train import train

    got = losses(train(cfg(tmp_path / "dev", data_path, tiny_model_dir, steps=1, device=DEVICE), progress=False))
    want = losses(train(cfg(tmp_path / "cpu", data_path, tiny_model_dir, steps=1, device="cpu"), progress=False))
    assert abs(got[0]["loss"] - want[0]["loss"]) <= 1e-4, (got[0], want[0])


from test_train import data_path  # noqa: E402,F401  (fixture)


def test_the_engine_sizes_its_cache_to_the_devices_memory():
    """On a GPU the engine profiles a prompt pass and keeps max_num_seqs to what gpu_memory_utilization holds
    (``skipray.core.profile``); a tiny model fits every row asked for, and a utilization too small for one row
    is refused at construction. On the CPU (the dry run) the config is kept as given."""
    from skipray.core.config import EngineConfig

    _, dev = on_both(tiny_llama())
    eng = Engine(dev, config=EngineConfig(max_num_seqs=4, max_model_len=64))
    assert eng.config.max_num_seqs == 4 and eng.cache.max_batch == 4
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="not one cache row"):
            Engine(dev, config=EngineConfig(max_num_seqs=4, max_model_len=64, gpu_memory_utilization=1e-6))


def test_static_decode_and_its_cuda_graphs_give_the_eager_tokens():
    """``enforce_eager=False``: decode-only steps in static shapes (5 rows padded to 8, past one slot bucket),
    replayed as CUDA graphs on CUDA (run eagerly on the CPU dry run), give the eager engine's greedy tokens with a
    skip schedule and its adapter."""
    from test_skip_adapter import with_random_lora

    hf = tiny_llama()
    with_random_lora(hf)
    _, dev = on_both(hf)
    sched = schedule(dev.num_layers)
    prompts = [*PROMPTS, [7, 7, 7]]
    params = SamplingParams(max_tokens=140, ignore_eos=True)
    want = [c.token_ids for c in Engine(dev, sched, max_batch=8, max_len=160).generate(prompts, params)]
    eng = Engine(dev, sched, max_batch=8, max_len=160, enforce_eager=False)
    assert [c.token_ids for c in eng.generate(prompts, params)] == want
    if DEVICE == "cuda":
        assert eng.runner.graphs.graphs, "no decode step was captured"


def test_a_decode_step_on_the_device_syncs_once():
    """Greedy, seeded, filtered and penalized rows with log-probs: one read of the device per decode-only step, with
    the copies to the device counted too (pinned staging, ``skipray.core.staging``)."""
    from skipray.diagnostics import HostSyncs

    _, dev = on_both(tiny_llama())
    eng = Engine(dev, schedule(dev.num_layers), max_batch=8, max_len=64)
    kinds = [
        {},
        {"temperature": 0.8, "seed": 3},
        {"temperature": 1.0, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 4},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5, "logit_bias": {3: 2.0}},
    ]
    for i, kw in enumerate(kinds):
        eng.add_request(PROMPTS[i], SamplingParams(max_tokens=30, ignore_eos=True, logprobs=2, **kw))
    eng.step()
    eng.step()
    for _ in range(3):
        with HostSyncs() as h:
            eng.step()
        assert h.syncs <= 1, dict(h.counts)


def test_the_steps_inputs_reach_the_device_through_the_staging_arenas():
    """Values staged over several steps, past the first arena's size, arrive intact (pinned arenas on CUDA)."""
    from skipray.core.staging import HostStaging

    staging = HostStaging(DEVICE)
    for step in range(4):
        staging.new_step()
        got = [staging.to_device(list(range(step + i, step + i + 3000)), torch.long) for i in range(3)]
        for i, t in enumerate(got):
            assert t.device.type == torch.device(DEVICE).type
            assert t.tolist() == list(range(step + i, step + i + 3000))
