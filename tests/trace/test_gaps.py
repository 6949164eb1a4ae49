"""Trace.gaps: missing step ranges between the first and last recorded step, per split."""

from __future__ import annotations

import numpy as np

from moeload import open_trace
from moeload.trace import Manifest, TraceWriter


def _write(path, blocks, split="train"):
    m = Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=1)
    with TraceWriter(path, m) as w:
        for steps in blocks:
            steps = np.asarray(steps)
            w.write_block(steps, np.ones((len(steps), 2, 4), int), split=split)
    return open_trace(path)


def test_gaps_are_inclusive_ranges_between_recorded_steps(tmp_path):
    t = _write(tmp_path / "t", [[0, 1, 2], [5, 6], [9], [10, 11, 20]])
    assert t.gaps() == [(3, 4), (7, 8), (12, 19)]
    assert t.gaps("eval") == []


def test_no_gaps_for_contiguous_short_or_empty_traces(tmp_path):
    assert _write(tmp_path / "a", [range(10)]).gaps() == []
    assert _write(tmp_path / "b", [[7]]).gaps() == []
    assert _write(tmp_path / "c", []).gaps() == []


def test_resumed_run_supersedes_later_steps_and_splits_are_separate(tmp_path):
    _write(tmp_path / "t", [[0, 1, 2, 8, 9]])
    t = _write(tmp_path / "t", [[3, 4, 5]])  # a run resumed at step 3: 8, 9 belong to the abandoned run
    assert t.gaps() == [] and t.superseded() == [(8, 9)] and t.steps.tolist() == [0, 1, 2, 3, 4, 5]
    t = _write(tmp_path / "t", [[0, 4]], split="eval")
    assert t.gaps("eval") == [(1, 3)] and t.gaps() == [] and t.steps.tolist() == [0, 1, 2, 3, 4, 5]
