"""`moeload info` shows step gaps and the fault notes that tracing writes into manifest `extra`."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter

runner = CliRunner()

NOTES = {
    "lost_steps": [{"first": 10, "last": 19, "split": "train", "reason": "disk full (ENOSPC)"}],
    "dropped_blocks": 1,
    "conservation": {"checked_blocks": 4, "violations_total": 1,
                     "violations": [{"layer": "b", "first": 0, "last": 9, "rank": None, "problem": "sum 6 != 8"}]},
    "disabled_layers": {"a": {"step": 3, "ranks": [1], "reason": "router output of shape (2,)"}},
    "hook_errors": {"a": "RuntimeError: boom"},
    "tracing_stopped": {"step": 25, "reason": "all_gather timed out after 30 s"},
}


def _trace(path, extra=None):
    m = Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=2, extra=extra or {})
    with TraceWriter(path, m) as w:
        w.write_block(np.arange(10), np.ones((10, 2, 4), int))
        w.write_block(np.arange(20, 26), np.ones((6, 2, 4), int))
    return path


def test_info_shows_gaps_and_every_fault_note(tmp_path):
    t = _trace(tmp_path / "t", NOTES)
    d = json.loads(runner.invoke(app, ["info", str(t), "--json"]).stdout)
    assert d["gaps"] == [[10, 19]] and d["missing_steps"] == 10
    for k, v in NOTES.items():
        assert d[k] == v
    out = " ".join(runner.invoke(app, ["info", str(t)], env={"COLUMNS": "400"}).stdout.split())
    for needle in ("10 step(s) missing in 1 range(s): 10..19", "10..19 train (disk full (ENOSPC))",
                   "dropped blocks", "4 block(s) checked, 1 violation(s); b steps 0..9: sum 6 != 8",
                   "a at step 3 ranks [1]: router output", "a: RuntimeError: boom",
                   "at step 25: all_gather timed out"):
        assert needle in out, needle


def test_info_is_quiet_about_faults_when_there_are_none(tmp_path):
    m = Manifest(layers=["a"], experts_per_layer=[4])
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_block(np.arange(5), np.ones((5, 1, 4), int))
    d = json.loads(runner.invoke(app, ["info", str(tmp_path / "t"), "--json"]).stdout)
    assert d["gaps"] == [] and d["missing_steps"] == 0 and not set(NOTES) & set(d)
    out = runner.invoke(app, ["info", str(tmp_path / "t")]).stdout
    assert "gaps" not in out and "lost" not in out and "conservation" not in out


def test_info_shows_a_malformed_note_as_text(tmp_path):
    t = _trace(tmp_path / "t", {"lost_steps": "oops", "tracing_stopped": [1, 2]})
    r = runner.invoke(app, ["info", str(t)])
    assert r.exit_code == 0 and "oops" in r.stdout and "[1, 2]" in r.stdout
