"""moeload.act.permute: layouts of expert->rank maps, the slot moves between two, and map validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeload.act.permute import check_expert_to_rank, contiguous_expert_to_rank, phy2log, plan_moves
from moeload.errors import InputError


def test_contiguous_map_is_the_identity_layout():
    e2r = contiguous_expert_to_rank(8, 4)
    assert e2r.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert phy2log(e2r).tolist() == list(range(8))
    assert plan_moves(e2r, e2r, 4).is_identity


def test_moves_for_a_swap_across_ranks():
    m = plan_moves([0, 0, 1, 1], [1, 0, 1, 0], 2)
    # rank 0 now holds experts 1, 3 (slots 0, 1); rank 1 holds 0, 2 (slots 2, 3)
    assert m.new_phy2log.tolist() == [1, 3, 0, 2]
    assert m.src_slot.tolist() == [1, 3, 0, 2]  # also the gate's row permutation
    # cross-rank: expert 3 (rank 1 local 1) -> rank 0 local 1; expert 0 (rank 0 local 0) -> rank 1 local 0
    assert sorted(map(tuple, m.transfers.tolist())) == [(0, 0, 1, 0, 0), (1, 1, 0, 1, 3)]
    # within a rank: expert 1 slot 1 -> slot 0 on rank 0; expert 2 slot 2 -> slot 3 on rank 1
    assert sorted(map(tuple, m.local.tolist())) == [(0, 1, 0, 0, 1), (1, 0, 1, 1, 2)]
    assert not m.is_identity


def test_moves_compose_from_a_non_contiguous_layout():
    old, new = [1, 0, 1, 0], [0, 1, 1, 0]
    m = plan_moves(old, new, 2)
    # slot p of the new layout receives the content of the old slot holding logical new_phy2log[p]
    np.testing.assert_array_equal(m.old_phy2log[m.src_slot], m.new_phy2log)
    assert m.transfers.shape[0] == 2  # experts 0 and 1 change rank


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.randoms(use_true_random=False))
def test_moves_are_a_permutation_that_realizes_the_new_map(ep_size, per_rank, rnd):
    E = ep_size * per_rank
    old, new = (np.array(rnd.sample([r for r in range(ep_size) for _ in range(per_rank)], E)) for _ in range(2))
    m = plan_moves(old, new, ep_size)
    assert sorted(m.src_slot.tolist()) == list(range(E))
    np.testing.assert_array_equal(m.old_phy2log[m.src_slot], m.new_phy2log)
    np.testing.assert_array_equal(new[m.new_phy2log], np.arange(E) // per_rank)  # slot p lives on rank p // L
    moving = m.transfers[:, 4] if m.transfers.size else np.array([], dtype=int)
    assert sorted(moving.tolist()) == np.flatnonzero(old != new).tolist()
    for src_r, src_l, dst_r, dst_l, e in np.concatenate([m.transfers, m.local]).reshape(-1, 5).tolist():
        assert m.old_phy2log[src_r * per_rank + src_l] == e and m.new_phy2log[dst_r * per_rank + dst_l] == e


@pytest.mark.parametrize(("bad", "says"), [
    ([0, 1, 1], "expected 4 entries (one rank per expert), got shape [3]"),
    ([[0, 0], [1, 1]], "got shape [2, 2]"),
    ([0, 0, 0, 1], "each of the 2 ranks must hold 2 experts, got [3, 1]"),
    ([0, 1, 2, 1], "expert 2 maps to rank 2, outside [0, 2)"),
    ([0, -1, 1, 1], "expert 1 maps to rank -1"),
    ([0, 0.5, 1, 1], "entries must be integer ranks"),
    ([0, float("nan"), 1, 1], "entries must be integer ranks"),
    ([True, False, True, False], "dtype bool"),
    (["a", "b", "c", "d"], "dtype <U1"),
    ("0011", "got a string"),
    (None, "got shape []"),
])
def test_invalid_maps_raise_one_line_input_errors(bad, says):
    with pytest.raises(InputError) as e:
        check_expert_to_rank(bad, 4, 2)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("new_expert_to_rank: ")
    with pytest.raises(InputError):
        plan_moves([0, 0, 1, 1], bad, 2)


def test_integral_floats_and_numpy_ints_are_accepted():
    assert check_expert_to_rank([1.0, 0.0, 1.0, 0.0], 4, 2).tolist() == [1, 0, 1, 0]
    assert check_expert_to_rank(np.array([1, 0, 1, 0], dtype=np.int8), 4, 2).dtype == np.int64


def test_experts_not_divisible_by_ranks_is_refused():
    with pytest.raises(InputError, match="each of the 2 ranks must hold"):
        check_expert_to_rank([0, 0, 1], 3, 2)
