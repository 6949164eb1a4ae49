"""Issue 13, hostile traces at the reader and manifest level: manifest fields of the wrong type or
range, step and layer selections, count columns of unsigned types and int64 overflow, parts whose
content disagrees with their file name. Every refusal is one line naming the file and the problem."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeload.cli import app
from moeload.cli.check import check_data
from moeload.errors import InputError, MoeloadError, TraceFormatError
from moeload.trace import Manifest, TraceWriter, open_trace
from moeload.trace.manifest import MANIFEST_MAX_BYTES, MANIFEST_NAME
from tests.cli._cli import one_line_error


def _write(path: Path, n: int = 12, **kw) -> np.ndarray:
    """A real two-layer trace of n steps in blocks of 4 -> counts [n, 2, 4]."""
    c = np.random.default_rng(0).integers(0, 50, size=(n, 2, 4))
    with TraceWriter(path, Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=1, **kw)) as w:
        for a in range(0, n, 4):
            w.write_block(np.arange(a, a + 4), c[a : a + 4])
    return c


def _edit_manifest(path: Path, **fields) -> Path:
    mpath = path / MANIFEST_NAME
    d = json.loads(mpath.read_text())
    d.update(fields)
    mpath.write_text(json.dumps(d))
    return mpath


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert isinstance(e.value, MoeloadError) and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---- 1. manifest fields: types and ranges, refused on open, never coerced ----------------------

BAD_FIELDS = [
    ("layers", "ab"),  # used to become the one-letter layers ['a', 'b']
    ("layers", ["a", 1]),
    ("layers", {"a": 1}),
    ("experts_per_layer", 8.9),  # used to become 8
    ("experts_per_layer", [4, 8.9]),
    ("experts_per_layer", [4, math.nan]),
    ("experts_per_layer", [4, True]),
    ("experts_per_layer", [4, -4]),
    ("experts_per_layer", True),
    ("experts_per_layer", "4"),
    ("top_k", [1, 1.5]),
    ("world_size", math.nan),  # used to pass: NaN < 1 is false
    ("world_size", 2.5),
    ("world_size", 0),
    ("world_size", True),
    ("ep_size", -1),
    ("schema_version", -1),
    ("schema_version", 1.0),
    ("schema_version", True),
    ("schema_version", "1"),
    ("schema_version", 2),
    ("extra", [1, 2]),
    ("extra", "notes"),
    ("sessions", {"pid": 1}),
    ("sessions", ["x"]),
    ("sessions", [{"writer_rank": "0", "first_seq": 0}]),
    ("sessions", [{"writer_rank": 0, "first_seq": 1.5}]),
    ("ranks_recorded", "yes"),
    ("expert_to_rank", [[0, 0.5, 0, 0], [0, 0, 0, 0]]),  # fractional ranks made gpu_loads all zero
    ("count_kind", ["routed"]),
    ("flush_every", 2.5),
    ("tokens_per_step", "many"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_manifest_field_of_wrong_type_or_range_is_refused_naming_file_and_field(tmp_path, field, value):
    _write(tmp_path / "t")
    mpath = _edit_manifest(tmp_path / "t", **{field: value})
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")
    _one_line(e, str(mpath), field.split("[")[0])


def test_writer_rank_string_in_sessions_is_refused_when_resuming(tmp_path):
    _write(tmp_path / "t")
    mpath = _edit_manifest(tmp_path / "t", sessions=[{"writer_rank": "zero", "first_seq": 0}])
    with pytest.raises(TraceFormatError) as e:
        _write(tmp_path / "t")
    _one_line(e, str(mpath), "writer_rank")
    mpath = _edit_manifest(tmp_path / "t", sessions="not a list")  # used to be an AttributeError
    with pytest.raises(TraceFormatError) as e:
        _write(tmp_path / "t")
    _one_line(e, str(mpath), "sessions")


def test_manifest_of_good_types_still_reads_and_broadcasts_int_fields(tmp_path):
    c = _write(tmp_path / "t")
    _edit_manifest(tmp_path / "t", experts_per_layer=4, top_k=1, extra={"note": 1}, schema_version=0)
    t = open_trace(tmp_path / "t")
    assert t.experts_per_layer == [4, 4] and t.top_k == [1, 1] and t.meta["extra"]["note"] == 1
    np.testing.assert_array_equal(t.counts(), c)
    m = Manifest(layers=("a",), experts_per_layer=[np.int64(4)], world_size=np.int32(2))
    assert m.experts_per_layer == [4] and type(m.experts_per_layer[0]) is int and m.world_size == 2


def test_manifest_type_error_is_one_cli_line(tmp_path):
    _write(tmp_path / "t")
    _edit_manifest(tmp_path / "t", layers="ab")
    r = CliRunner().invoke(app, ["info", str(tmp_path / "t")])
    one_line_error(r, str(tmp_path / "t" / MANIFEST_NAME), "'layers'")


@pytest.mark.parametrize("content", ["[" * 100_000, '{"layers": [' + "9" * 5000 + "]}"], ids=["nested", "5000-digit"])
def test_manifest_deeply_nested_or_huge_integer_is_one_line(tmp_path, content):
    _write(tmp_path / "t")
    (tmp_path / "t" / MANIFEST_NAME).write_text(content)
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")
    _one_line(e, str(tmp_path / "t" / MANIFEST_NAME))


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_manifest_fifo_or_device_is_refused_without_blocking(tmp_path, kind):
    _write(tmp_path / "t")
    mpath = tmp_path / "t" / MANIFEST_NAME
    mpath.unlink()
    if kind == "fifo":
        os.mkfifo(mpath)
    else:
        mpath.symlink_to(kind)
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")
    _one_line(e, str(mpath), "not a regular file")


def test_manifest_over_the_size_limit_is_refused(tmp_path):
    _write(tmp_path / "t")
    mpath = tmp_path / "t" / MANIFEST_NAME
    d = json.loads(mpath.read_text())
    d["extra"] = {"pad": "x" * (MANIFEST_MAX_BYTES + 1)}
    mpath.write_text(json.dumps(d))
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")
    _one_line(e, str(mpath), "MiB")


# ---- 2. step and layer selections: strides honoured, floats refused, NumPy integers accepted ----


def test_slice_stride_is_honoured(tmp_path):
    c = _write(tmp_path / "t", n=20)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(steps=slice(0, 10, 3)), c[[0, 3, 6, 9]])
    np.testing.assert_array_equal(t.counts(steps=slice(2, None, 5)), c[[2, 7, 12, 17]])
    np.testing.assert_array_equal(t.counts(steps=slice(None, 7, 2)), c[[0, 2, 4, 6]])
    np.testing.assert_array_equal(t.counts(steps=slice(np.int64(1), np.int32(9), np.int64(4))), c[[1, 5]])
    np.testing.assert_array_equal(t.counts(steps=slice(0, 20, 1)), c)
    assert t.to_pandas(steps=slice(0, 10, 3)).step.unique().tolist() == [0, 3, 6, 9]
    for bad in (slice(0, 10, 0), slice(10, 0, -1), slice(0, 10, 1.5)):
        with pytest.raises(InputError) as e:
            t.counts(steps=bad)
        _one_line(e, str(tmp_path / "t"), "stride" if bad.step != 1.5 else "integers")


@pytest.mark.parametrize(
    "steps",
    [[1.7, 2.2], np.array([1.0, 2.0]), (0.5, 3), slice(0, 3.9), slice(1.2, 4), [True, False], [1, "2"], 2.0],
    ids=repr,
)
def test_float_or_bool_steps_are_refused_not_truncated(tmp_path, steps):
    _write(tmp_path / "t")
    with pytest.raises(InputError) as e:
        open_trace(tmp_path / "t").counts(steps=steps)
    _one_line(e, str(tmp_path / "t"), "integers")


@pytest.mark.parametrize("layers", [0.9, 1.5, [0, 1.0], np.array([0.0]), True, [np.float32(1)]], ids=repr)
def test_float_or_bool_layers_are_refused_not_truncated(tmp_path, layers):
    _write(tmp_path / "t")
    with pytest.raises(InputError) as e:
        open_trace(tmp_path / "t").counts(layers=layers)
    _one_line(e, str(tmp_path / "t"), "layers must be integers")


def test_numpy_integer_steps_and_layers_are_accepted(tmp_path):
    c = _write(tmp_path / "t")
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(steps=np.array([3, 1], dtype=np.uint8), layers=np.int64(1)), c[[3, 1]][:, [1]])
    np.testing.assert_array_equal(t.counts(steps=[np.int32(2)], layers=np.array([1, 0])), c[[2]][:, [1, 0]])
    np.testing.assert_array_equal(t.counts(steps=(np.int64(4), np.int64(6)), layers=[np.int16(0)]), c[4:6, [0]])
    np.testing.assert_array_equal(t.counts(steps=range(0, 12, 4)), c[[0, 4, 8]])
    assert t.counts(steps=[]).shape == (0, 2, 4)
    with pytest.raises(InputError, match="beyond int64"):
        t.counts(steps=[2**70])
    with pytest.raises(InputError, match="2 step numbers"):
        t.counts(steps=(1, 2, 3))


# ---- 3. count columns of unsigned types; sums beyond int64 -------------------------------------


def _recast(part: Path, column: str, typ: pa.DataType, values=None) -> None:
    """Rewrite one column of a real part with another Arrow type (as a third-party tool might)."""
    t = pq.read_table(part)
    col = pa.array(values, typ) if values is not None else t.column(column).cast(typ)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column, col), part)


def test_uint64_counts_that_fit_read_back_exactly(tmp_path):
    c = _write(tmp_path / "t")
    for part in sorted((tmp_path / "t" / "parts").iterdir()):
        _recast(part, "routed", pa.list_(pa.uint64()))
        _recast(part, "tokens", pa.uint64(), [7] * pq.read_metadata(part).num_rows)
    t = open_trace(tmp_path / "t")
    assert pq.read_schema(t.parts[0]).field("routed").type == pa.list_(pa.uint64())
    np.testing.assert_array_equal(t.counts(), c)
    assert (t.tokens() == 7).all() and t.bad_parts == []


@pytest.mark.parametrize("column", ["routed", "tokens"])
def test_uint64_count_beyond_int64_is_refused_naming_the_part_not_read_as_minus_one(tmp_path, column):
    _write(tmp_path / "t")
    part = sorted((tmp_path / "t" / "parts").iterdir())[1]  # steps 4..7
    n = pq.read_metadata(part).num_rows
    if column == "routed":
        _recast(part, "routed", pa.list_(pa.uint64()), [[2**64 - 1, 0, 0, 0]] * n)
    else:
        _recast(part, "tokens", pa.uint64(), [2**64 - 1] * n)
    t = open_trace(tmp_path / "t")
    read = t.counts if column == "routed" else t.tokens
    with pytest.raises(TraceFormatError) as e:
        read((4, 8))
    _one_line(e, str(part), "beyond int64")
    assert t.counts((0, 4)).min() >= 0  # the other parts stay readable
    d = check_data(tmp_path / "t")  # what `moeload check` reports
    assert d["ok"] is False
    assert [b["path"] for b in d["bad_parts"]] == [str(part)] and "beyond int64" in d["bad_parts"][0]["problem"]


def test_counts_summed_over_ranks_beyond_int64_are_refused_naming_the_part(tmp_path):
    big = np.full((4, 2, 2, 4), 2**62, dtype=np.int64)  # [S, R, L, E]: each rank fits, the sum does not
    ok = np.ones((4, 2, 2, 4), dtype=np.int64) * 2**61  # sums to 2**62: fits
    m = Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=1, world_size=2, ep_size=2, ranks_recorded=True)
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_block(np.arange(0, 4), ok)
        part = w.write_block(np.arange(4, 8), big)
    t = open_trace(tmp_path / "t")
    assert (t.counts((0, 4)) == 2**62).all()
    for read in (t.counts, t.rank_counts):  # the part is bad: `check` would call it so
        with pytest.raises(TraceFormatError) as e:
            read((4, 8))
        _one_line(e, str(part), "exceed int64")
    d = check_data(tmp_path / "t")  # what `moeload check` reports
    assert d["ok"] is False
    assert [b["path"] for b in d["bad_parts"]] == [str(part)] and "exceed int64" in d["bad_parts"][0]["problem"]


def test_gpu_load_beyond_int64_is_refused(tmp_path):
    m = Manifest(layers=["a"], experts_per_layer=[4], top_k=1, ep_size=1)
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_block(np.arange(2), np.full((2, 1, 4), 2**62, dtype=np.int64))
    t = open_trace(tmp_path / "t")
    assert (t.counts() == 2**62).all()
    with pytest.raises(TraceFormatError) as e:
        t.gpu_loads()
    _one_line(e, str(tmp_path / "t"), "exceeds int64")


def test_tokens_summed_over_ranks_beyond_int64_are_refused(tmp_path):
    m = Manifest(layers=["a"], experts_per_layer=[4], top_k=1, world_size=2, ranks_recorded=True)
    with TraceWriter(tmp_path / "t", m) as w:
        part = w.write_block(np.arange(3), np.ones((3, 2, 1, 4), np.int64), tokens=np.full((3, 2, 1), 2**62))
    t = open_trace(tmp_path / "t")
    assert (t.counts() == 2).all()
    with pytest.raises(TraceFormatError) as e:
        t.tokens()
    _one_line(e, str(part), "exceed int64")


# ---- 4. a part whose split column disagrees with its file name ----------------------------------


def test_part_whose_split_column_disagrees_with_its_name_is_a_bad_part(tmp_path):
    c = np.random.default_rng(0).integers(0, 50, size=(12, 2, 4))
    ev = np.full((4, 2, 4), 1000)
    with TraceWriter(tmp_path / "t", Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=1)) as w:
        for a in range(0, 12, 4):
            w.write_block(np.arange(a, a + 4), c[a : a + 4])
        evpart = w.write_block(np.arange(4, 8), ev, split="eval")
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(split="eval"), ev)  # as written: fine
    renamed = evpart.with_name(evpart.name.replace("-eval-", "-train-"))
    evpart.rename(renamed)  # eval rows now named as training steps 4..7
    t = open_trace(tmp_path / "t")
    with pytest.raises(TraceFormatError) as e:
        t.counts((4, 8))  # used to return the eval counts as training counts
    _one_line(e, str(renamed), "column 'split' holds ['eval']", "'train'")
    np.testing.assert_array_equal(t.counts((0, 4)), c[:4])
    d = check_data(tmp_path / "t")
    assert d["ok"] is False and [b["path"] for b in d["bad_parts"]] == [str(renamed)]
    with pytest.warns(UserWarning, match="skipped 1 bad part"):
        t = open_trace(tmp_path / "t", skip_bad_parts=True)
        steps = t.steps
    assert steps.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # the older copies of 4..7 do not reappear


@pytest.mark.parametrize("values", [["train", "eval"], [None, "train"], ["valid", "valid"]], ids=repr)
def test_split_column_mixed_null_or_unknown_is_refused(tmp_path, values):
    _write(tmp_path / "t")
    part = sorted((tmp_path / "t" / "parts").iterdir())[0]
    n = pq.read_metadata(part).num_rows
    col = pa.array((values * n)[:n], pa.string()).dictionary_encode()
    t = pq.read_table(part)
    pq.write_table(t.set_column(t.schema.get_field_index("split"), "split", col), part)
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t").counts()
    _one_line(e, str(part), "column 'split'")


# ---- part names with numbers beyond int64 ----------------------------------------------------


@pytest.mark.parametrize("field", ["seq", "rank", "last"])
def test_part_name_numbers_beyond_int64_are_one_line_or_skipped(tmp_path, field):
    c = _write(tmp_path / "t")
    part = sorted((tmp_path / "t" / "parts").iterdir())[2]  # steps 8..11
    huge = str(2**63)
    name = {"seq": f"part-{huge}-r0-train-s000000008-000000011.parquet",
            "rank": f"part-000002-r{huge}-train-s000000008-000000011.parquet",
            "last": f"part-000002-r0-train-s000000008-{huge}.parquet"}[field]
    bad = part.rename(part.with_name(name))
    with pytest.raises(TraceFormatError) as e:
        open_trace(tmp_path / "t")  # used to be an OverflowError traceback
    _one_line(e, str(bad), "beyond int64")
    with pytest.warns(UserWarning, match="skipped 1 bad part"):
        t = open_trace(tmp_path / "t", skip_bad_parts=True)
        np.testing.assert_array_equal(t.counts(), c[:8])
    assert [p for p, _ in t.bad_parts] == [bad] and len(t.parts) == 3
    d = check_data(tmp_path / "t")
    assert d["ok"] is False and [b["path"] for b in d["bad_parts"]] == [str(bad)]


# ---- fuzzing: any JSON value in any manifest field -----------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
NEAR = (st.integers(0, 5) | st.lists(st.integers(0, 5), min_size=2, max_size=2) | st.just(["a", "b"])
        | st.just(["x", "y"]) | st.just({}) | st.just([]) | st.just([{"writer_rank": 0, "first_seq": 0}])
        | st.just([[0, 0, 0, 0], [0, 0, 0, 0]]) | st.sampled_from(["routed", "kept", "both"]))
FIELDS = ["layers", "experts_per_layer", "top_k", "world_size", "ep_size", "schema_version", "extra", "sessions",
          "expert_to_rank", "count_kind", "ranks_recorded", "flush_every", "tokens_per_step", "framework", "versions"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=JSON | NEAR)
def test_fuzz_manifest_field_values_are_read_exactly_or_refused_in_one_line(tmp_path_factory, field, value):
    path = tmp_path_factory.mktemp("fuzz") / "t"
    c = _write(path, n=4)
    _edit_manifest(path, **{field: value})
    try:
        t = open_trace(path)
        got = t.counts()
    except TraceFormatError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        event("refused")
        return
    # accepted: the value was one of the right type and is kept as it was written, never coerced
    meta = t.meta
    if field in ("experts_per_layer", "top_k") and not isinstance(value, list):
        assert type(value) is int and meta[field] == [value, value]
    elif field != "extra":
        assert meta[field] == value and type(meta[field]) is type(value), (field, value, meta[field])
    assert all(type(e) is int for e in meta["experts_per_layer"] + meta["top_k"])
    assert all(type(x) is str for x in meta["layers"])
    np.testing.assert_array_equal(got, c)
    event(f"accepted {field}")
