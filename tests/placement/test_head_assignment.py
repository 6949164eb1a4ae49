"""KV heads onto TP ranks (FairKV): hand-computed plans, exact request splits, rank work = simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeload import placement
from moeload.errors import InputError
from moeload.placement import Placement
from moeload.placement.heads import rank_work, split_requests

# (name, policy, extra slots per rank, options): the strategies of `head_placement_table`
STRATEGIES = [
    ("standard", "contiguous", 0, {}),
    ("best_effort", "fair_copying", 0, {}),
    ("fair_copying", "fair_copying", 1, {}),
    ("balanced", "balanced", 1, {}),
    ("exact", "exact", 1, {"time_limit": 10.0}),
]


def head_plan(lengths: np.ndarray, tp: int, policy: str, extra: int, opts: dict) -> Placement:
    lengths = np.atleast_2d(lengths)
    return placement.plan(lengths, tp, lengths.shape[1] + extra * tp, policy, **opts)


def test_standard_tp_holds_contiguous_heads():
    pl = head_plan(np.array([4, 3, 2, 1]), 2, "contiguous", 0, {})
    np.testing.assert_array_equal(pl.phy2log, [[0, 1, 2, 3]])
    np.testing.assert_array_equal(pl.gpu_load, [[7, 3]])
    pl = head_plan(np.array([8, 1, 1, 1, 1, 1, 1, 2]), 4, "contiguous", 0, {})
    np.testing.assert_array_equal(pl.gpu_load, [[9, 2, 2, 3]])


def test_best_effort_is_lpt_with_equal_head_counts():
    # heaviest first onto the lightest rank with room (2 heads per rank): 4 -> r0, 3 -> r1, 2 -> r1, 1 -> r0
    pl = head_plan(np.array([4, 3, 2, 1]), 2, "fair_copying", 0, {})
    np.testing.assert_array_equal(pl.phy2log, [[0, 3, 1, 2]])
    np.testing.assert_array_equal(pl.gpu_load, [[5, 5]])
    np.testing.assert_array_equal(pl.share, np.ones((1, 4)))


LENGTHS = np.array([6, 1, 1, 0])  # one hot head: no assignment without copies gets below 6


@pytest.mark.parametrize(("name", "policy", "extra", "opts", "expected"), [
    (*STRATEGIES[0], [7, 1]),
    (*STRATEGIES[1], [6, 2]),
    (*STRATEGIES[2], [4, 4]),
    (*STRATEGIES[3], [4, 4]),
    (*STRATEGIES[4], [4, 4]),
])
def test_rank_loads_of_each_strategy(name, policy, extra, opts, expected):
    pl = head_plan(LENGTHS, 2, policy, extra, opts)
    np.testing.assert_allclose(pl.gpu_load, [expected], atol=1e-6)
    assert np.all(pl.replica_counts >= 1)  # every head placed
    if extra:
        assert pl.replica_counts[0, 0] >= 2  # the hot head is copied onto the other rank
        assert len(set(pl.slot_gpu[pl.phy2log[0] == 0])) == 2


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s[0] for s in STRATEGIES])
def test_replicas_split_requests_exactly_and_rank_work_is_the_simulators(strategy):
    _, policy, extra, opts = strategy
    pl = head_plan(LENGTHS, 2, policy, extra, opts)
    per_slot = split_requests(pl, 12)  # 12 requests per head: every share here is a multiple of 1/12
    np.testing.assert_array_equal(np.bincount(pl.phy2log[0], per_slot[0], minlength=4), [12, 12, 12, 12])
    np.testing.assert_allclose(rank_work(pl, LENGTHS[None], per_slot), pl.evaluate(LENGTHS * 12).gpu_load,
                               atol=1e-6)


def test_fair_copying_splits_the_hot_heads_requests():
    # hot head 6 of total 8: rank 0 keeps 4 / 6 of its requests, rank 1 (with the two light heads) 2 / 6
    pl = head_plan(LENGTHS, 2, "fair_copying", 1, {})
    per_slot = split_requests(pl, 12)[0]
    hot = pl.phy2log[0] == 0
    per_rank = np.bincount(pl.slot_gpu[hot], per_slot[hot], minlength=2)
    np.testing.assert_array_equal(per_rank, [8, 4])
    np.testing.assert_array_equal(rank_work(pl, LENGTHS[None], per_slot[None]), [[48, 48]])


def test_split_requests_by_largest_remainder():
    pl = Placement(np.array([[0, 1, 0, 2]]), np.array([[0.25, 1.0, 0.75, 1.0]]), 2, np.ones((1, 3)))
    # head 0: 2.5 and 7.5 -> 2 and 7, the one left goes to the lower slot on the tie
    np.testing.assert_array_equal(split_requests(pl, 10), [[3, 10, 7, 10]])
    np.testing.assert_array_equal(split_requests(pl, np.array([4, 0, 5])), [[1, 0, 3, 5]])
    np.testing.assert_array_equal(split_requests(pl, np.array([[1, 1, 1]])), [[0, 1, 1, 1]])
    thirds = Placement(np.array([[0, 0, 0, 1]]), np.array([[1 / 3, 1 / 3, 1 / 3, 1.0]]), 2, np.ones((1, 2)))
    np.testing.assert_array_equal(split_requests(thirds, 3), [[1, 1, 1, 3]])  # no float noise decides
    np.testing.assert_array_equal(split_requests(thirds, 5), [[2, 2, 1, 5]])
    with pytest.raises(InputError, match="non-negative integers"):
        split_requests(pl, -1)
    with pytest.raises(InputError, match="non-negative integers"):
        split_requests(pl, 2.5)
    with pytest.raises(InputError, match="lengths: expected shape"):
        rank_work(pl, np.ones(3), split_requests(pl, 1))


def test_request_ids_partition_each_heads_batch():
    """Handing each copy a contiguous range of ids in slot order serves every request exactly once."""
    pl = head_plan(np.array([[50, 3, 9, 1, 30, 2, 2, 7]]), 4, "fair_copying", 1, {})
    per_slot = split_requests(pl, 37)[0]
    for head in range(8):
        slots = np.flatnonzero(pl.phy2log[0] == head)
        stops = np.cumsum(per_slot[slots])
        ids = np.concatenate([np.arange(a, b) for a, b in zip(stops - per_slot[slots], stops)])
        np.testing.assert_array_equal(np.sort(ids), np.arange(37))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1), tp=st.sampled_from([2, 4, 8]), requests=st.integers(0, 97),
    strategy=st.sampled_from(STRATEGIES[:4]), skew=st.floats(0.0, 2.0),
)
def test_split_is_exact_and_work_close_to_simulator(seed, tp, requests, strategy, skew):
    _, policy, extra, opts = strategy
    rng = np.random.default_rng(seed)
    lengths = np.maximum(np.rint(rng.lognormal(0, skew, size=(2, 8)) * 100), 1)
    pl = head_plan(lengths, tp, policy, extra, opts)
    per_slot = split_requests(pl, requests)
    assert per_slot.min() >= 0
    for layer in range(2):
        np.testing.assert_array_equal(np.bincount(pl.phy2log[layer], per_slot[layer], minlength=8),
                                      np.full(8, requests))
    work = rank_work(pl, lengths, per_slot)
    np.testing.assert_allclose(work.sum(1), lengths.sum(1) * requests)  # no work lost or added
    # rounding whole requests moves less than one request's KV per slot of a rank
    slack = (np.take_along_axis(lengths, pl.phy2log, 1)).reshape(2, tp, -1).sum(-1)
    assert np.all(np.abs(work - pl.evaluate(lengths * requests).gpu_load) < slack + 1e-6)
