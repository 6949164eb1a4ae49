"""The three users of the load-balance statistics (`summary`'s layer_stats, the TensorBoard / W&B
metrics, placement's imbalance) give identical numbers, because they call `moeload._balance`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeload._balance import balance_stats, max_over_mean
from moeload.cli._common import layer_stats
from moeload.placement import imbalance_of
from moeload.tracing.callbacks.metrics import MetricLogger, load_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "importers" / "counts.npz"


def _cases():
    d = np.load(FIXTURE)
    yield "counts.npz", d["counts"], [int(e) for e in d["experts_per_layer"]]
    rng = np.random.default_rng(7)
    c = rng.poisson(rng.gamma(0.6, 40, size=(1, 3, 10)), size=(50, 3, 10))
    c[:, 1, 7:] = 0  # layer 1 has 7 experts, the rest is padding
    c[5, 2] = 0  # a step without tokens
    yield "uneven", c, [10, 7, 10]


@pytest.mark.parametrize("name,counts,experts", list(_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_three_imbalance_users_agree(name, counts, experts) -> None:
    stats = layer_stats(counts, experts)
    window = counts.sum(0)  # [L, E]
    m = load_metrics(window, experts)
    scalars = MetricLogger(layers=[f"l{i}" for i in range(len(experts))], experts_per_layer=experts).scalars(window)
    for li, n in enumerate(experts):
        tot = window[li, :n]
        assert stats[li]["imbalance_window"] == m["max_over_mean"][li] == imbalance_of(tot)
        assert stats[li]["imbalance_window"] == scalars[f"moeload/l{li}/max_over_mean"]
        assert stats[li]["cv"] == m["cv"][li] == scalars[f"moeload/l{li}/cv"]
        assert stats[li]["min_max"] == m["min_over_max"][li]
        per_step = counts[:, li, :n]
        busy = per_step.sum(1) > 0
        per_step_metric = np.array([load_metrics(s[None], [n])["max_over_mean"][0] for s in per_step[busy]])
        np.testing.assert_array_equal(per_step_metric, imbalance_of(per_step[busy]))
        assert stats[li]["imbalance_max"] == per_step_metric.max()
        assert stats[li]["imbalance_mean"] == per_step_metric.mean()
        # by hand, so that a shared wrong formula fails too
        assert stats[li]["imbalance_window"] == pytest.approx(tot.max() / tot.mean())
        assert stats[li]["cv"] == pytest.approx(tot.std() / tot.mean())


def test_idle_loads() -> None:
    z = np.zeros((2, 4))
    assert np.isnan(max_over_mean(z)).all()
    assert (imbalance_of(z) == 1.0).all()  # placement: an idle layer is balanced
    assert all(np.isnan(v).all() for v in balance_stats(z).values())
    assert np.isnan(load_metrics(z)["max_over_mean"]).all()
    s = balance_stats([[1, 1, 1, 1], [4, 0, 0, 0]])
    np.testing.assert_allclose(s["max_over_mean"], [1, 4])
    np.testing.assert_allclose(s["min_over_max"], [1, 0])
    np.testing.assert_allclose(s["hottest_share"], [0.25, 1])
