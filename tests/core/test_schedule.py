"""The skip schedule: monotone, bounded, warm-up kept, nested active sets, clear errors."""

import pytest

from skipray.core.schedule import CostModel, SkipSchedule, theoretical_speedup

SCHEDULES = [
    SkipSchedule(30, 22, 8, 64),
    SkipSchedule(30, 16, 6, 64, warmup_layers=4),
    SkipSchedule(30, 20, 5, 40, warmup_layers=2, shape="power", power=0.5),
    SkipSchedule(12, 12, 3, 7),
    SkipSchedule.full(30),
]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.describe())
def test_monotone_nested_bounded(s):
    prev = None
    for step in range(s.decay_tokens + 20):
        n = s.num_active(step)
        act = s.active_layers(step)
        assert s.min_layers <= n <= s.max_layers
        assert len(act) == n and list(act) == sorted(set(act))
        assert set(range(s.warmup_layers)) <= set(act)  # warm-up always runs
        assert act[-1] == s.num_layers - 1  # the top layer always runs
        if prev is not None:
            assert set(act) <= set(prev)  # later steps only skip more
        prev = act
    assert s.num_active(0) == s.max_layers
    assert s.num_active(s.decay_tokens + 5) == s.min_layers


def test_skipped_block_is_contiguous_above_warmup():
    s = SkipSchedule(30, 16, 6, 64, warmup_layers=4)
    act = s.active_layers(10)
    top = [l for l in act if l >= 4]
    assert top == list(range(30 - len(top), 30))


def test_steps_running_matches_active_layers():
    s = SkipSchedule(30, 20, 6, 50, warmup_layers=2)
    for layer in range(30):
        count = s.steps_running(layer, 80)
        runs = [layer in s.active_layers(i) for i in range(80)]
        assert runs == [True] * count + [False] * (80 - count)


def test_average_layers_and_speedup():
    s = SkipSchedule(30, 22, 8, 64)
    per = s.layers_per_token(64)
    assert per[0] == 30 and len(per) == 64
    assert s.average_layers(64) == pytest.approx(sum(per) / 64)
    cost = CostModel(layer_params=3_538_944, attn_dim=576, head_params=28_311_552)
    sp = theoretical_speedup(s, cost, prompt_len=32, new_tokens=64)
    layer_ratio = 30 / (sum(per[1:]) / 63)
    assert 1.0 < sp < layer_ratio  # the lm_head does not shrink, so FLOPs gain less than layers
    assert theoretical_speedup(SkipSchedule.full(30), cost, 32, 64) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=30, max_layers=31, min_layers=8, decay_tokens=64), "max_layers"),
        (dict(num_layers=30, max_layers=8, min_layers=10, decay_tokens=64), "min_layers <= max_layers"),
        (dict(num_layers=30, max_layers=20, min_layers=4, decay_tokens=64, warmup_layers=4), "no top layer"),
        (dict(num_layers=30, max_layers=20, min_layers=8, decay_tokens=-1), "decay_tokens"),
        (dict(num_layers=30, max_layers=20, min_layers=8, decay_tokens=5, shape="cubic"), "shape"),
        (dict(num_layers=0, max_layers=0, min_layers=0, decay_tokens=5), "num_layers"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SkipSchedule(**kwargs)


def test_roundtrip_dict():
    s = SkipSchedule(30, 16, 6, 64, warmup_layers=4, shape="power", power=1.5)
    assert SkipSchedule.from_dict(s.to_dict()) == s


CALIBRATED = [1, 27, 12, 14, 13, 16, 15, 17, 11, 10, 18, 9, 8, 7, 6, 5, 4, 3, 2, 19, 20, 21, 22, 23, 25, 26, 28, 24]


def test_drop_order_nested_and_follows_order():
    s = SkipSchedule(30, 20, 6, 40, drop_order=CALIBRATED)
    prev = set(range(30))
    for step in range(60):
        act = set(s.active_layers(step))
        assert len(act) == s.num_active(step)
        assert act <= prev  # nested: the KV cache never needs recomputing
        assert act == set(range(30)) - set(CALIBRATED[: 30 - s.num_active(step)])
        prev = act
    assert {0, 29} <= prev  # layers the order never names always run


def test_drop_order_steps_running_matches_active_layers():
    s = SkipSchedule(30, 24, 8, 30, drop_order=CALIBRATED)
    for layer in range(30):
        count = s.steps_running(layer, 50)
        assert [layer in s.active_layers(i) for i in range(50)] == [True] * count + [False] * (50 - count)


def test_default_drop_order_is_skipdecode():
    s = SkipSchedule(30, 16, 6, 64, warmup_layers=4)
    assert s.order == tuple(range(4, 30))
    assert s.with_drop_order(s.order).active_layers(20) == s.active_layers(20)


def test_drop_order_roundtrip_and_unknown_keys_refused():
    s = SkipSchedule(30, 16, 6, 64, drop_order=CALIBRATED)
    d = s.to_dict()
    assert d["drop_order"] == CALIBRATED
    assert SkipSchedule.from_dict(d) == s
    with pytest.raises(ValueError, match="unknown schedule keys"):
        SkipSchedule.from_dict({**d, "drop_ordr": [1]})


@pytest.mark.parametrize("order, match", [([1, 1, 2], "distinct"), ([30], r"\[0, 30\)"), ([1, 2, 3], "drops 24")])
def test_bad_drop_order(order, match):
    with pytest.raises(ValueError, match=match):
        SkipSchedule(30, 16, 6, 64, drop_order=order)


def test_resolve_schedule_is_the_one_rule_for_skip_flags():
    from skipray.core.schedule import UNTRAINED_WARNING, resolve_schedule

    trained = SkipSchedule(12, 12, 5, 8, shape="power", power=1.5, drop_order=tuple(range(11, -1, -1)))
    # no flags: the trained schedule; an untrained model runs at full depth, without a warning
    assert resolve_schedule({}, 12, trained) == (trained, None)
    assert resolve_schedule(None, 12, None) == (SkipSchedule.full(12), None)
    # full wins over every other flag
    assert resolve_schedule({"full": True, "min_layers": 3}, 12, trained).schedule.is_full
    # flags override the trained schedule and keep what they do not name (its drop order)
    s, w = resolve_schedule({"min_layers": 7, "decay_tokens": None}, 12, trained)
    assert (s.min_layers, s.decay_tokens, s.drop_order, s.power, w) == (7, 8, trained.drop_order, 1.5, None)
    # a file's schedule (start) is overridden instead of the trained one
    start = SkipSchedule(12, 10, 6, 4)
    assert resolve_schedule({"decay_tokens": 2}, 12, trained, start).schedule == SkipSchedule(12, 10, 6, 2)
    # max_layers alone lowers min_layers to it; an untrained model asked to skip gets the warning
    s, w = resolve_schedule({"max_layers": 6}, 12, None)
    assert (s.max_layers, s.min_layers, s.decay_tokens, w) == (6, 6, 64, UNTRAINED_WARNING)
    with pytest.raises(ValueError, match="unknown skip flags"):
        resolve_schedule({"min_layer": 3}, 12, trained)
    with pytest.raises(ValueError, match="invalid skip flags"):
        resolve_schedule({"max_layers": "six"}, 12, trained)
    with pytest.raises(ValueError, match="min_layers"):
        resolve_schedule({"min_layers": 13}, 12, trained)


def test_flop_speedup_of_an_answer_equals_the_schedules_theoretical_speedup():
    from skipray.core.schedule import flop_speedup

    s = SkipSchedule(12, 12, 4, 6, shape="power", power=0.7)
    cost = CostModel(layer_params=1000, attn_dim=16, head_params=3000)
    for n in (1, 2, 9, 40):
        got = flop_speedup(s.layers_per_token(n), cost, 7, 12)
        assert got == pytest.approx(theoretical_speedup(s, cost, 7, n))
    assert flop_speedup([12] * 5, cost, 7, 12) == pytest.approx(1.0)
