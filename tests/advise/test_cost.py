"""The cost model on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeload.advise.cost import (
    Calibration,
    ExpertShape,
    a2a_time,
    copy_time,
    default_calibration,
    floor_time,
    layer_time,
    migration_time,
)
from moeload.errors import InputError

SHAPE = ExpertShape(hidden=4, ffn_hidden=8)  # 64 params, route = 4 x 2 B = 8 B, state = 64 x 14 B
CAL = Calibration((0.0, 100.0, 200.0), (0.0, 1e-3, 2e-3), intra_bw=120.0, intra_lat=0.5, inter_bw=30.0,
                  inter_lat=1.0)


def test_shape_sizes() -> None:
    assert SHAPE.params == 64 and SHAPE.route_bytes == 8 and SHAPE.state_bytes == 64 * 14
    assert ExpertShape(4, 8, gated=True).params == 96
    assert SHAPE.flops_per_route == 3 * 2 * 64


def test_gemm_time_interpolates_and_extrapolates() -> None:
    got = CAL.gemm_time(np.array([0, 50, 150, 300]))
    assert got == pytest.approx([0.0, 0.5e-3, 1.5e-3, 3e-3])


def test_a2a_one_node() -> None:
    # G=2: GPU0 receives 30 * 1/2 = 15 routes, sends 40/2 * 1/2 = 10; worst 15 routes x 8 B = 120 B at 120 B/s.
    assert a2a_time(np.array([30.0, 10.0]), np.array(40.0), SHAPE, CAL) == pytest.approx(0.5 + 1.0)
    assert a2a_time(np.array([[5.0]]), np.array([5.0]), SHAPE, CAL) == pytest.approx([0.0])  # one GPU: no exchange


def test_a2a_two_nodes_crosses_the_slow_link() -> None:
    # G=4 over 2 nodes: 2 of 3 peers elsewhere; GPU0 receives 40 * 3/4 = 30 routes = 240 B, 160 B across at 30 B/s.
    t = a2a_time(np.array([40.0, 0.0, 0.0, 0.0]), np.array(40.0), SHAPE, CAL, num_nodes=2)
    assert t == pytest.approx(max(0.5 + 80 / 120, 1.0 + 160 / 30))


def test_layer_time_is_slowest_gemm_plus_four_all_to_alls() -> None:
    routes = np.array([30.0, 10.0])
    want = CAL.gemm_time(30.0) + 4 * (0.5 + 1.0)
    assert layer_time(routes, SHAPE, CAL) == pytest.approx(want)
    # two micro-batches: each half the routes, each pays its own all-to-alls
    half = CAL.gemm_time(15.0) + 4 * (0.5 + 7.5 * 8 / 120)
    assert layer_time(routes, SHAPE, CAL, micro_batches=2) == pytest.approx(2 * half)


def test_floor_is_never_above_any_split() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = rng.integers(0, 500, size=4).astype(float)
        assert floor_time(r.sum(), 4, SHAPE, CAL) <= layer_time(r, SHAPE, CAL) + 1e-12


def test_migration_and_copies() -> None:
    assert migration_time(np.array(0), SHAPE, CAL, 2) == 0.0
    assert migration_time(np.array(3), SHAPE, CAL, 2) == pytest.approx(0.5 + 2 * 64 * 14 / 120)
    assert migration_time(np.array(3), SHAPE, CAL, 2, num_nodes=2) == pytest.approx(1.0 + 2 * 64 * 14 / 30)
    assert copy_time(np.array(2), SHAPE, CAL) == pytest.approx(0.5 + 2 * 2 * 128 / 120)


def test_default_calibration_is_monotone_and_flagged() -> None:
    cal = default_calibration(ExpertShape(768, 3072), 4)
    s = np.asarray(cal.seconds)
    assert cal.kind == "default" and not cal.measured and np.all(np.diff(s) >= 0)
    # large n: compute-bound, ~ n * flops / peak
    big = cal.gemm_time(1e6) - cal.gemm_time(5e5)
    assert big == pytest.approx(5e5 * ExpertShape(768, 3072).flops_per_route / (989e12 * 0.55), rel=1e-6)


def test_calibration_roundtrip_and_bad_files(tmp_path) -> None:
    p = tmp_path / "c.json"
    CAL.save(p)
    assert Calibration.load(p) == CAL
    bad = tmp_path / "bad.json"
    for text, needle in [("[1]", "object"), ("{", "readable"), ('{"tokens": [0, 1], "seconds": [1, 0]}', "non-decreasing"),
                         ('{"tokens": [0, 1], "seconds": [0, 1], "wat": 1}', "unknown")]:
        bad.write_text(text)
        with pytest.raises(InputError, match=needle) as e:
            Calibration.load(bad)
        assert str(bad) in str(e.value)
    json.loads(p.read_text())


def test_padded_routes_rounds_each_group_per_micro_batch() -> None:
    from moeload.advise.cost import padded_routes

    per_slot = np.array([[1.0, 17.0, 0.0, 40.0]])  # 2 GPUs x 2 slots
    assert padded_routes(per_slot, 2, 0).tolist() == [[18.0, 40.0]]
    assert padded_routes(per_slot, 2, 16).tolist() == [[16.0 + 32.0, 0.0 + 48.0]]
    # two micro-batches of 20 routes each: each pads to 32
    assert padded_routes(np.array([[40.0, 0.0]]), 1, 32, micro_batches=2).tolist() == [[64.0]]
