"""Placement policies: published EPLB example, invariants, brute-force optimality, input errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeload import placement
from moeload.errors import InputError
from moeload.placement._split import optimal_split, water_fill
from tests.placement._brute import brute_chosen, brute_even

EXAMPLE = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_available_lists_every_policy():
    assert placement.available() == ["balanced", "contiguous", "eplb", "exact", "fair_copying"]


def test_eplb_reproduces_published_hierarchical_example():
    pl = placement.plan(EXAMPLE, num_gpus=8, num_replicas=16, policy="eplb", num_groups=4, num_nodes=2)
    np.testing.assert_array_equal(pl.phy2log, [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])
    np.testing.assert_allclose(pl.imbalance.round(3), [1.208, 1.242])
    np.testing.assert_array_equal(pl.replica_counts[0], [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1])


def test_eplb_global_example_and_own_policy_at_or_below_it():
    eplb = placement.plan(EXAMPLE, 8, 16, "eplb")
    np.testing.assert_allclose(eplb.imbalance.round(3), [1.073, 1.190])
    mine = placement.plan(EXAMPLE, 8, 16, "balanced")
    assert np.all(mine.imbalance <= eplb.imbalance + 1e-9)
    assert mine.imbalance[0] < 1.04 and mine.imbalance[1] < 1.1
    even = placement.plan(EXAMPLE, 8, 16, "balanced", split="even")  # replica-count search
    assert even.imbalance[0] < 1.06 and even.imbalance[1] <= eplb.imbalance[1] + 1e-9


def test_hierarchical_falls_back_to_global_when_nodes_do_not_divide_groups():
    a = placement.plan(EXAMPLE, 8, 16, "eplb", num_groups=3, num_nodes=2)
    b = placement.plan(EXAMPLE, 8, 16, "eplb")
    np.testing.assert_array_equal(a.phy2log, b.phy2log)


def _check_invariants(pl: placement.Placement, w: np.ndarray, num_replicas: int) -> None:
    num_layers, num_experts = w.shape
    assert pl.phy2log.shape == (num_layers, num_replicas)
    assert np.all(pl.replica_counts >= 1)
    assert np.all(pl.replica_counts.sum(1) == num_replicas)
    assert pl.log2phy.shape[:2] == (num_layers, num_experts)
    for layer in range(num_layers):
        for e in range(num_experts):
            slots = pl.log2phy[layer, e][pl.log2phy[layer, e] >= 0]
            assert slots.size == pl.replica_counts[layer, e]
            assert np.all(pl.phy2log[layer, slots] == e)
        unit_share = np.bincount(pl.phy2log[layer], weights=pl.share[layer], minlength=num_experts)
        np.testing.assert_allclose(unit_share, 1.0, atol=1e-6)
    assert np.all(pl.share >= 0)
    np.testing.assert_allclose(pl.gpu_load.sum(1), w.sum(1), rtol=1e-6)
    busy = pl.gpu_load.mean(1) > 0
    np.testing.assert_allclose(pl.imbalance[busy], pl.gpu_load.max(1)[busy] / pl.gpu_load.mean(1)[busy], rtol=1e-9)
    assert np.all(pl.imbalance[~busy] == 1.0)


@st.composite
def instances(draw, max_experts=4, max_gpus=3, max_slots=3):
    num_gpus = draw(st.integers(1, max_gpus))
    slots = draw(st.integers(1, max_slots))
    num_experts = draw(st.integers(1, min(max_experts, num_gpus * slots)))
    w = np.array(draw(st.lists(st.integers(0, 30), min_size=num_experts, max_size=num_experts)), float)
    return w, num_gpus, slots


@settings(max_examples=25, deadline=None)
@given(instances())
def test_policies_never_beat_brute_force_and_exact_matches_it(inst):
    w, num_gpus, slots = inst
    r = num_gpus * slots
    chosen, even = brute_chosen(w, num_gpus, slots), brute_even(w, num_gpus, slots)
    assert chosen <= even + 1e-9
    ex_c = placement.plan(w, num_gpus, r, "exact", split="chosen")
    ex_e = placement.plan(w, num_gpus, r, "exact", split="even")
    assert ex_c.imbalance[0] == pytest.approx(chosen, rel=1e-5, abs=1e-6)
    assert ex_e.imbalance[0] == pytest.approx(even, rel=1e-6)
    for policy, opts, bound in [("eplb", {}, even), ("balanced", {"split": "even"}, even),
                                ("balanced", {}, chosen), ("fair_copying", {}, chosen)]:
        pl = placement.plan(w, num_gpus, r, policy, **opts)
        _check_invariants(pl, w[None], r)
        assert pl.imbalance[0] >= bound - 1e-6, (policy, opts)
    if w.shape[0] % num_gpus == 0:
        pl = placement.plan(w, num_gpus, w.shape[0], "contiguous")
        assert pl.imbalance[0] >= brute_even(w, num_gpus, w.shape[0] // num_gpus) - 1e-9


@pytest.mark.parametrize("policy", ["eplb", "fair_copying", "balanced", "exact"])
def test_invariants_on_multi_layer_input(policy):
    rng = np.random.default_rng(1)
    w = rng.integers(0, 100, size=(3, 8)).astype(float)
    w[2] = 0.0  # an idle layer is balanced by definition
    pl = placement.plan(w, num_gpus=4, num_replicas=12, policy=policy, **({"time_limit": 5} if policy == "exact" else {}))
    _check_invariants(pl, w, 12)
    assert pl.imbalance[2] == 1.0
    ev = pl.evaluate(rng.integers(0, 100, size=(5, 3, 8)))
    assert ev.gpu_load.shape == (5, 3, 4) and ev.imbalance.shape == (5, 3)


def test_contiguous_puts_expert_e_on_rank_e_over_block():
    w = np.arange(8.0)
    pl = placement.plan(w, num_gpus=4, policy="contiguous")
    np.testing.assert_array_equal(pl.gpu_load[0], [1, 5, 9, 13])
    np.testing.assert_array_equal(pl.log2phy[0, :, 0], np.arange(8))


def test_fair_copying_splits_a_hot_unit_unevenly_to_level_gpus():
    w = np.array([10.0, 1, 1, 1, 1, 2])  # one hot head among six, 3 GPUs, one spare slot each
    best_effort = placement.plan(w, 3, 6, "fair_copying")
    copied = placement.plan(w, 3, 9, "fair_copying")
    assert best_effort.imbalance[0] == pytest.approx(11 / (16 / 3))  # two slots: the hot head plus a 1
    assert copied.imbalance[0] == pytest.approx(1.0)
    for lp_split in (True, False):  # 2 GPUs, 4 slots: only an uneven split of the 9 levels them
        pl = placement.plan(np.array([9.0, 3, 1]), 2, 4, "fair_copying", lp_split=lp_split)
        assert pl.imbalance[0] == pytest.approx(1.0)
        hot = np.sort(pl.share[0][pl.phy2log[0] == 0])
        assert hot.size == 2 and hot[1] - hot[0] > 0.1


def test_water_fill_levels_and_conserves():
    x = water_fill(np.array([5.0, 1.0, 3.0]), 4.0)
    np.testing.assert_allclose(x, [0, 3, 1])
    assert water_fill(np.array([0.0]), 2.5)[0] == 2.5


def test_optimal_split_reaches_fractional_optimum():
    share = optimal_split(np.array([0, 1, 0, 2]), np.array([6.0, 2.0, 4.0]), 2)
    loads = np.array([6 * share[0] + 2, 6 * share[2] + 4])
    np.testing.assert_allclose(loads, [6, 6])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(weight=np.ones(6), num_gpus=4, num_replicas=6), "num_replicas=6 is not a multiple of num_gpus=4"),
    (dict(weight=np.ones(6), num_gpus=2, num_replicas=4), "num_replicas=4 is smaller than the number of experts 6"),
    (dict(weight=np.ones(6), num_gpus=0), "num_gpus: expected a positive integer, got 0"),
    (dict(weight=-np.ones(4), num_gpus=2), "negative"),
    (dict(weight=np.array([1.0, np.nan]), num_gpus=2), "NaN"),
    (dict(weight=np.ones((2, 2, 2)), num_gpus=2), "(2, 2, 2)"),
    (dict(weight=np.ones(4), num_gpus=2, policy="nope"), "unknown 'nope'"),
    (dict(weight=np.ones(4), num_gpus=2, num_replicas=6, policy="contiguous"), "num_replicas=6 must equal"),
    (dict(weight=np.ones(6), num_gpus=2, num_replicas=8, num_groups=4, num_nodes=2), "num_groups=4 does not divide"),
    (dict(weight=np.ones(4), num_gpus=2, frobnicate=1), "unknown option(s) ['frobnicate']"),
    (dict(weight=np.ones(4), num_gpus=2, policy="exact", split="odd"), "'odd'"),
])
def test_invalid_input_raises_input_error_naming_values(kwargs, needle):
    with pytest.raises(InputError) as err:
        placement.plan(**kwargs)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)


def test_evaluate_rejects_mismatched_shape():
    pl = placement.plan(np.ones((2, 4)), num_gpus=2, policy="eplb")
    with pytest.raises(InputError, match=r"\(3, 4\)"):
        pl.evaluate(np.ones((3, 4)))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=8, max_size=8))
def test_hierarchical_eplb_keeps_each_group_on_one_node(loads):
    w = np.array(loads, float)
    pl = placement.plan(w, num_gpus=4, num_replicas=12, policy="eplb", num_groups=4, num_nodes=2)
    _check_invariants(pl, w[None], 12)
    node_of_slot = np.arange(12) // 6
    for group in range(4):
        nodes = np.unique(node_of_slot[np.isin(pl.phy2log[0], [2 * group, 2 * group + 1])])
        assert nodes.size == 1
    group_load = w.reshape(4, 2).sum(1)
    node_load = pl.gpu_load[0].reshape(2, 2).sum(1)
    np.testing.assert_allclose(sorted(node_load), sorted([group_load[list(p)].sum() for p in _pairs_of(pl)]))


def _pairs_of(pl):
    """The two groups on each node, read off the plan."""
    node_of_slot = np.arange(12) // 6
    return [sorted({int(u) // 2 for u in pl.phy2log[0][node_of_slot == n]}) for n in range(2)]


def test_placement_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, moeload.placement; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_balanced_with_samples_is_no_worse_per_step_than_eplb_on_them():
    rng = np.random.default_rng(3)
    mean = rng.dirichlet(np.ones(8), size=2) * 1000
    samples = rng.poisson(mean[None] * rng.uniform(0.5, 1.5, size=(40, 2, 8)))
    w = samples.mean(0)
    picked = placement.plan(w, 4, 12, "balanced", samples=samples)
    for other in (placement.plan(w, 4, 12, "eplb"), placement.plan(w, 4, 12, "balanced")):
        assert np.all(picked.evaluate(samples).imbalance.mean(0) <= other.evaluate(samples).imbalance.mean(0) + 1e-12)
    _check_invariants(picked, w, 12)
    with pytest.raises(InputError, match=r"samples: expected shape \[T, 2, 8\]"):
        placement.plan(w, 4, 12, "balanced", samples=samples[:, 0])
