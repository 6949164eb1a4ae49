"""benchmarks/fairkv_decode.py end to end on CPU (--tiny), and its length and request helpers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moeload import placement
from moeload.placement.heads import split_requests

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fairkv_decode.py"
STRATEGIES = ["standard", "best_effort", "fair_copying", "balanced", "exact"]


def _module():
    spec = importlib.util.spec_from_file_location("fairkv_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_lengths_keeps_the_layer_total_exactly():
    mod = _module()
    out = mod.scale_lengths(np.array([[1.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]]), 10)
    # (10 - 1) * 4 = 36 spare keys by budget share, plus 1 each: [9, 9, 18, 0] + 1, [36, 0, 0, 0] + 1
    np.testing.assert_array_equal(out, [[10, 10, 19, 1], [37, 1, 1, 1]])
    odd = mod.scale_lengths(np.array([1.0, 1.0, 1.0]), 5)  # 12 spare over three equal heads: 4 each
    np.testing.assert_array_equal(odd, [[5, 5, 5]])
    uneven = mod.scale_lengths(np.array([2.0, 1.0]), 3)  # 4 spare: 2.67 -> 3, 1.33 -> 1; plus 1 each
    np.testing.assert_array_equal(uneven, [[4, 2]])
    with pytest.raises(SystemExit, match="positive sum"):
        mod.scale_lengths(np.zeros((1, 4)), 8)


def test_rank_pairs_serve_every_request_once():
    mod = _module()
    lengths = np.array([[90, 5, 7, 6, 30, 4, 8, 10]])
    req_len = mod.request_lengths(lengths, 5, 0.3, seed=0)  # [1, 5, 8], each request its own length
    pl = placement.plan(req_len.sum(1).astype(float), 4, 12, "fair_copying")
    per_slot = split_requests(pl, 5)
    ranks = mod.rank_pairs(pl, per_slot, req_len, 0)
    assert [len(r) for r in ranks] == [3, 3, 3, 3]  # every slot of every rank, in order
    for head in range(8):
        served = np.concatenate([lens for r in ranks for h, lens in r if h == head])
        np.testing.assert_array_equal(served, req_len[0, :, head])  # ids in slot order: none lost or twice
    assert sum(lens.sum() for r in ranks for _, lens in r) == req_len.sum()


def test_budgets_file_must_match_the_kv_heads(tmp_path):
    mod = _module()
    np.save(tmp_path / "b.npy", np.array([[1, 2, 3, 4, 5, 6, 7, 8]]))
    args = mod.parse_args(["--device", "cpu", "--tiny", "--budgets", str(tmp_path / "b.npy"), "--out", "x"])
    lengths = mod.head_lengths(args)
    assert lengths.shape == (1, 8) and lengths.sum() == args.kv_mean * 8
    assert np.all(np.diff(lengths[0]) >= 0)  # order of the budgets kept
    np.save(tmp_path / "c.npy", np.ones((2, 4)))
    args = mod.parse_args(["--device", "cpu", "--tiny", "--budgets", str(tmp_path / "c.npy"), "--out", "x"])
    with pytest.raises(SystemExit, match="4 heads per layer"):
        mod.head_lengths(args)
    with pytest.raises(SystemExit):
        mod.parse_args(["--kernel", "cudnn", "--out", "x"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--kernel", "dense", "--jitter", "0.2", "--out", "x"])


def test_tiny_run_end_to_end(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "fk.json"
    mod.main(["--device", "cpu", "--tiny", "--kernel", "nested,flex,dense", "--out", str(out)])
    res = json.loads(out.read_text())
    assert "| TP | strategy | kernel |" in capsys.readouterr().out
    assert res["kernel_errors"] == {}
    assert all(err < 1e-4 for err in res["check_max_abs_err"].values())  # every kernel = per-pair SDPA
    cfg, lengths = res["config"], np.array(res["kv_lengths"])
    assert res["group"] == cfg["q_heads"] // cfg["kv_heads"] and lengths.shape == (cfg["layers"], cfg["kv_heads"])
    np.testing.assert_array_equal(lengths.sum(1), cfg["kv_mean"] * cfg["kv_heads"])
    rows = res["rows"]
    assert {(r["tp"], r["strategy"], r["kernel"]) for r in rows} == {
        (tp, s, k) for tp in (2, 4, 8) for s in STRATEGIES for k in ("nested", "flex", "dense")}
    for r in rows:
        work, pairs, sim = np.array(r["rank_work"]), np.array(r["rank_pairs"]), np.array(r["sim_rank_load"])
        assert work.shape == pairs.shape == sim.shape == np.array(r["rank_ms"]).shape == (cfg["layers"], r["tp"])
        # every strategy does the same work: each layer's batch over every head, no request lost
        np.testing.assert_array_equal(work.sum(1), cfg["batch"] * lengths.sum(1))
        np.testing.assert_array_equal(pairs.sum(1), cfg["batch"] * cfg["kv_heads"])
        np.testing.assert_allclose(sim.sum(1), work.sum(1))  # the simulator plans the same total
        assert r["total_work"] == cfg["batch"] * lengths.sum()
        assert r["slots"] == cfg["kv_heads"] + (r["tp"] if r["strategy"] in STRATEGIES[2:] else 0)
        assert all(ms > 0 for ms_row, p_row in zip(r["rank_ms"], r["rank_pairs"]) for ms, p in zip(ms_row, p_row) if p)
        assert r["step_ms"] == pytest.approx(np.array(r["rank_ms"]).max(1).sum())
        if r["strategy"] == "standard":
            assert r["predicted_speedup"] == r["measured_speedup"] == 1.0
            np.testing.assert_array_equal(pairs, cfg["batch"] * cfg["kv_heads"] // r["tp"])  # H / TP heads each
        if r["strategy"] == "fair_copying":
            best = next(b for b in rows if (b["tp"], b["strategy"], b["kernel"]) == (r["tp"], "best_effort", r["kernel"]))
            assert r["predicted_speedup"] >= best["predicted_speedup"] - 1e-9
            assert r["imbalance"] < 1.05
