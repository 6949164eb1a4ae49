"""LSTM predictor: multi-run fit, save/load round trip, lazy torch import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moeload import predictors
from moeload.errors import InputError
from moeload.predictors.lstm import LSTMPredictor

SMALL = {"epochs": 3, "block": 5, "lookback": 8, "hidden": 8}


def test_save_load_round_trip_gives_identical_forecasts(tmp_path, history: np.ndarray) -> None:
    m = predictors.get("lstm", **SMALL).fit([history[:150], history[150:]])
    path = tmp_path / "lstm.pt"
    m.save(path)
    back = LSTMPredictor.load(path)
    np.testing.assert_array_equal(back.predict(60), m.predict(60))
    assert back.get_params() == m.get_params()
    np.testing.assert_array_equal(back.update(history[:10]).predict(5), m.update(history[:10]).predict(5))


def test_training_changes_the_forecast_and_runs_matter(history: np.ndarray) -> None:
    untrained = predictors.get("lstm", **{**SMALL, "epochs": 0}).fit(history).predict(20)
    trained = predictors.get("lstm", **SMALL).fit(history).predict(20)
    assert not np.allclose(untrained, trained)
    two_runs = predictors.get("lstm", **SMALL).fit([history[::-1], history]).predict(20)
    assert not np.allclose(two_runs, trained)


def test_untrained_lstm_is_a_window_average(history: np.ndarray) -> None:
    f = predictors.get("lstm", **{**SMALL, "epochs": 0}).fit(history).predict(5)
    np.testing.assert_allclose(f[0], history[-40:].mean(axis=0), atol=1e-12)


def test_load_of_a_foreign_file_is_input_error(tmp_path) -> None:
    bad = tmp_path / "x.pt"
    bad.write_text("not a model")
    with pytest.raises(InputError, match="x.pt"):
        LSTMPredictor.load(bad)


def test_runs_with_different_shapes_are_rejected(history: np.ndarray) -> None:
    with pytest.raises(InputError, match="shapes"):
        predictors.get("lstm", **SMALL).fit([history, history[:, :, :4] / history[:, :, :4].sum(-1, keepdims=True)])


def test_importing_predictors_does_not_import_torch() -> None:
    code = "import sys, moeload.predictors as p; p.available(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
