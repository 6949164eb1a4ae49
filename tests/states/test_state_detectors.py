"""Offline detectors on synthetic runs with known phases, and input checking."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import states
from moeload.errors import InputError
from tests.states.synth import proportions, routing_counts

S, N = 4000, 1200
W = 100


@pytest.fixture(scope="module")
def onset():
    return routing_counts(S, transient=((0, N),), seed=1)


@pytest.fixture(scope="module")
def flat():
    return routing_counts(S, transient=(), seed=2)


@pytest.fixture(scope="module")
def relapse():
    return routing_counts(S, transient=((1500, 2500),), bridge=True, seed=3)


# (method, params, lowest and highest boundary accepted relative to N)
CASES = [
    ("window", {}, 0, W + W // 5 + 10),
    ("window", {"reference": "noise"}, 0, W + W // 5 + 10),
    ("window", {"stat": "var"}, 0, W + W // 5 + 10),
    ("window", {"agg": "max"}, 0, W + W // 5 + 10),
    ("window", {"center": True}, -W // 2, W // 2 + W // 5 + 10),
    ("pelt", {}, -40, 40),
    ("test", {}, 0, 4 * W),
]


def test_available_lists_every_method():
    assert states.available() == ["pelt", "test", "window"]


@pytest.mark.parametrize("method,params,lo,hi", CASES)
def test_boundary_after_known_transient(onset, method, params, lo, hi):
    r = states.detect(onset, method=method, **params)
    assert r.labels.shape == (S, 2) and r.labels.dtype == bool
    for b in r.boundaries:
        assert N + lo <= b <= N + hi, (method, params, r.boundaries)
    assert r.model_boundary == r.boundaries.max()
    assert not r.labels[: N // 2].any()  # the random walk is clearly transient
    assert r.labels[N + hi :].all()
    assert r.fluctuation.shape == (S, 2)


@pytest.mark.parametrize("method,params,lo,hi", CASES)
def test_stationary_noise_is_stable_once_assessable(flat, method, params, lo, hi):
    r = states.detect(flat, method=method, **params)
    first = {"window": W - 1 + W // 5 - 1, "pelt": 0, "test": 3 * W - 1}[method]
    if params.get("center"):
        first -= (W - 1) // 2
    assert (r.boundaries == first).all(), r.boundaries
    assert r.labels[first:].all()
    assert all(len(seg) <= 2 for seg in r.segments)


@pytest.mark.parametrize("method,params", [("window", {}), ("window", {"reference": "noise"}), ("pelt", {}), ("test", {})])
def test_return_to_transient_shows_in_segments(relapse, method, params):
    r = states.detect(relapse, method=method, **params)
    for segs in r.segments:
        kinds = [s[2] for s in segs if s[1] - s[0] >= 50]
        assert kinds[-3:] == [True, False, True], segs
        tr = [s for s in segs if not s[2] and s[0] > 1000]
        assert tr and 1300 <= tr[0][0] <= 1700 and 2450 <= tr[-1][1] <= 2500 + 4 * W, segs
    assert 2500 <= r.model_boundary <= 2500 + 4 * W
    assert (r.boundaries >= 2450).all()
    # segments tile the run
    for segs in r.segments:
        assert segs[0][0] == 0 and segs[-1][1] == S
        assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_window_threshold_rule_by_hand(onset):
    """The late reference: threshold = factor * median of the statistic over the last 20%."""
    r = states.detect(onset, factor=2.0)
    fl = r.fluctuation
    expect = 2.0 * np.nanmedian(fl[S - S // 5 :], axis=0)
    np.testing.assert_allclose(r.threshold[-1], expect)
    # rolling range by hand at one step, layer 0
    p = proportions(onset)
    t = 2000
    win = p[t - W + 1 : t + 1, 0]
    assert fl[t, 0] == pytest.approx((win.max(0) - win.min(0)).mean())
    rv = states.detect(onset, stat="var", agg="max", reference=1.0)
    assert rv.fluctuation[t, 0] == pytest.approx(win.var(0, ddof=1).max())


def test_noise_reference_matches_multinomial_range(flat):
    """On pure multinomial noise the range statistic sits at the expected noise range (ratio ~1)."""
    r = states.detect(flat, reference="noise", factor=1.0)
    ratio = r.fluctuation[W:] / r.threshold[W:]
    assert 0.85 < np.median(ratio) < 1.15


def test_trace_input_reports_trace_steps(tmp_path):
    from moeload import open_trace
    from moeload.trace import Manifest, TraceWriter

    c = routing_counts(2000, transient=((0, 600),), seed=4)
    m = Manifest(layers=["l0", "l1"], experts_per_layer=[8, 8], top_k=2, framework="synthetic")
    with TraceWriter(tmp_path / "t.moeload", m) as w:
        w.write_block(np.arange(2000) * 2 + 500, c)
    tr = open_trace(tmp_path / "t.moeload")
    r = states.detect(tr)
    ra = states.detect(c)
    np.testing.assert_array_equal(r.labels, ra.labels)
    np.testing.assert_array_equal(r.boundaries, ra.boundaries * 2 + 500)
    assert r.segments[0][0][0] == 500 and r.segments[0][-1][1] == 2 * 1999 + 500 + 1
    rn = states.detect(tr, reference="noise")  # token counts come from the trace
    assert ((rn.boundaries >= 2 * 600 + 500) & (rn.boundaries <= 2 * 800 + 500)).all()


def test_missing_rows_are_skipped(onset):
    p = proportions(onset).copy()
    p[np.random.default_rng(0).choice(S, 200, replace=False)] = np.nan
    r = states.detect(p)
    assert ((r.boundaries >= N) & (r.boundaries <= N + W + W // 5 + 10)).all()


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.full((10, 1, 8, 1), 1 / 8), r"\[steps, experts\] \(one layer\)"),
        (-np.ones((10, 1, 2)), "negative|non-negative"),
        (np.full((10, 1, 4), 0.3), "sum to 1"),
        (np.array([[[0.5, 0.5]], [[0.5, np.nan]]]), "partly NaN"),
        (np.array([[[np.nan, 1.0]]]), "padding must be the last"),
        (np.full((0, 1, 4), 0.25), "at least 1 step"),
        (np.array([[["a", "b"]]]), "numeric"),
    ],
)
def test_bad_input_raises_input_error(bad, match):
    with pytest.raises(InputError, match=match):
        states.detect(bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"method": "nope"}, "unknown state detector"),
        ({"window": 0}, "window"),
        ({"reference": "median"}, "reference"),
        ({"stat": "iqr"}, "stat"),
        ({"exit_ratio": 0.5}, "exit_ratio"),
        ({"reference": "noise"}, "routed assignments"),
        ({"bogus": 1}, "bad parameter"),
    ],
)
def test_bad_parameters_raise_input_error(onset, kw, match):
    with pytest.raises(InputError, match=match):
        states.detect(proportions(onset[:300]), **kw)
