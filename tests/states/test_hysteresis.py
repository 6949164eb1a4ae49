"""The hysteresis state machine: run-length implementation against a step-by-step reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moeload.states.base import BETWEEN, ENTER, EXIT, UNKNOWN, hysteresis

codes_st = st.lists(st.sampled_from([UNKNOWN, ENTER, BETWEEN, EXIT]), min_size=0, max_size=120)


def reference(codes, min_run):
    state, count, out = False, 0, []
    for c in codes:
        if c != UNKNOWN:
            if c == (EXIT if state else ENTER):
                count += 1
                if count >= min_run:
                    state, count = not state, 0
            else:
                count = 0
        out.append(state)
    return np.array(out, dtype=bool)


@settings(max_examples=150, deadline=None)
@given(codes_st, st.integers(1, 6), st.integers(0, 120))
def test_matches_reference_and_splits(codes, min_run, cut):
    codes = np.array(codes, dtype=np.int8)
    lab, state, count = hysteresis(codes, min_run)
    np.testing.assert_array_equal(lab, reference(codes, min_run))
    # feeding the codes in two pieces gives the same labels (streaming)
    cut = min(cut, len(codes))
    a, s1, c1 = hysteresis(codes[:cut], min_run)
    b, s2, c2 = hysteresis(codes[cut:], min_run, s1, c1)
    np.testing.assert_array_equal(np.concatenate([a, b]), lab)
    assert (s2, c2) == (state, count)


@settings(max_examples=100, deadline=None)
@given(codes_st, st.integers(1, 6))
def test_flips_need_min_run_of_evidence(codes, min_run):
    codes = np.array(codes, dtype=np.int8)
    lab = hysteresis(codes, min_run)[0]
    for t in np.flatnonzero(lab[1:] != lab[:-1]) + 1:
        need = ENTER if lab[t] else EXIT
        known = codes[: t + 1][codes[: t + 1] != UNKNOWN]
        assert len(known) >= min_run and (known[-min_run:] == need).all()
    if len(lab) and lab[0]:
        assert min_run == 1 and codes[0] == ENTER
