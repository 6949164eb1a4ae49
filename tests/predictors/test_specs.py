"""Predictor specs have one parser (`predictors.from_spec`): backtests, `combo` members and the
online planner accept the same forms and build the same predictor from each."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import evaluation, predictors
from moeload.errors import InputError
from moeload.online import OnlinePlanner

SPECS = {
    "name": "sw_avg",
    "tuple": ("sw_avg", {"window": 7}),
    "list": ["sw_avg", {"window": 7}],
    "instance": predictors.get("sw_avg", window=7),
}
BAD = ["no_such_predictor", ("sw_avg", {"windw": 3}), ("sw_avg",), 3, ("sw_avg", 7)]


def _history() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(4), size=(80, 2))


def _built(spec):
    """The predictor each consumer builds from `spec`: (from_spec, combo member, online planner)."""
    combo = predictors.get("combo", members=[spec], weights=None).fit(_history())
    planner = OnlinePlanner(num_gpus=2, predictor=spec)
    return predictors.from_spec(spec), combo.members_[0], planner.predictor


@pytest.mark.parametrize("form", list(SPECS))
def test_every_consumer_builds_the_same_predictor(form) -> None:
    spec = SPECS[form]
    ref, member, online = _built(spec)
    assert type(ref) is type(member) is type(online)
    assert ref.get_params() == member.get_params() == online.get_params()
    assert ref is not spec and member is not spec and online is not spec  # never the caller's instance
    p = _history()
    df = evaluation.backtest(p, predictors=[spec], horizons=(5,), origins=[60], phases=False)
    fc = ref.fit(p[:60]).predict(5)
    mae = np.abs(fc - p[60:65]).mean(axis=(0, 2)) * 100  # [L] in pp, as the backtest's mae_pp
    np.testing.assert_allclose(df.sort_values("layer")["mae_pp"].to_numpy(), mae, rtol=1e-9)
    assert df["predictor"].iloc[0] == predictors.spec_label(spec)


def test_labels() -> None:
    assert predictors.spec_label("ema") == "ema"
    assert predictors.spec_label(("sw_avg", {"window": 7, "slide": False})) == "sw_avg(slide=False, window=7)"
    assert predictors.spec_label(["sw_avg", {}]) == "sw_avg"


@pytest.mark.parametrize("spec", BAD, ids=repr)
def test_every_consumer_refuses_the_same_bad_specs(spec) -> None:
    with pytest.raises(InputError):
        predictors.from_spec(spec)
    with pytest.raises(InputError, match="members|predictor"):
        predictors.get("combo", members=[spec]).fit(_history())
    with pytest.raises(InputError, match="predictor"):
        OnlinePlanner(num_gpus=2, predictor=spec)
    with pytest.raises(InputError, match="predictor"):
        evaluation.backtest(_history(), predictors=[spec], horizons=(5,))


def test_combo_cannot_hold_a_combo() -> None:
    with pytest.raises(InputError, match="combo"):
        predictors.get("combo", members=["last", "combo"]).fit(_history())
    with pytest.raises(InputError, match="combo"):
        predictors.get("combo", members=[predictors.get("combo")]).fit(_history())
