"""skipray.core.scheduler on its own (plain Python, no model): admission order and budgets, the offline class,
row moves that keep every request in its row, one contiguous row range per layer, aborts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skipray.core.config import EngineConfig
from skipray.core.requests import QueueFull, SamplingParams
from skipray.core.schedule import SkipSchedule
from skipray.core.scheduler import Request, RowMoves, Scheduler

A = SkipSchedule(8, max_layers=8, min_layers=3, decay_tokens=6, warmup_layers=1)
B = SkipSchedule(8, max_layers=7, min_layers=2, decay_tokens=4, warmup_layers=1, drop_order=[5, 2, 6, 3, 4, 1])


def req(rid: str, n: int = 3, schedule: SkipSchedule = A, offline: bool = False) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=20), schedule, offline=offline)


class Rows:
    """A stand-in cache: which request each row holds; applies the scheduler's moves as the cache does."""

    def __init__(self, s: Scheduler) -> None:
        self.s, self.rows = s, {}

    def apply(self, row_moves: RowMoves) -> None:
        old = dict(self.rows)
        for m in row_moves.moves:
            self.rows[m.dst] = old[m.src]

    def check(self) -> None:
        for i, r in enumerate(self.s.live + self.s.prefilling):
            assert self.rows[i] == r.request_id, (i, r.request_id)


def test_admission_budget_and_batch_bound():
    s = Scheduler(EngineConfig(max_num_seqs=3, max_prefill_tokens=20))
    for k, n in enumerate([4, 6, 30, 5]):
        s.add(req(f"r{k}", n))
    assert [r.request_id for r in s.take_admissions()] == ["r0", "r1"]  # 3 x 30 padded would not fit
    assert [r.request_id for r in s.take_admissions()] == ["r2"]  # alone: a long prompt is never starved
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        EngineConfig(max_num_seqs=4, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=4, max_num_batched_tokens=3)


def test_queue_bound_and_offline_class():
    s = Scheduler(EngineConfig(max_num_seqs=4, max_waiting=1, max_offline_rows=2))
    for k in range(3):
        s.add(req(f"off{k}", offline=True))  # unbounded
    s.add(req("on0"))
    with pytest.raises(QueueFull):
        s.add(req("on1"))
    s.add(req("static", 3), bounded=False)  # a generate() call's own requests
    first = s.take_admissions()
    # online first, then offline up to max_offline_rows; the rest wait
    assert [r.request_id for r in first] == ["on0", "static", "off0", "off1"]
    assert len(s.offline_waiting) == 1


def test_online_requests_are_admitted_by_priority_then_arrival():
    s = Scheduler(EngineConfig(max_num_seqs=2))
    for rid, prio in [("a", 0), ("b", 1), ("c", -1), ("d", 0), ("e", -1)]:
        r = req(rid)
        r.priority = prio
        s.add(r)
    assert [r.request_id for r in s.take_admissions()] == ["c", "e"]  # lower first, then first come
    assert [r.request_id for r in s.waiting] == ["a", "d", "b"]


def test_rows_follow_their_requests_and_layers_run_on_one_range():
    s = Scheduler(EngineConfig(max_num_seqs=6))
    rows = Rows(s)
    arrivals = [[req("a0"), req("b0", schedule=B)], [req("a1"), req("b1", schedule=B)], [req("a2")]]
    for group in arrivals:
        for r in group:
            s.add(r)
        admit = s.take_admissions()
        rows.apply(s.arrange(s.live + admit))
        for r in admit:  # a newcomer's row is whatever the scheduler gave it
            rows.rows[s.row(r)] = r.request_id
        rows.check()
        for r in s.live:  # one decode step each
            r.generated.append(5)
        plan, layers = s.layer_rows()
        assert len(plan) == 8 and len(layers) == len(s.live)
        for on in plan:  # two schedules live: every layer's rows are one contiguous range
            if on:
                assert on == list(range(on[0], on[0] + len(on)))
        for i, r in enumerate(s.live):
            assert layers[i] == r.schedule.num_active(r.step)
    rows.apply(s.retire([s.live[0], s.live[3]]))
    rows.check()
    assert len(s.live) == 3


def test_aborts_drop_waiting_and_running_requests():
    s = Scheduler(EngineConfig(max_num_seqs=2))
    for k in range(3):
        s.add(req(f"r{k}"))
    s.arrange(s.take_admissions())
    s.abort("r0")
    s.abort("r2")
    waiting, running = s.take_aborts()
    assert [r.request_id for r in waiting] == ["r2"] and [r.request_id for r in running] == ["r0"]
    assert not s.waiting and s.has_work()
    s.retire(running)
    assert [r.request_id for r in s.live] == ["r1"]


def test_the_scheduler_needs_no_torch():
    code = "import sys; sys.modules['torch'] = None; import skipray.core.scheduler, skipray.core.requests"
    subprocess.run([sys.executable, "-c", code], check=True)
