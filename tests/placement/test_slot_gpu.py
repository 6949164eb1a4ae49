"""Slot -> GPU has one formula (`placement._placement.slot_gpu`); every path that sums slots per
GPU (Placement.evaluate, the LP split, split_loads, the balanced policy's searches) agrees with it,
also where the experts do not divide evenly over the GPUs."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import placement
from moeload.placement._placement import Placement, gpu_loads, slot_gpu
from moeload.placement._split import optimal_split, split_loads
from moeload.trace.layout import contiguous_expert_to_rank

# (experts, GPUs, slots): experts uneven over GPUs, slots a multiple of the GPUs
SIZES = [(10, 4, 12), (7, 3, 9), (5, 2, 6), (13, 4, 16), (12, 8, 16)]


def _by_bincount(per_slot: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, R] -> [L, G] summed with the slot -> GPU map itself."""
    gpu = slot_gpu(per_slot.shape[-1], num_gpus)
    return np.stack([np.bincount(gpu, weights=row, minlength=num_gpus) for row in per_slot])


@pytest.mark.parametrize("E,G,R", SIZES)
def test_slot_gpu_is_the_contiguous_block_layout(E: int, G: int, R: int) -> None:
    got = slot_gpu(R, G)
    assert got.tolist() == contiguous_expert_to_rank(R, G)  # R divisible by G: the trace's blocks
    assert np.bincount(got, minlength=G).tolist() == [R // G] * G
    pl = placement.plan(np.ones((1, E)), G, R, "eplb")
    assert pl.slot_gpu.tolist() == got.tolist()


@pytest.mark.parametrize("policy", ["eplb", "balanced", "fair_copying"])
@pytest.mark.parametrize("E,G,R", SIZES)
def test_every_gpu_sum_agrees_with_slot_gpu(policy: str, E: int, G: int, R: int) -> None:
    rng = np.random.default_rng(E * 100 + G)
    w = rng.gamma(0.7, size=(2, E)) * 100
    pl = placement.plan(w, G, R, policy)
    per_slot = np.take_along_axis(w, pl.phy2log, 1) * pl.share  # [L, R]
    expect = _by_bincount(per_slot, G)
    np.testing.assert_allclose(pl.gpu_load, expect, rtol=1e-12)
    np.testing.assert_allclose(gpu_loads(per_slot, G), expect, rtol=1e-12)
    for layer in range(2):
        np.testing.assert_allclose(split_loads(pl.phy2log[layer], pl.share[layer], w[layer], G), expect[layer],
                                   rtol=1e-12)


@pytest.mark.parametrize("E,G,R", SIZES)
def test_lp_split_minimises_the_max_over_the_slot_gpu_layout(E: int, G: int, R: int) -> None:
    """The LP's GPU rows are slot_gpu's: no split of the same copies has a lower max GPU load
    under Placement's layout (a LP over another layout, e.g. s % G, loses to some random split)."""
    rng = np.random.default_rng(E + G + R)
    w = rng.gamma(0.5, size=E) * 100
    phy2log = np.r_[np.arange(E), rng.integers(0, E, R - E)]
    rng.shuffle(phy2log)
    share = optimal_split(phy2log, w, G)
    best = Placement(phy2log[None], share[None], G, w[None]).gpu_load.max()
    for _ in range(200):
        x = rng.random(R)
        x /= np.bincount(phy2log, weights=x, minlength=E)[phy2log]
        other = Placement(phy2log[None], x[None], G, w[None]).gpu_load.max()
        assert best <= other * (1 + 1e-9)
