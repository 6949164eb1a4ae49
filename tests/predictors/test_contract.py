"""One contract test per registered predictor: shapes, simplex, errors, update, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import predictors
from moeload.errors import InputError, NotFittedError

FAST = {"lstm": {"epochs": 2, "block": 5, "lookback": 8}, "arima": {"order": (1, 1, 1)}}


def make(name: str, **extra):
    return predictors.get(name, **{**FAST.get(name, {}), **extra})


def test_registry_lists_the_required_families() -> None:
    assert {"last", "sw_avg", "ema", "arima", "lstm", "damped_trend", "kalman", "ridge",
            "state_aware"} <= set(predictors.available())


def test_unknown_name_lists_available() -> None:
    with pytest.raises(InputError, match="sw_avg"):
        predictors.get("no_such_predictor")


def test_bad_hyperparameter_is_input_error() -> None:
    with pytest.raises(InputError, match="sw_avg"):
        predictors.get("sw_avg", windw=3)


@pytest.mark.parametrize("name", predictors.available())
def test_contract(name: str, history: np.ndarray) -> None:
    m = make(name)
    with pytest.raises(NotFittedError):
        m.predict(3)
    with pytest.raises(NotFittedError):
        m.update(history[:2])
    assert m.fit(history) is m
    assert m.cutoff_ == history.shape[0]
    f = m.predict(7)
    assert f.shape == (7, 2, 6)
    assert (f >= 0).all() and np.allclose(f.sum(axis=2), 1.0)
    again = make(name).fit(history).predict(7)
    np.testing.assert_array_equal(f, again)  # deterministic
    assert m.update(history[:5]) is m and m.cutoff_ == history.shape[0] + 5
    g = m.predict(3)
    assert g.shape == (3, 2, 6) and np.allclose(g.sum(axis=2), 1.0)
    with pytest.raises(InputError):
        m.predict(0)
    with pytest.raises(InputError):
        m.update(history[:2, :, :4])


@pytest.mark.parametrize("name", predictors.available())
def test_constant_series_gives_constant_forecast(name: str) -> None:
    row = np.array([[0.5, 0.25, 0.125, 0.125, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    p = np.repeat(row[None], 120, axis=0)
    f = make(name).fit(p).predict(50)
    np.testing.assert_allclose(f, np.broadcast_to(row, f.shape), atol=1e-9)


@pytest.mark.parametrize("name", predictors.available())
def test_missing_rows_are_filled_and_padding_kept_at_zero(name: str, history: np.ndarray) -> None:
    p = history[:, :, :].copy()
    p[10, 1] = np.nan  # layer 1 saw no tokens in step 10
    p[:, 0, 5] = np.nan  # layer 0 has only 5 experts (padding)
    p[:, 0, :5] /= p[:, 0, :5].sum(axis=1, keepdims=True)
    f = make(name).fit(p).predict(4)
    assert np.isfinite(f).all()
    assert (f[:, 0, 5] == 0).all()
    assert np.allclose(f.sum(axis=2), 1.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((5, 2, 3)), "sums to"),  # counts, not proportions
        (-np.full((5, 1, 2), 0.5) + np.array([0, 1.0]), "negative"),
        (np.full((5, 2), np.inf), "inf"),
        (np.zeros((5, 2, 3, 1)), "shape"),
        (np.zeros((0, 2, 3)), "empty"),
        ("abc", "float"),
    ],
)
def test_bad_input_is_input_error(bad, match: str) -> None:
    with pytest.raises(InputError, match=match):
        predictors.get("sw_avg").fit(bad)


def test_partial_nan_row_is_input_error(history: np.ndarray) -> None:
    p = history.copy()
    p[3, 0, 2] = np.nan
    with pytest.raises(InputError, match="step 3, layer 0, expert 2"):
        predictors.get("ema").fit(p)


def test_single_run_family_rejects_several_runs(history: np.ndarray) -> None:
    with pytest.raises(InputError, match="one run"):
        predictors.get("ema").fit([history, history])
