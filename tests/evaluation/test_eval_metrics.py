"""Metric formulas against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from moeload.evaluation import contiguous_map, error_metrics


def test_metrics_by_hand():
    # one layer, 4 experts, 3 steps; step 1 has no tokens (NaN row)
    y = np.array([[0.5, 0.3, 0.2, 0.0], [np.nan] * 4, [0.4, 0.4, 0.1, 0.1]])[:, None]
    f = np.array([[0.4, 0.4, 0.1, 0.1], [0.9, 0.1, 0.0, 0.0], [0.4, 0.4, 0.1, 0.1]])[:, None]
    gmap = np.array([[0, 0, 1, 1]])
    m = error_metrics(f, y, np.array([4]), gmap)
    err = np.array([[-0.1, 0.1, -0.1, 0.1], [0, 0, 0, 0]])  # f - y on the valid steps 0 and 2
    assert m["mae_pp"][0] == pytest.approx(100 * np.abs(err).mean())  # 5 pp
    assert m["rmse_pp"][0] == pytest.approx(100 * np.sqrt((err**2).mean()))
    # mre leaves out y = 0 (expert 3 at step 0): 7 entries
    rel = [0.1 / 0.5, 0.1 / 0.3, 0.1 / 0.2, 0, 0, 0, 0]
    assert m["mre"][0] == pytest.approx(np.mean(rel))
    ybar, fbar = np.array([0.45, 0.35, 0.15, 0.05]), np.array([0.4, 0.4, 0.1, 0.1])
    assert m["havg_mae_pp"][0] == pytest.approx(100 * np.abs(fbar - ybar).mean())  # 5 pp
    # GPU loads: realised (0.8, 0.2), forecast (0.8, 0.2) -> 0 error
    assert m["maxload_err"][0] == pytest.approx(0.0)
    assert m["n_eval"][0] == 2


def test_maxload_error_and_padding():
    # two layers; layer 1 has 2 real experts and 2 padding columns
    y = np.array([[[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]]])
    f = np.array([[[0.4, 0.3, 0.2, 0.1], [0.7, 0.3, 0.0, 0.0]]])
    gmap = contiguous_map(np.array([4, 2]), 4, 2)
    np.testing.assert_array_equal(gmap, [[0, 0, 1, 1], [0, 1, -1, -1]])
    m = error_metrics(f, y, np.array([4, 2]), gmap)
    assert m["maxload_err"][0] == pytest.approx(abs(0.7 - 0.5) / 0.5)
    assert m["maxload_err"][1] == pytest.approx(abs(0.7 - 0.5) / 0.5)
    assert m["mae_pp"][1] == pytest.approx(20.0)  # padding columns do not dilute the mean
    assert m["havg_mae_pp"][0] == pytest.approx(100 * np.mean([0.15, 0.05, 0.05, 0.15]))


def test_contiguous_map_more_gpus_than_experts():
    np.testing.assert_array_equal(contiguous_map(np.array([2]), 2, 4), [[0, 1]])
    np.testing.assert_array_equal(contiguous_map(np.array([8]), 8, 4), [[0, 0, 1, 1, 2, 2, 3, 3]])


def test_padding_column_in_gpu_map_is_left_out():
    rng = np.random.default_rng(0)
    y = rng.dirichlet(np.ones(3), size=(5, 1))
    f = rng.dirichlet(np.ones(3), size=(5, 1))
    pad = lambda a: np.concatenate([a, np.zeros((5, 1, 1))], axis=2)  # noqa: E731
    full = error_metrics(pad(f), pad(y), np.array([4]), np.array([[0, 0, 1, -1]]))
    three = error_metrics(f, y, np.array([3]), np.array([[0, 0, 1]]))
    for k in ("mae_pp", "rmse_pp", "mre", "havg_mae_pp", "maxload_err"):
        assert full[k][0] == pytest.approx(three[k][0])
