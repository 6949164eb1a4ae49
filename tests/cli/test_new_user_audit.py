"""Findings of a new-user audit of the CLI on the committed traces."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from moeload.cli import app

runner = CliRunner()
TRACE = Path(__file__).resolve().parents[2] / "experiments/traces/gpt3-small-moe-s0.moeload"  # 3750 steps


def test_predict_flags_horizon_longer_than_history():
    r = runner.invoke(app, ["predict", str(TRACE), "--horizon", "8000"])
    assert r.exit_code == 0, r.output
    warn = [x for x in r.stderr.splitlines() if x.startswith("moeload: warning: ")]
    assert len(warn) == 1 and "--horizon 8000" in warn[0] and "3750" in warn[0], r.stderr


def test_predict_no_flag_within_history():
    r = runner.invoke(app, ["predict", str(TRACE), "--horizon", "100"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr, r.stderr


def test_plan_flags_horizon_longer_than_history():
    r = runner.invoke(app, ["plan", str(TRACE), "--horizon", "8000"])
    assert r.exit_code == 0, r.output
    warn = [x for x in r.stderr.splitlines() if x.startswith("moeload: warning: ")]
    assert len(warn) == 1 and "--horizon 8000" in warn[0] and "3750" in warn[0], r.stderr


def test_plan_no_flag_within_history():
    r = runner.invoke(app, ["plan", str(TRACE), "--horizon", "100"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr, r.stderr


def test_negative_layer_index_counts_from_the_end():  # as --layers' help and docs/trace-format.md say
    import json

    r = runner.invoke(app, ["summary", str(TRACE), "--layers", "0,-1", "--json"])
    assert r.exit_code == 0, r.output
    assert [x["layer"] for x in json.loads(r.stdout)["layers"]] == [0, 5]  # the trace has 6 layers
    r = runner.invoke(app, ["summary", str(TRACE), "--layers", "-7"])
    assert r.exit_code == 2 and "layer index -7 out of range (trace has 6)" in r.stderr, r.stderr
