"""Bad parts: a read touching one raises TraceFormatError naming it; the other parts stay readable;
skip_bad_parts=True leaves bad parts out with one warning and shows their steps as gaps."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeload import open_trace
from moeload.errors import TraceFormatError
from moeload.trace import Manifest, TraceWriter

LAYERS = ["m.0.router", "m.1.router"]


def _trace(path, blocks=((0, 10), (10, 20), (20, 30)), seed=0, **kw):
    """Trace of 2 layers x 4 experts, one part per block of steps; -> (path, counts [30, 2, 4], parts)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 50, size=(30, 2, 4))
    m = Manifest(layers=LAYERS, experts_per_layer=[4, 4], top_k=1, **kw)
    with TraceWriter(path, m) as w:
        parts = [w.write_block(np.arange(a, b), c[a:b]) for a, b in blocks]
    return path, c, parts


def _rewrite(part, change):
    """Rewrite a part in place with change(dict of columns) applied (a malformed part, written as such)."""
    t = pq.read_table(part)
    cols = {n: t.column(n) for n in t.column_names}
    change(cols)
    pq.write_table(pa.table(cols), part)


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_footer(p):
    b = bytearray(p.read_bytes())
    for i in range(len(b) - 40, len(b) - 8):  # the thrift footer, before its length and magic
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _wrong_experts(p):
    # layer 1 rows hold 3 counts where the manifest says 4 (the part disagrees with the manifest)
    def change(cols):
        rows = [r[:3] if lay == 1 else r for r, lay in zip(cols["routed"].to_pylist(), cols["layer"].to_pylist())]
        cols["routed"] = pa.array(rows, pa.list_(pa.int32()))

    _rewrite(p, change)


def _negative(p):
    def change(cols):
        rows = cols["routed"].to_pylist()
        rows[3] = [5, -1, 0, 2]
        cols["routed"] = pa.array(rows, pa.list_(pa.int64()))

    _rewrite(p, change)


def _extra_layer(p):
    # one layer more than the manifest: a part written for another model
    def change(cols):
        cols["layer"] = pa.array(np.where(np.asarray(cols["layer"]) == 1, 2, 0).astype(np.int32))

    _rewrite(p, change)


def _missing_column(p):
    _rewrite(p, lambda cols: cols.pop("routed"))


def _rows_dropped(p):
    t = pq.read_table(p)
    pq.write_table(t.slice(0, t.num_rows - 1), p)


def _float_counts(p):
    def change(cols):
        cols["routed"] = pa.array(cols["routed"].to_pylist(), pa.list_(pa.float64()))

    _rewrite(p, change)


DAMAGE = {
    "truncated": (_truncate, "unreadable Parquet part"),
    "footer bytes flipped": (_flip_footer, "unreadable Parquet part"),
    "expert count differs from manifest": (_wrong_experts, "have 3 experts, manifest says 4"),
    "negative count": (_negative, "negative count (-1)"),
    "layer id outside manifest": (_extra_layer, "layer id 2 outside 0..1"),
    "missing column": (_missing_column, "missing column(s) ['routed']"),
    "rows missing": (_rows_dropped, "19 rows, expected 10 steps x 2"),
    "float counts": (_float_counts, "expected list<int>"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_part_fails_only_reads_that_touch_it(tmp_path, case):
    damage, needle = DAMAGE[case]
    path, c, parts = _trace(tmp_path / "t")
    damage(parts[1])  # steps 10..19
    t = open_trace(path)  # reads only the manifest
    with pytest.raises(TraceFormatError) as e:
        t.counts()
    msg = _one_line(e, str(parts[1]), needle)
    assert msg.count(str(parts[1])) == 1  # the part is named once, its problem not wrapped in another
    with pytest.raises(TraceFormatError, match="skip_bad_parts"):
        t.counts((5, 15))
    with pytest.raises(TraceFormatError):
        t.counts([0, 13])
    # steps of the good parts stay readable, by range or by explicit steps
    np.testing.assert_array_equal(t.counts((0, 10)), c[:10])
    np.testing.assert_array_equal(t.counts((20, 30), layers=[1]), c[20:, 1:])
    np.testing.assert_array_equal(t.counts([3, 25]), c[[3, 25]])


@pytest.mark.parametrize("case", list(DAMAGE))
def test_skip_bad_parts_warns_once_and_reports_them_as_gaps(tmp_path, case):
    damage, needle = DAMAGE[case]
    path, c, parts = _trace(tmp_path / "t")
    damage(parts[1])
    t = open_trace(path, skip_bad_parts=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        steps = t.steps
        got = t.counts()
        t.proportions()
    assert len(w) == 1 and parts[1].name in str(w[0].message) and needle in str(w[0].message)
    assert steps.tolist() == list(range(10)) + list(range(20, 30))
    np.testing.assert_array_equal(got, c[np.r_[0:10, 20:30]])
    assert t.gaps() == [(10, 19)]
    assert [p for p, _ in t.bad_parts] == [parts[1]] and needle in t.bad_parts[0][1]


def test_skipped_last_part_still_shows_as_a_gap_and_every_bad_part_is_listed(tmp_path):
    path, c, parts = _trace(tmp_path / "t")
    _truncate(parts[2])
    _negative(parts[0])
    t = open_trace(path, skip_bad_parts=True)
    with pytest.warns(UserWarning, match="skipped 2 bad part") as w:
        assert t.steps.tolist() == list(range(10, 20))
    assert len(w) == 1
    assert t.gaps() == [(0, 9), (20, 29)]
    assert [p for p, _ in t.bad_parts] == [parts[0], parts[2]]


def test_bad_newer_part_does_not_bring_back_the_steps_it_replaced(tmp_path):
    path, c, _ = _trace(tmp_path / "t", blocks=((0, 20),))
    m = Manifest(layers=LAYERS, experts_per_layer=[4, 4], top_k=1)
    with TraceWriter(path, m) as w:  # a resumed run rewrote steps 15..24, and that part is damaged
        newer = w.write_block(np.arange(15, 25), c[15:25])
    _truncate(newer)
    t = open_trace(path)
    np.testing.assert_array_equal(t.counts((0, 15)), c[:15])
    with pytest.raises(TraceFormatError, match="unreadable"):
        t.counts((14, 16))
    t = open_trace(path, skip_bad_parts=True)
    with pytest.warns(UserWarning):
        assert t.steps.tolist() == list(range(15))
    assert t.gaps() == [(15, 24)]


def test_parts_that_disagree_with_each_other(tmp_path):
    # a part of a 3-expert model copied next to parts of the 4-expert trace
    path, c, parts = _trace(tmp_path / "t")
    other, _, oparts = _trace(tmp_path / "o", blocks=((30, 30),))
    m = Manifest(layers=LAYERS, experts_per_layer=[3, 3], top_k=1)
    with TraceWriter(tmp_path / "o3", m) as w:
        alien = w.write_block(np.arange(30, 35), np.ones((5, 2, 3), int))
    moved = parts[0].parent / alien.name.replace("part-000000", "part-000009")
    alien.rename(moved)
    t = open_trace(path)
    np.testing.assert_array_equal(t.counts((0, 30)), c)
    with pytest.raises(TraceFormatError) as e:
        t.counts((30, 35))
    _one_line(e, moved.name, "have 3 experts, manifest says 4")
    t = open_trace(path, skip_bad_parts=True)
    with pytest.warns(UserWarning, match="manifest says 4"):
        assert t.steps[-1] == 29
    assert t.gaps() == [(30, 34)]


def test_empty_trace_reads_as_zero_steps(tmp_path):
    m = Manifest(layers=LAYERS, experts_per_layer=[4, 4], top_k=1)
    TraceWriter(tmp_path / "t", m).close()
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == [] and t.gaps() == [] and t.bad_parts == []
    assert t.counts().shape == (0, 2, 4) and t.proportions().shape == (0, 2, 4)
    assert t.to_pandas().empty
    with pytest.raises(TraceFormatError, match="not recorded"):
        t.counts([0])


def test_reads_of_a_healthy_trace_do_not_warn(tmp_path):
    path, c, _ = _trace(tmp_path / "t", world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = open_trace(path, skip_bad_parts=True)
        np.testing.assert_array_equal(t.counts(), c)
        assert t.bad_parts == [] and t.gaps() == []
