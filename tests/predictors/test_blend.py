"""`blend`: weights learned on one run, applied to another."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import predictors, states
from moeload.errors import InputError
from moeload.predictors.blend import learn_blend

WINDOWS = (5, 10, 25, 50, 100)


def havg_err(p: np.ndarray, spec: dict, H: int, origins) -> float:
    return float(np.mean([np.abs(predictors.get("blend", **spec).fit(p[:o]).predict(H).mean(0) - p[o : o + H].mean(0)).mean()
                          for o in origins]))


def test_weights_learned_on_one_run_beat_the_window_mean_on_another(make_drifting) -> None:
    tune, report = make_drifting(T=600, L=2, E=6, seed=0), make_drifting(T=600, L=2, E=6, seed=1)
    H = 100
    learned = learn_blend(tune, H, windows=WINDOWS, ref=2, stride=5, min_history=100)
    assert len(learned["coef"]) == len(WINDOWS) - 1 + 1 and "coef_transient" not in learned
    plain = {"windows": WINDOWS, "ref": 2}
    origins = range(150, 500, 25)
    # steady drift of the means: extrapolating it beats the 25-step mean on a run the weights never saw
    assert havg_err(report, learned, H, origins) < 0.8 * havg_err(report, plain, H, origins)


def test_without_weights_it_is_the_reference_window_mean(history: np.ndarray) -> None:
    f = predictors.get("blend", windows=WINDOWS, ref=3).fit(history).predict(4)
    np.testing.assert_allclose(f, np.broadcast_to(history[-50:].mean(0), f.shape), atol=1e-12)


def test_uniform_term_pulls_towards_uniform(history: np.ndarray) -> None:
    coef = (0.0, 0.0, 0.0, 0.0, 1.0)  # f = m_ref + 1 * (1/E - m_ref) = uniform
    f = predictors.get("blend", windows=WINDOWS, ref=2, coef=coef).fit(history).predict(2)
    np.testing.assert_allclose(f, 1 / 6, atol=1e-12)


def test_by_phase_uses_each_layers_label(make_drifting) -> None:
    p = make_drifting(T=400, L=2, E=6, seed=2)
    spec = learn_blend(p, 50, windows=WINDOWS, ref=2, stride=5, min_history=50, by_phase=True)
    assert len(spec["coef_transient"]) == len(spec["coef"])
    seen = set()
    for cut in (100, 300):  # the window rule labels this run transient at step 100, stable at 300
        h = p[:cut]
        got = predictors.get("blend", **spec).fit(h).predict(1)[0]
        stable = states.detect(h).labels[-1]
        seen |= set(stable.tolist())
        for coef_key in ("coef", "coef_transient"):
            want = predictors.get("blend", windows=WINDOWS, ref=2, coef=spec[coef_key]).fit(h).predict(1)[0]
            use = stable if coef_key == "coef" else ~stable
            np.testing.assert_allclose(got[use], want[use], atol=1e-12)
    assert seen == {True, False}
    assert not np.allclose(spec["coef"], spec["coef_transient"])


def test_bad_input_is_input_error(history: np.ndarray) -> None:
    with pytest.raises(InputError, match="coef"):
        predictors.get("blend", windows=WINDOWS, coef=(1.0, 2.0)).fit(history)
    with pytest.raises(InputError, match="coef_transient"):
        predictors.get("blend", windows=WINDOWS, coef_transient=(np.nan,) * 5).fit(history)
    with pytest.raises(InputError, match="ref"):
        predictors.get("blend", windows=WINDOWS, ref=9).fit(history)
    with pytest.raises(InputError, match="runs"):
        learn_blend(history, 500, windows=WINDOWS)
