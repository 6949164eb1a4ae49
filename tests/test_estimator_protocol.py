"""The one estimator protocol (moeload._estimator), checked on every registered predictor and every
state detector: keyword-only `__init__` that only stores, get_params / set_params, validation at
fit, fitted state ending in `_` (scikit-learn's `check_estimator` idea, on real components)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from moeload import predictors, states
from moeload._estimator import Estimator
from moeload.errors import InputError, NotFittedError
from moeload.states._input import load_input
from tests.states.synth import proportions, routing_counts

# Per predictor: hyperparameters that keep it fast here, a change that alters the forecast, and a bad
# value refused at fit (with the name the message must give).
FAST: dict[str, dict[str, Any]] = {"lstm": {"epochs": 2, "block": 5, "lookback": 8}, "arima": {"order": (1, 1, 1)}}
CHANGE: dict[str, dict[str, Any]] = {
    "arima": {"order": (2, 1, 0)}, "blend": {"ref": 0}, "combo": {"weights": (0.0, 1.0)},
    "damped_trend": {"alpha": 0.5}, "ema": {"halflife": 5.0}, "kalman": {"q_min": 10.0}, "lstm": {"seed": 1},
    "mean_revert": {"window": 5}, "online_blend": {"windows": (5, 10)}, "ridge": {"ref": 0}, "state_aware": {"trend": False}, "sw_avg": {"window": 5},
}
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "arima": ({"order": (1, 3, 1)}, "order"), "blend": ({"ref": 99}, "ref"), "combo": ({"weights": (-1.0, 1.0)}, "weights"),
    "damped_trend": ({"phi": 1.5}, "phi"), "ema": ({"alpha": 2.0}, "alpha"), "kalman": ({"pool": "everything"}, "pool"),
    "lstm": ({"lr": -1.0}, "lr"), "mean_revert": ({"target": "median"}, "target"),
    "online_blend": ({"pool": "everything"}, "pool"), "ridge": ({"ref": 99}, "ref"),
    "state_aware": ({"threshold": -1.0}, "threshold"), "sw_avg": ({"window": 0}, "window"),
}
DETECTORS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {  # method: (change, bad, name in message)
    "window": ({"window": 40}, {"exit_ratio": 0.5}, "exit_ratio"),
    "pelt": ({"block": 10}, {"pen": 0}, "pen"),
    "test": ({"window": 50}, {"alpha": 0}, "alpha"),
}


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    return routing_counts(1200, L=2, E=6, transient=((0, 400),), seed=4)


@pytest.fixture(scope="module")
def history(counts: np.ndarray) -> np.ndarray:
    return proportions(counts)


def _predictor(name: str, **extra: Any) -> predictors.Predictor:
    return predictors.get(name, **{**FAST.get(name, {}), **extra})


def _estimators() -> list[type[Estimator]]:
    return [predictors.registry._REGISTRY[n] for n in predictors.available()] + [
        type(states.get(m)) for m in states.available()]


def test_every_estimator_with_hyperparameters_has_cases() -> None:
    with_params = {n for n in predictors.available() if predictors.get(n).get_params()}
    assert with_params == set(CHANGE) == set(BAD)
    assert set(states.available()) == set(DETECTORS)


@pytest.mark.parametrize("cls", _estimators(), ids=lambda c: c.__name__)
def test_init_takes_keyword_only_arguments_stored_unchanged(cls: type[Estimator]) -> None:
    sig = inspect.signature(cls.__init__)
    kinds = {prm.kind for n, prm in sig.parameters.items() if n != "self"}
    assert kinds <= {inspect.Parameter.KEYWORD_ONLY}, sig
    defaults = {n: prm.default for n, prm in sig.parameters.items() if n != "self"}
    est = cls()
    assert est.get_params() == defaults
    sentinel = object()  # not a valid value of anything: __init__ must store it, not check it
    for name in defaults:
        assert cls(**{name: sentinel}).get_params()[name] is sentinel
    assert repr(est).startswith(f"{cls.__name__}(")


@pytest.mark.parametrize("name", predictors.available())
def test_predictor_params_round_trip(name: str, history: np.ndarray) -> None:
    est = _predictor(name, **CHANGE.get(name, {}))
    clone = type(est)(**est.get_params())
    assert clone.get_params() == est.get_params() and clone is not est
    np.testing.assert_array_equal(clone.fit(history).predict(20), est.fit(history).predict(20))
    with pytest.raises(InputError, match=r"unknown hyperparameter 'bogus'.*valid"):
        est.set_params(bogus=1)
    assert est.get_params() == clone.get_params()  # nothing changed


@pytest.mark.parametrize("name", sorted(CHANGE))
def test_predictor_set_params_changes_the_fit(name: str, history: np.ndarray) -> None:
    est = _predictor(name)
    before = est.fit(history).predict(50)
    assert est.set_params(**CHANGE[name]) is est
    assert {k: est.get_params()[k] for k in CHANGE[name]} == CHANGE[name]
    after = est.fit(history).predict(50)
    assert np.abs(after - before).max() > 1e-9
    np.testing.assert_array_equal(after, _predictor(name, **CHANGE[name]).fit(history).predict(50))


@pytest.mark.parametrize("name", sorted(BAD))
def test_predictor_bad_value_is_refused_at_fit_not_init(name: str, history: np.ndarray) -> None:
    bad, key = BAD[name]
    est = _predictor(name, **bad)  # __init__ does not check
    assert est.get_params()[key] == bad[key]
    with pytest.raises(InputError, match=rf"^{key}\b") as err:
        est.fit(history)
    assert "\n" not in str(err.value)
    with pytest.raises(NotFittedError):  # a failed fit leaves it unfitted
        est.predict(1)
    good = _predictor(name).fit(history)  # and a fitted one refitted with a bad value as well
    with pytest.raises(InputError, match=rf"^{key}\b"):
        good.set_params(**bad).fit(history)
    with pytest.raises(NotFittedError):
        good.predict(1)


@pytest.mark.parametrize("name", predictors.available())
def test_predictor_fitted_state_ends_in_underscore(name: str, history: np.ndarray) -> None:
    est = _predictor(name)
    params, before = est.get_params(), set(vars(est))
    est.fit(history).predict(5)
    new = set(vars(est)) - before
    assert new and all(k.endswith("_") for k in new), sorted(new)
    assert est.get_params() == params  # fit does not change hyperparameters


@pytest.mark.parametrize("method", sorted(DETECTORS))
def test_detector_protocol(method: str, counts: np.ndarray) -> None:
    change, bad, key = DETECTORS[method]
    inp = load_input(counts)
    est = states.get(method)
    clone = type(est)(**est.get_params())
    assert clone.get_params() == est.get_params()
    params, before = est.get_params(), set(vars(est))
    r0 = est.detect(inp)
    new = set(vars(est)) - before
    assert new and all(k.endswith("_") for k in new), sorted(new)
    assert est.get_params() == params and r0.params == est.params_
    np.testing.assert_array_equal(clone.detect(inp).labels, r0.labels)
    # set_params changes what detect uses, exactly as constructing with the value would
    assert est.set_params(**change) is est
    r1 = est.detect(inp)
    assert {k: r1.params[k] for k in change} == change
    assert not np.array_equal(np.nan_to_num(r1.fluctuation, nan=-1.0), np.nan_to_num(r0.fluctuation, nan=-1.0))
    np.testing.assert_array_equal(r1.labels, states.detect(counts, method=method, **change).labels)
    with pytest.raises(InputError, match=r"unknown hyperparameter 'bogus'.*valid"):
        est.set_params(bogus=1)
    # a bad value: stored by __init__ / set_params, refused by fit and detect with the same one line
    refused = type(est)(**bad)
    assert refused.get_params()[key] == bad[key]
    for call in (refused.fit, lambda: refused.detect(inp), lambda: est.set_params(**bad).detect(inp),
                 lambda: states.detect(counts, method=method, **bad), lambda: states.detect("no such input", method=method, **bad)):
        with pytest.raises(InputError, match=rf"^{key}\b") as err:
            call()
        assert "\n" not in str(err.value)


def test_streaming_detector_refuses_a_bad_value_when_built(counts: np.ndarray) -> None:
    with pytest.raises(InputError, match=r"^exit_ratio\b"):
        states.StreamingDetector(exit_ratio=0.5)
    sd = states.StreamingDetector(window=40)
    sd.update(counts[:600])
    sd.update(counts[600:])
    np.testing.assert_array_equal(sd.labels_so_far, states.detect(counts, reference="noise", window=40).labels)
