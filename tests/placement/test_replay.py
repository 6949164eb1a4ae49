"""Replay simulator and comparison table on synthetic traces with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from moeload import placement
from moeload.errors import InputError


def shifting_trace(steps=240, layers=2, experts=8, period=40, seed=0) -> np.ndarray:
    """Counts [S, L, E]: one hot expert per layer that jumps to a new expert every `period` steps."""
    rng = np.random.default_rng(seed)
    counts = np.empty((steps, layers, experts), dtype=np.int64)
    for s in range(steps):
        for layer in range(layers):
            p = np.full(experts, 1.0)
            p[(s // period * 3 + layer) % experts] = 12.0
            counts[s, layer] = rng.multinomial(2048, p / p.sum())
    return counts


def test_oracle_is_strictly_best_when_hot_expert_jumps():
    counts = shifting_trace()
    kw = dict(num_gpus=4, num_replicas=12, policy="eplb", replan_every=40, window=40)
    oracle = placement.replay(counts, oracle=True, **kw)
    forecast = placement.replay(counts, predictor="sw_avg", predictor_kwargs={"window": 40, "slide": False}, **kw)
    static = placement.replay(counts, 4, 8, "contiguous", replan_every=240)
    assert oracle.imbalance < forecast.imbalance - 0.1
    assert oracle.imbalance < static.imbalance - 0.1
    assert oracle.step_imbalance.shape == (240, 2)
    assert len(oracle.replans) == 6 and list(oracle.replans["start"]) == [0, 40, 80, 120, 160, 200]
    assert oracle.replans["moves"].iloc[0] == 0 and oracle.replans["moves"].iloc[1:].gt(0).all()


def test_static_replay_equals_direct_evaluation():
    counts = shifting_trace(steps=50)
    result = placement.replay(counts, 4, 8, "contiguous", replan_every=50)
    direct = placement.plan(np.ones((2, 8)), 4, 8, "contiguous").evaluate(counts).imbalance
    np.testing.assert_allclose(result.step_imbalance, direct)
    assert result.summary()["replans"] == 1 and result.summary()["moves_per_replan"] == 0.0


def test_compare_table_rows_and_oracle_beats_forecasts():
    counts = shifting_trace()
    table = placement.compare(counts, 4, 12, replan_every=40, window=40, vllm_window=100, vllm_replan_every=120)
    assert table["scenario"].iloc[0] == "static contiguous"
    assert table["best_forecast"].sum() == 1
    oracle = table.loc[table["scenario"] == "balanced + oracle", "imbalance"].item()
    forecasts = table.loc[table["scenario"].str.startswith("balanced + ") & (table["predictor"] != "oracle")]
    assert oracle < forecasts["imbalance"].min()
    vllm = table.loc[table["scenario"].str.startswith("EPLB + moving"), "replans"].item()
    assert vllm == 2


@pytest.mark.parametrize("kwargs, needle", [
    (dict(counts=np.ones((4, 8)), num_gpus=2), "[S, L, E]"),
    (dict(counts=np.ones((4, 1, 8)), num_gpus=2, replan_every=0), "replan_every"),
    (dict(counts=np.ones((4, 1, 8)), num_gpus=2, window=-1), "window"),
])
def test_replay_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(InputError) as err:
        placement.replay(**kwargs)
    assert needle in str(err.value)
