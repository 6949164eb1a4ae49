"""StreamingDetector: causal, block-size independent, equal to the offline labels."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import states
from moeload.errors import InputError
from tests.states.synth import proportions, routing_counts

S = 2500


@pytest.fixture(scope="module")
def run():
    return routing_counts(S, L=3, transient=((0, 700), (1500, 1900)), seed=5)


def _blocks(n: int, seed: int):
    rng = np.random.default_rng(seed)
    cuts = np.unique(np.concatenate([[0, 1, 2, 3], rng.integers(0, n, 25), [n]]))
    return list(zip(cuts[:-1], cuts[1:]))


@pytest.mark.parametrize(
    "method,params",
    [
        ("window", {"reference": "noise"}),
        ("window", {"reference": "noise", "stat": "var", "agg": "max"}),
        ("window", {"reference": 0.02, "window": 50}),
        ("test", {}),
        ("test", {"window": 60, "min_run": 1}),
    ],
)
def test_streaming_labels_equal_offline(run, method, params):
    off = states.detect(run, method=method, **params)
    sd = states.StreamingDetector(method, **params)
    for a, b in _blocks(S, 0):
        sd.update(run[a:b])
    np.testing.assert_array_equal(sd.labels_so_far, off.labels)
    assert off.labels.any() and (~off.labels).any()  # the comparison is not trivial
    # stable_since is the offline boundary; events are exactly the label changes
    np.testing.assert_array_equal(sd.stable_since, off.boundaries)
    np.testing.assert_array_equal(sd.is_stable, off.labels[-1])
    changes = {(li, a) for li, segs in enumerate(off.segments) for a, _, st in segs if a > 0}
    assert {(e.layer, e.step) for e in sd.events} == changes
    for e in sd.events:
        assert off.labels[e.step, e.layer] == e.stable and off.labels[e.step - 1, e.layer] != e.stable


def test_streaming_proportions_with_tokens_and_steps(run):
    p, tok = proportions(run), run.sum(-1)
    off = states.detect(p, tokens=tok, reference="noise", steps=np.arange(S) + 10_000)
    sd = states.StreamingDetector(reference="noise")
    for a, b in _blocks(S, 1):
        ev = sd.update(p[a:b], steps=np.arange(a, b) + 10_000, tokens=tok[a:b])
        assert all(a + 10_000 <= e.step < b + 10_000 for e in ev)
    np.testing.assert_array_equal(sd.labels_so_far, off.labels)
    np.testing.assert_array_equal(sd.stable_since, off.boundaries)
    np.testing.assert_array_equal(sd.steps_so_far, np.arange(S) + 10_000)


def test_never_looks_ahead(run):
    """Labels given at step t do not change when later data differ."""
    other = run.copy()
    other[1200:] = routing_counts(S - 1200, L=3, transient=((0, S),), seed=9)
    a, b = states.StreamingDetector(), states.StreamingDetector()
    a.update(run)
    b.update(other)
    np.testing.assert_array_equal(a.labels_so_far[:1200], b.labels_so_far[:1200])


def test_centred_offline_is_the_causal_rule_shifted(run):
    w = 100
    shift = (w - 1) // 2
    causal = states.detect(run, reference="noise", window=w)
    centred = states.detect(run, reference="noise", window=w, center=True)
    np.testing.assert_array_equal(centred.labels[: S - shift], causal.labels[shift:])


@pytest.mark.parametrize("kw", [{"reference": "late"}, {"center": True, "reference": 0.1}])
def test_lookahead_rules_are_refused(kw):
    with pytest.raises(InputError, match="looks ahead"):
        states.StreamingDetector("window", **kw)
    with pytest.raises(InputError, match="looks ahead"):
        states.StreamingDetector("pelt")


def test_streaming_bad_blocks(run):
    sd = states.StreamingDetector()
    with pytest.raises(InputError, match="is_stable|no data"):
        sd.is_stable
    sd.update(run[:10])
    with pytest.raises(InputError, match="differ"):
        sd.update(run[10:20, :2])
    with pytest.raises(InputError, match="steps"):
        sd.update(run[10:20], steps=np.arange(5))
    with pytest.raises(InputError, match="routed assignments"):
        states.StreamingDetector().update(proportions(run[:200]))
