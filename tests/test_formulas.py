"""Every contiguous expert -> rank path and the slot -> GPU path agree, also for uneven sizes."""

from __future__ import annotations

import numpy as np
import pytest

from moeload.evaluation.metrics import contiguous_map
from moeload.placement.contiguous import plan_contiguous
from moeload.trace.layout import contiguous_expert_to_rank
from moeload.trace.manifest import Manifest
from moeload.tracing.adapters.deepspeed import _autoep_placement
from moeload.tracing.tracer import _contiguous

SIZES = [(10, 4), (8, 4), (7, 3), (3, 4), (64, 8), (65, 8), (1, 1)]


@pytest.mark.parametrize("E,G", SIZES)
def test_contiguous_maps_agree(E: int, G: int) -> None:
    ref = contiguous_expert_to_rank(E, G)
    assert len(ref) == E and ref == sorted(ref) and max(ref) < G
    assert _contiguous(E, G) == ref
    assert Manifest(layers=["a"], experts_per_layer=[E], ep_size=G).rank_map()[0] == ref
    assert contiguous_map(np.array([E]), E + 2, G)[0].tolist() == ref + [-1, -1]
    # a plain module carries no placement descriptor: the adapter's legacy contiguous layout
    assert _autoep_placement(object(), G, E) == ref  # type: ignore[arg-type]


def test_uneven_map_is_ceiling_blocks() -> None:
    assert contiguous_expert_to_rank(10, 4) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert contiguous_expert_to_rank(8, 4) == [e // 2 for e in range(8)]


@pytest.mark.parametrize("E,G", [(8, 4), (64, 8), (12, 3)])
def test_slot_gpu_matches_contiguous_when_divisible(E: int, G: int) -> None:
    p = plan_contiguous(np.ones((2, E)), G, E)
    assert p.slot_gpu.tolist() == contiguous_expert_to_rank(E, G)


def test_slot_gpu_uneven_10_on_4() -> None:
    """Placement keeps the same slots on every GPU; an uneven count is refused or matches the map."""
    try:
        p = plan_contiguous(np.ones((1, 10)), 4, 10)
        slot_gpu = p.slot_gpu.tolist()
    except Exception as err:  # noqa: BLE001 - refusal is the documented alternative
        assert "10" in str(err) or "4" in str(err)
        return
    assert slot_gpu == contiguous_expert_to_rank(10, 4)
