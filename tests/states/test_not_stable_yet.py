"""The default phase rule says "not stable yet" unless the final stable phase is confirmed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moeload
from moeload import states
from tests.states.synth import proportions, routing_counts

TRACES = Path(__file__).resolve().parents[2] / "experiments" / "traces"


def test_settles_at_300_of_1000():
    r = states.detect(proportions(routing_counts(1000, transient=((0, 300),), seed=1)))
    assert all(300 <= b <= 300 + 100 + 20 + 10 for b in r.boundaries), r.boundaries
    assert r.verdicts == [f"stable from step {int(b)}" for b in r.boundaries]
    assert r.model_verdict == f"stable from step {int(r.boundaries.max())}"


def _calming(S: int = 1000, L: int = 2, E: int = 8, n: int = 4096, seed: int = 2) -> np.ndarray:
    """[S, L, E] counts whose router random walk slows down over the whole run but never stops."""
    rng = np.random.default_rng(seed)
    sd = 0.12 * np.linspace(1.0, 0.3, S)[:, None, None]
    logits = rng.standard_normal((L, E)) + np.cumsum(sd * rng.standard_normal((S, L, E)), axis=0)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    return rng.multinomial(n, q / q.sum(-1, keepdims=True))


def test_never_settles():
    r = states.detect(proportions(_calming()))
    assert (r.boundaries == -1).all() and r.model_boundary == -1, r.boundaries
    assert r.verdicts == ["not stable yet"] * 2 and r.model_verdict == "not stable yet"
    # a drift at a constant rate: its level is its own "late" reference, the noise reference sees it
    c = routing_counts(1000, transient=((0, 1000),), seed=2)
    assert states.detect(c, reference="noise").model_verdict == "not stable yet"


def test_settles_only_in_the_last_steps():
    r = states.detect(proportions(routing_counts(1000, transient=((0, 940),), seed=3)))
    assert (r.boundaries == -1).all() and r.model_verdict == "not stable yet", r.boundaries
    assert r.labels[-1].all()  # the labels still say stable at the end; the verdict does not trust it


def test_confirm_zero_is_the_old_rule():
    p = proportions(routing_counts(1000, transient=((0, 940),), seed=3))
    assert (states.detect(p, confirm=0).boundaries >= 0).all()


def test_streaming_says_not_stable_yet_then_stable():
    c = routing_counts(1200, transient=((0, 300),), seed=4)
    det = states.StreamingDetector(top_k=1)
    det.update(c[:500])
    assert det.model_verdict == "not stable yet"  # stable for < 3 windows
    det.update(c[500:])
    assert (det.boundaries >= 300).all() and det.model_verdict.startswith("stable from step"), det.boundaries
    det2 = states.StreamingDetector(top_k=1)
    det2.update(routing_counts(1200, transient=((0, 1200),), seed=5))
    assert det2.verdicts == ["not stable yet"] * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_real_medium_600_steps_not_stable_yet(seed):
    r = states.detect(moeload.open_trace(TRACES / f"gpt3-medium-moe-s{seed}.moeload"))
    assert len(r.steps) == 600
    assert r.model_boundary == -1 and r.model_verdict == "not stable yet"
    assert (r.boundaries == -1).all(), r.boundaries


def test_real_small_settles():
    r = states.detect(moeload.open_trace(TRACES / "gpt3-small-moe-s0.moeload"))
    assert (r.boundaries > 0).all() and r.model_boundary == r.boundaries.max()
    assert r.model_verdict == f"stable from step {r.model_boundary}"
