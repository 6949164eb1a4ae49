"""`moeload replay` (which replaced the argparse `python -m moeload.placement`): its rows are
`placement.compare` on the trace's counts; sizes that do not divide are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from moeload import open_trace
from moeload.cli import app
from moeload.placement import compare
from moeload.trace import Manifest, TraceWriter


def _trace(path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(60, 2, 8)) * np.array([4, 1, 1, 1, 1, 1, 1, 2])  # two hot experts
    with TraceWriter(path, Manifest(layers=["a", "b"], experts_per_layer=[8, 8], top_k=2), fsync=False) as w:
        w.write_block(np.arange(60), counts)
    return counts


def test_replay_rows_are_compare_on_the_trace(tmp_path):
    counts = _trace(tmp_path / "t")
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "t"), "--gpus", "4", "--replan-every", "10", "--window", "20",
                                 "--skip", "5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    want = compare(open_trace(tmp_path / "t").counts()[5:], 4, 12, replan_every=10, window=20)
    assert got["steps"] == 55 and got["slots"] == 12 and len(got["rows"]) == len(want)
    for row, (_, w) in zip(got["rows"], want.iterrows()):
        for k, v in w.items():
            if isinstance(v, float):
                assert row[k] is None if np.isnan(v) else abs(row[k] - v) < 1e-9, (k, row[k], v)
    assert counts.shape == (60, 2, 8)


def test_replay_sizes_that_do_not_divide_are_one_line(tmp_path):
    _trace(tmp_path / "t")
    r = CliRunner().invoke(app, ["replay", str(tmp_path / "t"), "--gpus", "3"])
    assert r.exit_code == 2 and "must both divide over --gpus 3" in r.output
