"""`moeload heads`: the head-plan verdict from budgets, and bad input as one line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from moeload.cli import app
from moeload.placement.heads import DecodeCost, head_decode_table

runner = CliRunner()


def budgets(tmp_path, sigma=1.0, shape=(3, 8), scale=8192):
    b = np.random.default_rng(0).lognormal(0, sigma, size=shape) * scale
    p = tmp_path / "b.npy"
    np.save(p, b)
    return p, b


def test_json_matches_the_library_and_names_the_fastest(tmp_path):
    p, b = budgets(tmp_path)
    r = runner.invoke(app, ["heads", str(p), "--requests", "32", "--tp", "2,8", "--exact-time-limit", "0", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["calibration"].startswith("moeload's default")  # the H200 fit, said so, not passed off as yours
    lib = head_decode_table(b, 32, (2, 8), cost=DecodeCost(), exact_time_limit=None)
    assert [row["speedup"] for row in d["rows"]] == lib.speedup.tolist()
    for v in d["verdicts"]:
        rows = [row for row in d["rows"] if row["tp"] == v["tp"]]
        assert v["speedup"] == max(row["speedup"] for row in rows)
        assert ("copy" in v["advice"]) == (next(row for row in rows if row["strategy"] == v["strategy"])["slots"] > 8)


def test_calls_that_cost_more_turn_the_verdict(tmp_path):
    p, _ = budgets(tmp_path, scale=64)  # little KV per head: calls dominate
    cheap = runner.invoke(app, ["heads", str(p), "--requests", "4", "--tp", "2", "--exact-time-limit", "0",
                                "--call-us", "0", "--fixed-us", "0", "--json"])
    dear = runner.invoke(app, ["heads", str(p), "--requests", "4", "--tp", "2", "--exact-time-limit", "0",
                               "--call-us", "100", "--json"])
    assert cheap.exit_code == dear.exit_code == 0
    assert json.loads(cheap.stdout)["calibration"] == json.loads(dear.stdout)["calibration"] == "given"
    v_cheap, v_dear = json.loads(cheap.stdout)["verdicts"][0], json.loads(dear.stdout)["verdicts"][0]
    assert v_cheap["advice"] == "copy heads" and v_dear["advice"] != "copy heads"


def test_table_prints_a_verdict_per_tp(tmp_path):
    p, _ = budgets(tmp_path)
    r = runner.invoke(app, ["heads", str(p), "--tp", "2,4", "--exact-time-limit", "0"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "TP 2:" in r.stdout and "TP 4:" in r.stdout and "cost-model" in r.stdout


def test_bad_input_is_one_line_exit_2(tmp_path):
    p, _ = budgets(tmp_path)
    (tmp_path / "text.npy").write_text("not numpy")
    np.save(tmp_path / "obj.npy", np.array([{}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "neg.npy", -np.ones((2, 4)))
    np.save(tmp_path / "wide.npy", np.ones((1, 5000)))
    cases = [
        ([str(tmp_path / "missing.npy")], "no such file"),
        ([str(tmp_path / "text.npy")], "not a NumPy .npy file"),
        ([str(tmp_path / "obj.npy")], "array of numbers"),
        ([str(tmp_path / "neg.npy")], "non-negative"),
        ([str(tmp_path / "wide.npy")], "heads per layer"),
        ([str(p), "--tp", "3"], "do not divide"),
        ([str(p), "--tp", "x"], "comma-separated integers"),
        ([str(p), "--requests", "0"], "requests"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["heads", *args])
        assert r.exit_code == 2, (args, r.output)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert msg in r.stderr, (args, r.stderr)
        if "--requests" not in args:  # typer's own range check prints its usage box
            assert len(lines) == 1, (args, r.stderr)
