"""skipray.core.memory: per-layer cache lengths for a schedule, bytes per row equal to the engine's cache,
the report and its command line (``python -m skipray.resources --gpu-gib G``)."""

from __future__ import annotations

from skipray.core.cache import KVCache
from skipray.core.memory import cache_bytes_per_row, largest_batch, layer_slots, memory_report, preset_schedules
from skipray.core.schedule import SkipSchedule


def test_layer_slots_follow_steps_running():
    s = SkipSchedule(30, 16, 6, 64, warmup_layers=4)
    lens = layer_slots(s, 100, 64)
    assert lens == [100 + s.steps_running(l, 64) for l in range(30)]
    # warm-up layers and the top two always run; 4-17 never run after the prompt; 18-27 drop out on the way
    assert lens[:4] == [164] * 4 and lens[4:18] == [100] * 14 and lens[-2:] == [164] * 2
    assert all(100 < x < 164 for x in lens[18:28]) and lens[18:28] == sorted(lens[18:28])
    assert layer_slots(SkipSchedule.full(30), 100, 64) == [164] * 30


def test_bytes_per_row_is_the_cache_and_the_report():
    s = SkipSchedule(8, 6, 2, 5, warmup_layers=1)
    lens = layer_slots(s, 9, 7)
    for dtype_bytes, dtype in ((4, "float32"), (2, "bfloat16")):
        import torch

        cache = KVCache(8, 3, 2, max(lens), 16, getattr(torch, dtype), layer_lens=lens)
        assert cache.nbytes == 3 * cache_bytes_per_row(lens, 2, 16, dtype_bytes)
    rows = memory_report({"full": SkipSchedule.full(8), "skip": s}, 2, 16, 2, 9, 7, budget_bytes=10**6)
    full, skip = rows
    assert full.vs_full == 1.0 and skip.vs_full < 1.0 and skip.bytes_per_row < full.bytes_per_row
    assert skip.max_batch == 10**6 // skip.bytes_per_row > full.max_batch == 10**6 // full.bytes_per_row
    assert largest_batch(10, 0) == 0 and largest_batch(5, 10) == 0
    assert set(preset_schedules(30)) == {"full", "~2x", "~3x"}
    assert preset_schedules(30)["~2x"] == SkipSchedule(30, 16, 6, 64, warmup_layers=4)


def test_memory_command_line(capsys):
    """The report's command line is the sizing tool's: prompt 128 + 64 new tokens in a 24 GiB budget."""
    from skipray.resources import main

    assert main(["--model", "smollm2-135m", "--length", "192", "--new-tokens", "64", "--gpu-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "~2x" in out and "~3x" in out and "max batch in 24 GiB" in out and "prompt 128 + 64 new tokens" in out


def test_resources_cli_reports_cache_per_row_and_batch_under_skip_schedules(capsys):
    """`python -m skipray.resources --gpu-gib G` adds the per-layer-cache tables: the skipping schedules
    fit more rows than full depth in the same budget, and full depth matches the flat sizing's batch."""
    import re

    from skipray.resources import main

    assert main(["--model", "smollm2-135m", "--length", "640", "--gpu-gib", "24", "--new-tokens", "512"]) == 0
    out = capsys.readouterr().out
    flat = int(re.search(r"max batch len 640: (\d+)", out).group(1))
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| (full|~2x|~3x):.*\| (\d+) \|$", out, re.M)}
    assert set(rows) == {"full", "~2x", "~3x"}, out
    assert rows["~3x"] > rows["~2x"] > rows["full"]
    assert abs(rows["full"] - flat) <= flat * 0.01  # same model, same budget: only the bookkeeping bytes differ


def test_cache_growth_releases_the_old_cache_before_allocating_and_survives_a_failure():
    import gc
    import weakref

    import pytest
    from conftest import tiny_llama

    from skipray.core.engine import Engine
    from skipray.core.model import SkipModel

    model = SkipModel(tiny_llama())
    eng = Engine(model, max_batch=2, max_len=16)
    runner, seen = eng.runner, []
    old = weakref.ref(runner.cache)
    real = model.new_cache

    def new_cache(*a, **k):
        gc.collect()
        seen.append(old() is None)  # nothing holds the old cache while the new one is allocated
        return real(*a, **k)

    model.new_cache = new_cache
    runner.ensure_cache(4, [32] * model.num_layers)
    assert seen == [True] and runner.cache.max_batch == 4 and runner.cache.max_len == 32

    def fail_big(*a, **k):
        if a[0] > 4:
            raise MemoryError("no room")
        return real(*a, **k)

    model.new_cache = fail_big
    with pytest.raises(MemoryError):
        runner.ensure_cache(8, [64] * model.num_layers)
    assert runner.cache.max_batch == 4 and runner.cache.max_len == 32  # still serving at the old size


def test_gpu_sizing_fits_rows_to_the_measured_memory(monkeypatch):
    """The engine's GPU sizing (``skipray.core.profile``) is ``cache_rows_for_memory`` over a cache row's bytes,
    the rule ``python -m skipray.resources`` uses; run here with a measured figure given, on a CPU model."""
    import pytest
    from conftest import tiny_llama

    from skipray import resources
    from skipray.core import profile
    from skipray.core.config import EngineConfig
    from skipray.core.memory import cache_bytes_per_row, cache_rows_for_memory
    from skipray.core.model import SkipModel

    model = SkipModel(tiny_llama())
    cfg = EngineConfig(max_num_seqs=8, max_model_len=64, gpu_memory_utilization=0.5)
    per_row = cache_bytes_per_row([64] * model.num_layers, model.kv_heads, model.head_dim, 4)
    mem = profile.DeviceMemory(peak=1000, total=2 * (1000 + 3 * per_row) + 1)  # 3 rows fit half of it
    assert profile.cache_rows(model, cfg, None, mem) == 3 == cache_rows_for_memory(mem.total, 1000, per_row, 0.5)
    monkeypatch.setattr(profile, "measure", lambda m, c: mem)
    assert profile.fit_to_gpu(model, cfg, None).max_num_seqs == 3  # lowered to what fits
    assert profile.fit_to_gpu(model, cfg.replace(max_num_seqs=2), None).max_num_seqs == 2  # already fits
    monkeypatch.setattr(profile, "measure", lambda m, c: profile.DeviceMemory(10**9, 10**9))
    with pytest.raises(ValueError, match="not one cache row"):
        profile.fit_to_gpu(model, cfg, None)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)
    shape = resources.KNOWN_SHAPES["llama3-8b"]  # the sizing tool: the same rule, the weights as the used figure
    gib = 1024**3
    assert resources.max_batch(shape, 2048, 80 * gib) == cache_rows_for_memory(
        80 * gib, resources.weights_bytes(shape), resources.kv_cache_bytes(shape, 1, 2048), 0.8
    )
