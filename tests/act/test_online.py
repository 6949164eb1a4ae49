"""OnlinePlanner: re-placement plans from flushed blocks, on a synthetic feed with a known gain and
on the embedded workload trained with a LoadTracer."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest

from moeload import LoadTracer, open_trace, predictors
from moeload.errors import InputError
from moeload.online import OnlinePlanner
from moeload.workloads import build_model, get_config, train

S, L, E, G, N = 20, 2, 8, 4, 8192  # steps per block, layers, experts, GPUs, assignments per step and layer
HOT = 0.3  # share of each of the two hot experts; the six others share the rest


def loads(hot: tuple[int, int]) -> np.ndarray:
    """[E] proportions: two hot experts at HOT, the others equal."""
    p = np.full(E, (1 - 2 * HOT) / (E - 2))
    p[list(hot)] = HOT
    return p


def block(rng: np.random.Generator, i: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block i: steps [S], multinomial counts [S, L, E] drawn from p: [E] (every layer) or [L, E]."""
    p = np.broadcast_to(p, (L, E))
    return np.arange(i * S, (i + 1) * S), np.stack([rng.multinomial(N, p[j], size=S) for j in range(L)], axis=1)


def by_hand(hot_on_one_gpu: bool) -> tuple[float, float]:
    """(max/mean, cv) of the GPU loads with two hot experts together on one GPU or apart.

    Together: [2 HOT, 2c, 2c, 2c]; apart (each hot expert with one cold one): [HOT + c, HOT + c, 2c, 2c]."""
    c = (1 - 2 * HOT) / (E - 2)
    g = np.array([2 * HOT, 2 * c, 2 * c, 2 * c] if hot_on_one_gpu else [HOT + c, HOT + c, 2 * c, 2 * c])
    return g.max() / g.mean(), g.std() / g.mean()


def planner(tmp_path, **kw) -> OnlinePlanner:
    # sw_avg over exactly one block: the forecast at a flush is that block's mean load
    kw.setdefault("predictor", predictors.get("sw_avg", window=S))
    return OnlinePlanner(num_gpus=G, horizon=S, window=10, out_dir=tmp_path / "plans", **kw)


def test_shift_replans_at_the_right_flush_with_the_predicted_gain(tmp_path, caplog):
    rng = np.random.default_rng(0)
    pl = planner(tmp_path)
    with caplog.at_level(logging.INFO, logger="moeload.online"):
        for i in range(4):  # experts 0 and 1 hot: both on GPU 0 under the contiguous start
            pl.feed(*block(rng, i, loads((0, 1))))
        # the shift: in each layer, two cold experts that share a GPU in the current plan become hot
        pairs = []
        for j in range(L):
            gpu_of = np.empty(E, int)
            gpu_of[pl.current.phy2log[j]] = np.arange(E) // (E // G)
            pairs.append(next((a, b) for a in range(2, E) for b in range(a + 1, E) if gpu_of[a] == gpu_of[b]))
        for i in range(4, 7):
            pl.feed(*block(rng, i, np.stack([loads(pr) for pr in pairs])))
    replanned = [d["step"] for d in pl.history if d["replanned"]]
    assert replanned == [S - 1, 5 * S - 1]  # the first flush, and the first flush after the shift; steady: none
    assert [d["step"] for d in pl.history] == [S * (i + 1) - 1 for i in range(7)]
    (together, cv_t), (apart, cv_a) = by_hand(True), by_hand(False)
    for k in (0, 4):
        d = pl.history[k]
        assert d["imbalance_before"] == pytest.approx(together, rel=0.02)
        assert d["imbalance_after"] == pytest.approx(apart, rel=0.02)
        assert d["gain"] == pytest.approx(1 - apart / together, abs=0.01)
        assert d["cv_drop"] == pytest.approx(cv_t - cv_a, abs=0.01)
    assert all(d["gain"] < 0.05 for k, d in enumerate(pl.history) if k not in (0, 4))
    files = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert files == ["plan-000000019.json", "plan-000000099.json"]  # atomic: no temporary files left
    doc = json.loads((tmp_path / "plans" / files[1]).read_text())
    assert doc["layers"] == ["layer0", "layer1"] and doc["previous_plan"] == files[0]
    assert doc["predictor"]["name"] == "sw_avg" and doc["predictor"]["params"]["window"] == S
    phy2log = np.array(doc["phy2log"])
    assert phy2log.shape == (L, E) and (np.sort(phy2log, axis=1) == np.arange(E)).all()
    np.testing.assert_array_equal(phy2log, pl.current.phy2log)
    log2phy = np.array(doc["log2phy"])  # [L, E, 1]: slot of each expert
    assert (np.take_along_axis(phy2log, log2phy[..., 0], 1) == np.arange(E)).all()
    assert doc["replica_counts"] == [[1] * E] * L
    for j, (a, b) in enumerate(pairs):  # the new hot pair is split
        assert log2phy[j, a, 0] // (E // G) != log2phy[j, b, 0] // (E // G)
    pred = doc["predicted"]
    gl = np.array(pred["gpu_load_after"])  # [L, G] assignments per step
    assert gl.shape == (L, G) and gl.sum(1) == pytest.approx([N] * L, rel=1e-9)
    assert max(pred["imbalance_after"]) < min(pred["imbalance_before"])
    # the detector saw the shift: each layer is transient, or stable again only since a step after it
    assert [s["layer"] for s in doc["states"]] == ["layer0", "layer1"]
    assert all(s["state"] == "transient" or s["stable_since"] >= 4 * S for s in doc["states"])
    lines = [r.getMessage() for r in caplog.records if r.name == "moeload.online"]
    assert len(lines) == 2 and "step 99: re-placement plan-000000099.json" in lines[1] and "gain 3" in lines[1]


def test_cv_threshold_and_state_dict_carry_the_plan_over_a_restart(tmp_path):
    rng = np.random.default_rng(1)
    together, apart = by_hand(True)[1], by_hand(False)[1]
    strict = planner(tmp_path / "strict", min_cv_drop=(together - apart) + 0.05)  # more than the shift can give
    mind = planner(tmp_path / "mind", min_cv_drop=0.08)
    blocks = [block(rng, i, loads((0, 1))) for i in range(2)]
    for b in blocks:
        strict.feed(*b)
        mind.feed(*b)
    assert [d["replanned"] for d in strict.history] == [False, False] and strict.plans_written == 0
    assert [d["replanned"] for d in mind.history] == [True, False]
    state = json.loads(json.dumps(mind.state_dict()))  # JSON-friendly
    resumed = planner(tmp_path / "resumed", min_cv_drop=0.08)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.current.phy2log, mind.current.phy2log)
    assert resumed.history == mind.history and resumed.current_file == "plan-000000019.json"
    resumed.feed(*block(rng, 1, loads((0, 1))))  # a resumed run replays step 20..39: same loads, no new plan
    assert resumed.history[-1]["replanned"] is False and resumed.plans_written == 1
    with pytest.raises(InputError, match="4 GPUs"):
        OnlinePlanner(num_gpus=2).load_state_dict(state)


def test_bad_settings_raise_before_training():
    with pytest.raises(InputError, match="not both"):
        OnlinePlanner(num_gpus=4, min_gain=0.1, min_cv_drop=0.1)
    with pytest.raises(InputError, match="predictor"):
        OnlinePlanner(num_gpus=4, predictor="no-such")
    with pytest.raises(InputError, match="policy"):
        OnlinePlanner(num_gpus=4, policy="no-such")
    with pytest.raises(InputError, match="num_gpus=3"):
        OnlinePlanner(num_gpus=3).feed(np.arange(2), np.ones((2, 1, 8), np.int64))
    with pytest.raises(InputError, match="integer"):
        OnlinePlanner(num_gpus=4).feed(np.arange(2), np.full((2, 1, 8), 0.125))


# the embedded workload, MoE in both blocks, 8 experts: 2 gates
CFG = get_config("tiny").replace(name="tiny-8", moe_every=1, n_experts=8)


def test_attached_to_a_tracer_on_the_workload_matches_a_replay_of_the_trace(tmp_path):
    model = build_model(CFG, 0)
    tr = LoadTracer(model, tmp_path / "t", flush_every=5)
    online = OnlinePlanner(tr, num_gpus=4, horizon=10, window=10, out_dir=tmp_path / "plans")
    assert online.layers == tr.layers and online.top_k == [2, 2]
    with tr:
        train(CFG, steps=40, model=model, on_step=tr.callback(), progress=False)
    assert online.error is None and [d["step"] for d in online.history] == list(range(4, 40, 5))
    written = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert written == [f"plan-{d['step']:09d}.json" for d in online.history if d["replanned"]] and written
    for name in written:
        doc = json.loads((tmp_path / "plans" / name).read_text())
        assert doc["layers"] == tr.layers and doc["predictor"]["name"] == "sw_avg"
        assert doc["predicted"]["mean_imbalance_after"] < doc["predicted"]["mean_imbalance_before"] * 0.95
    # the same decisions from the trace on disk, fed block by block without a tracer
    t = open_trace(tmp_path / "t")
    replay = OnlinePlanner(num_gpus=4, horizon=10, window=10, layers=t.layers, top_k=2)
    c = t.counts()
    for i in range(0, 40, 5):
        replay.feed(t.steps[i : i + 5], c[i : i + 5])
    for a, b in zip(online.history, replay.history):
        assert a["replanned"] == b["replanned"] and a["gain"] == pytest.approx(b["gain"], abs=1e-12)
        assert a["stable_layers"] == b["stable_layers"]
    np.testing.assert_array_equal(online.current.phy2log, replay.current.phy2log)


def test_a_failure_warns_once_disables_the_planner_and_training_goes_on(tmp_path):
    model = build_model(CFG, 0)
    (tmp_path / "plans").write_text("a file where the plan directory should be")  # a real fault: mkdir fails
    tr = LoadTracer(model, tmp_path / "t", flush_every=5)
    online = OnlinePlanner(tr, num_gpus=4, horizon=5, window=10, out_dir=tmp_path / "plans", min_gain=0.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with tr:
            train(CFG, steps=15, model=model, on_step=tr.callback(), progress=False)
    msgs = [str(x.message) for x in w if "online planner disabled" in str(x.message)]
    assert len(msgs) == 1 and online.error is not None and "FileExistsError" in online.error
    assert online.history == [] and tr.errors == []
    assert open_trace(tmp_path / "t").steps.tolist() == list(range(15))
