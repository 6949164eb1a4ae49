"""A run resumed from a checkpoint supersedes what the abandoned run wrote past the restart step."""

import json

import numpy as np

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter, open_trace
from moeload.trace.manifest import MANIFEST_NAME


def _manifest() -> Manifest:
    return Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=1, framework="synthetic")


def _counts(rng, n):
    return rng.integers(0, 50, size=(n, 2, 4))


def test_resumed_run_hides_abandoned_steps_beyond_its_restart(tmp_path):
    rng = np.random.default_rng(0)
    first, second = _counts(rng, 60), _counts(rng, 20)
    with TraceWriter(tmp_path / "t", _manifest()) as w:  # crashed run: steps 0..59
        for a in range(0, 60, 10):
            w.write_block(np.arange(a, a + 10), first[a : a + 10])
    with TraceWriter(tmp_path / "t", _manifest()) as w:  # resumed from step 20, died again at 39
        w.write_block(np.arange(20, 40), second)
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(40))
    assert t.superseded() == [(40, 59)]
    assert t.gaps() == []
    np.testing.assert_array_equal(t.counts((0, 20)), first[:20])
    np.testing.assert_array_equal(t.counts((20, 40)), second)
    sessions = t.meta["sessions"]
    assert [s["first_seq"] for s in sessions] == [0, 6]

    # a third run resumed from step 30 of the second: 30..39 of the second are now stale too
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(30, 35), _counts(rng, 5))
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(35))
    assert t.superseded() == [(35, 59)]


def test_continuation_past_the_end_supersedes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(10), _counts(rng, 10))
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(15, 20), _counts(rng, 5))
    t = open_trace(tmp_path / "t")
    assert t.superseded() == []
    assert t.gaps() == [(10, 14)]


def test_sessions_without_first_seq_keep_the_step_by_step_rule(tmp_path):
    rng = np.random.default_rng(2)
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(20), _counts(rng, 20))
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(5, 10), _counts(rng, 5))
    mpath = tmp_path / "t" / MANIFEST_NAME
    d = json.loads(mpath.read_text())
    for s in d["sessions"]:
        del s["first_seq"]  # as written by moeload before sessions carried it
    mpath.write_text(json.dumps(d))
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(20)) and t.superseded() == []


def test_info_reports_superseded_steps(tmp_path, capsys):
    rng = np.random.default_rng(3)
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(30), _counts(rng, 30))
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(10, 15), _counts(rng, 5))
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["info", str(tmp_path / "t"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["superseded"] == [[15, 29]]
    r = CliRunner().invoke(app, ["info", str(tmp_path / "t")])
    assert "superseded" in r.stdout and "15..29" in r.stdout


def test_writer_removes_only_its_own_ranks_leftover_temporaries(tmp_path):
    rng = np.random.default_rng(4)
    with TraceWriter(tmp_path / "t", _manifest()) as w:
        w.write_block(np.arange(5), _counts(rng, 5))
    parts = tmp_path / "t" / "parts"
    mine = parts / ".part-000001-r0-train-s000000005-000000009.parquet.tmp"
    other = parts / ".part-000001-r1-train-s000000005-000000009.parquet.tmp"
    mine.write_bytes(b"half")
    other.write_bytes(b"half")
    TraceWriter(tmp_path / "t", _manifest()).close()
    assert not mine.exists() and other.exists()
