"""Proportions have one validator (`states._input.check_proportions`): states, backtests and
predictors accept the same arrays, refuse the same arrays, and read them as the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import evaluation, predictors, states
from moeload.errors import InputError
from moeload.predictors.base import validate_proportions
from moeload.states._input import ROW_SUM_TOL, load_input

S = 120


def _p(L: int = 2, E: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(E), size=(S, L))


def _consumers(p):
    """What each user of the validator makes of `p` (raises InputError where it refuses it)."""
    r = states.detect(p, window=20)
    f = predictors.get("sw_avg", window=10).fit(p).predict(3)
    df = evaluation.backtest(p, predictors=["last"], horizons=(5,), origins=[100], phases=False)
    return r, f, df


def _float16() -> np.ndarray:
    p = _p(L=2, E=8, seed=1).astype(np.float16)
    off = np.abs(p.astype(np.float64).sum(-1) - 1).max()
    assert 1e-5 < off < ROW_SUM_TOL  # refused by the old 1e-6 of states, accepted by predictors
    return p


def _padded() -> np.ndarray:
    p = _p()
    p[:, 1, 4:] = np.nan  # layer 1 has 4 experts
    p[:, 1, :4] = _p(L=1, E=4, seed=2)[:, 0]
    p[7, 0] = np.nan  # a step without tokens
    return p


ACCEPTED = {
    "one layer [S, E]": lambda: _p(L=1)[:, 0],
    "float16": _float16,
    "padding and a step without tokens": _padded,
    "rows off by rounding": lambda: _p() * (1 + 0.5 * ROW_SUM_TOL),
}


def _off_rows():
    p = _p()
    p[3, 1] *= 1 + 3 * ROW_SUM_TOL
    return p


def _partly_nan():
    p = _p()
    p[3, 0, 2] = np.nan
    return p


REFUSED = {
    "a row off by 3e-3": (_off_rows, "sums to"),
    "counts as floats": (lambda: _p() * 100, "sums to"),
    "partly NaN": (_partly_nan, "partly NaN"),
    "negative": (lambda: _p() - 0.5, "negative"),
    "4 dims": (lambda: _p()[..., None], "one layer"),
    "inf": (lambda: np.full((S, 1, 2), np.inf), "inf"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_every_user_accepts_the_same_arrays(case) -> None:
    p = ACCEPTED[case]()
    r, f, df = _consumers(p)
    L = 1 if p.ndim == 2 else p.shape[1]
    assert r.labels.shape == (S, L) and f.shape[1] == L and set(df["layer"]) == set(range(L))
    # one reading of the numbers: states' proportions are the predictors' (before filling rows)
    got = load_input(p).p
    ref, _ = validate_proportions(p)
    rows = ~np.isnan(got[:, :, 0])
    np.testing.assert_array_equal(got[rows], ref[rows])


@pytest.mark.parametrize("case", list(REFUSED))
def test_every_user_refuses_the_same_arrays(case) -> None:
    make, match = REFUSED[case]
    p = make()
    with pytest.raises(InputError, match=match):
        states.detect(p)
    with pytest.raises(InputError, match=match):
        predictors.get("last").fit(p)
    with pytest.raises(InputError, match=match):
        evaluation.backtest(p, predictors=["last"], horizons=(5,))


def test_padded_layer_is_read_as_its_real_experts() -> None:
    p = _padded()
    r = states.detect(p, window=20)
    alone = states.detect(p[:, 1:, :4], window=20)
    np.testing.assert_array_equal(r.fluctuation[:, 1], alone.fluctuation[:, 0])
    one = states.detect(p[:, 0], window=20)  # [S, E] is one layer
    np.testing.assert_array_equal(r.fluctuation[:, 0], one.fluctuation[:, 0])


def test_streaming_refuses_nan_padding() -> None:
    """A block cannot tell a padded column from an expert without tokens yet: streaming wants 0."""
    with pytest.raises(InputError, match="padding"):
        states.StreamingDetector().update(_padded()[:50], tokens=np.full(50, 1000))
    zero = np.nan_to_num(_padded()[:50], nan=0.0)
    zero[7, 0] = np.nan
    assert states.StreamingDetector().update(zero, tokens=np.full(50, 1000)) == []
