"""The FairKV decode cost model: known answers, the fit, and where copies stop paying."""

from __future__ import annotations

import numpy as np
import pytest

from moeload.errors import InputError
from moeload.placement import plan
from moeload.placement.heads import DecodeCost, head_decode_table, rank_slots, rank_work, split_requests


def test_rank_seconds_known_answer():
    cost = DecodeCost(fixed_s=1e-5, per_slot_s=2e-5, bandwidth=1e12, head_dim=64, dtype_bytes=2)
    assert cost.bytes_per_key == 256
    t = cost.rank_seconds(np.array([[1000, 0]]), np.array([[2, 0]]))
    assert t[0, 0] == pytest.approx(1e-5 + 4e-5 + 1000 * 256 / 1e12)
    assert t[0, 1] == 0.0  # an idle rank costs nothing


def test_step_seconds_counts_copies_that_serve_requests():
    budgets = np.array([[400.0, 100.0, 100.0, 100.0]])
    pl = plan(budgets * 8, num_gpus=2, num_replicas=6, policy="fair_copying")
    per_slot = split_requests(pl, 8)
    slots = rank_slots(pl, per_slot)
    assert slots.sum() == (per_slot > 0).sum()  # one call per busy copy
    cost = DecodeCost(fixed_s=0.0, per_slot_s=1e-3, bandwidth=1e30)
    assert cost.step_seconds(pl, budgets, per_slot) == pytest.approx(1e-3 * slots.max())
    work = rank_work(pl, budgets, per_slot)
    assert work.sum() == (budgets * 8).sum()  # every request's KV read exactly once


def test_fit_recovers_constants():
    rng = np.random.default_rng(0)
    truth = DecodeCost(fixed_s=9e-6, per_slot_s=12e-6, bandwidth=4e12)
    work = rng.integers(10_000, 5_000_000, size=400)
    slots = rng.integers(1, 5, size=400)
    secs = truth.rank_seconds(work, slots) * (1 + rng.normal(0, 1e-3, size=400))
    got = DecodeCost.fit(work, slots, secs)
    assert got.fixed_s == pytest.approx(truth.fixed_s, rel=0.1)
    assert got.per_slot_s == pytest.approx(truth.per_slot_s, rel=0.05)
    assert got.bandwidth == pytest.approx(truth.bandwidth, rel=0.01)
    with pytest.raises(InputError, match="does not grow with work"):
        DecodeCost.fit(work, slots, np.full(400, 1e-5) + 0 * work)


def test_proportional_cost_equals_the_simulator():
    rng = np.random.default_rng(1)
    budgets = rng.lognormal(0, 1.0, size=(3, 8)) * 1000
    t = head_decode_table(budgets, 64, (2, 4), cost=DecodeCost(fixed_s=0.0, per_slot_s=0.0), exact_time_limit=None)
    # whole-request rounding is the only difference from the simulator's fractional split
    assert np.allclose(t.speedup, t.sim_speedup, rtol=0.02)
    fastest = t.groupby("tp").step_ms.transform("min")
    assert (t.best == (t.step_ms == fastest)).all() and t.groupby("tp").best.any().all()


def test_copies_stop_paying_when_calls_dominate():
    rng = np.random.default_rng(2)
    budgets = rng.lognormal(0, 1.0, size=(2, 8)) * 64  # little KV per head
    t = head_decode_table(budgets, 4, (2,), cost=DecodeCost(per_slot_s=50e-6), exact_time_limit=None).set_index("strategy")
    assert t.loc["fair_copying", "sim_speedup"] > 1.0  # the simulator sees a gain
    assert t.loc["fair_copying", "speedup"] < 1.0  # the extra call costs more than the imbalance
    assert not t.loc["fair_copying", "best"]


def test_bad_input_refused():
    with pytest.raises(InputError, match="bandwidth"):
        DecodeCost(bandwidth=0)
    with pytest.raises(InputError, match="requests"):
        head_decode_table(np.ones((1, 4)), 0, (2,))
    with pytest.raises(InputError, match="budgets"):
        head_decode_table(-np.ones((1, 4)), 4, (2,))
