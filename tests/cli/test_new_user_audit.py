"""Findings of a new-user audit of the CLI on the committed traces."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeload.cli import app

runner = CliRunner()
TRACE = Path(__file__).resolve().parents[2] / "experiments/traces/gpt3-small-moe-s0.moeload"  # 3750 steps


@pytest.mark.parametrize("command", ["predict", "plan"])
def test_horizon_longer_than_history_is_flagged(command):
    r = runner.invoke(app, [command, str(TRACE), "--horizon", "8000"])
    assert r.exit_code == 0, r.output
    warn = [x for x in r.stderr.splitlines() if x.startswith("moeload: warning: ")]
    assert len(warn) == 1 and "--horizon 8000" in warn[0] and "3750" in warn[0], r.stderr


@pytest.mark.parametrize("command", ["predict", "plan"])
def test_no_flag_within_history(command):
    r = runner.invoke(app, [command, str(TRACE), "--horizon", "100"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stderr, r.stderr


def test_negative_layer_index_counts_from_the_end():  # as --layers' help and docs/trace-format.md say
    import json

    r = runner.invoke(app, ["summary", str(TRACE), "--layers", "0,-1", "--json"])
    assert r.exit_code == 0, r.output
    assert [x["layer"] for x in json.loads(r.stdout)["layers"]] == [0, 5]  # the trace has 6 layers
    r = runner.invoke(app, ["summary", str(TRACE), "--layers", "-7"])
    assert r.exit_code == 2 and "layer index -7 out of range (trace has 6)" in r.stderr, r.stderr


def test_layer_selected_twice_is_refused():  # 5 and -1 are one layer of six: whole-model numbers would count it twice
    for spec in ("5,5", "5,-1"):
        for cmd in (["summary", str(TRACE)], ["plan", str(TRACE), "--horizon", "100"]):
            r = runner.invoke(app, [*cmd, f"--layers={spec}"])
            assert r.exit_code == 2 and "layer 5 is selected more than once" in r.stderr, (cmd, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_malformed_layer_index_is_one_line():  # '--1' and '²' used to crash int() with a traceback
    for spec in ("--1", "²"):
        r = runner.invoke(app, ["summary", str(TRACE), f"--layers={spec}"])
        assert r.exit_code == 2 and f"no layer named {spec!r}" in r.stderr, r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
