"""Fuzzing the reader, the importers and the CLI with hypothesis (derandomized, so CI is stable).

Property everywhere: the result is either valid (consistent shapes, non-negative counts, the
undamaged data unchanged) or a MoeloadError with a one-line message; never any other exception.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from moeload import open_trace
from moeload.cli import app
from moeload.errors import MoeloadError
from moeload.trace import Manifest, TraceWriter
from moeload.trace.importers import import_trace

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
L, E, R = 2, 4, 2
BLOCKS = [(0, 5), (5, 10), (10, 15)]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """3 parts x 5 steps, 2 ranks recorded, routed and kept counts -> (path, routed [15, R, L, E])."""
    rng = np.random.default_rng(0)
    routed = rng.integers(0, 40, size=(15, R, L, E))
    m = Manifest(layers=["x.0", "x.1"], experts_per_layer=[E, E], top_k=2, world_size=R, ep_size=R,
                 ranks_recorded=True, count_kind="both")
    path = tmp_path_factory.mktemp("fuzz") / "t"
    with TraceWriter(path, m, fsync=False) as w:
        for a, b in BLOCKS:
            w.write_block(np.arange(a, b), routed[a:b], kept=routed[a:b] // 2, tokens=np.full((b - a, R, L), 40))
    return path, routed


def _one_line(e: MoeloadError) -> None:
    assert str(e) and "\n" not in str(e), str(e)


def _damage(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data[:cut] if cut is not None else data)
    for pos, x in flips:
        if b:
            b[pos % len(b)] ^= x
    return bytes(b)


DAMAGE = st.tuples(
    st.one_of(st.none(), st.integers(0, 4000)),  # truncate at (None: keep the length)
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),  # (position, xor) byte flips
)


def _consistent(t, steps: np.ndarray) -> None:
    c = t.counts()
    assert c.shape == (len(steps), L, E) and c.dtype == np.int64 and (c >= 0).all()
    np.testing.assert_array_equal(t.rank_counts().sum(1), c)
    assert t.counts(kind="kept").shape == c.shape and t.tokens().shape == (len(steps), L)
    p = t.proportions()
    assert p.shape == c.shape and np.allclose(np.nansum(p, -1)[c.sum(-1) > 0], 1)


@settings(max_examples=150, **SETTINGS)
@given(part=st.integers(0, len(BLOCKS) - 1), damage=DAMAGE)
def test_fuzz_damaged_part(template, part, damage):
    src, routed = template
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "t"
        shutil.copytree(src, d)
        victim = sorted((d / "parts").iterdir())[part]
        victim.write_bytes(_damage(victim.read_bytes(), *damage))
        others = [b for i, b in enumerate(BLOCKS) if i != part]
        # default: reads of the other parts' steps always work and are unchanged
        t = open_trace(d)
        for a, b in others:
            np.testing.assert_array_equal(t.rank_counts((a, b)), routed[a:b])
        try:
            _consistent(t, t.steps)
            # parts carry page checksums: a flip that goes unnoticed changed no count
            np.testing.assert_array_equal(t.rank_counts(), routed)
        except MoeloadError as e:
            _one_line(e)
            assert victim.name in str(e)
        # skip_bad_parts: never raises; the damaged part is either read or skipped and shown as a gap
        t = open_trace(d, skip_bad_parts=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = t.steps
        _consistent(t, steps)
        for a, b in others:
            assert set(range(a, b)) <= set(steps.tolist())
            np.testing.assert_array_equal(t.rank_counts((a, b)), routed[a:b])
        if not t.bad_parts:
            np.testing.assert_array_equal(t.rank_counts(), routed)
            np.testing.assert_array_equal(t.counts(kind="kept"), (routed // 2).sum(1))
        else:
            a, b = BLOCKS[part]
            assert [p.name for p, _ in t.bad_parts] == [victim.name]
            assert (a, b - 1) in t.gaps() or (a == 0 or b == 15) and not set(range(a, b)) & set(steps.tolist())


@settings(max_examples=100, **SETTINGS)
@given(damage=DAMAGE, skip=st.booleans())
def test_fuzz_damaged_manifest(template, damage, skip):
    src, routed = template
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "t"
        shutil.copytree(src, d)
        man = d / "manifest.json"
        man.write_bytes(_damage(man.read_bytes(), *damage))
        try:
            t = open_trace(d, skip_bad_parts=skip)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = t.counts()
                assert c.shape[1:] == (t.num_layers, t.num_experts) and (c >= 0).all()
                t.proportions(), t.gaps(), t.bad_parts
        except MoeloadError as e:
            _one_line(e)


MANIFEST_FIELDS = ["schema_version", "layers", "experts_per_layer", "top_k", "world_size", "ep_size", "expert_to_rank",
                   "count_kind", "ranks_recorded", "flush_every", "tokens_per_step", "sessions", "extra",
                   "rank_map_changes", "framework", "model_name"]
TYPED = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=4), st.sampled_from([0, 1, 2, 4, -1, 2**31, 2**63])),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=200, **SETTINGS)
@given(changes=st.lists(st.tuples(st.sampled_from(MANIFEST_FIELDS), TYPED), min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(MANIFEST_FIELDS), max_size=1))
def test_fuzz_manifest_field_types_and_ranges(template, changes, drop):
    """Manifest fields of any JSON type and range (valid JSON, unlike the byte damage above): the trace
    reads consistently or the error is one line; never a coerced field, never another exception."""
    src, routed = template
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "t"
        shutil.copytree(src, d)
        man = d / "manifest.json"
        doc = json.loads(man.read_text())
        for k, v in changes:
            doc[k] = v
        for k in drop:
            doc.pop(k, None)
        man.write_text(json.dumps(doc))
        try:
            t = open_trace(d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = t.counts()
                assert c.shape == (15, t.num_layers, t.num_experts) and (c >= 0).all()
                assert isinstance(t.meta["layers"], list) and all(isinstance(x, str) for x in t.layers)
                assert all(isinstance(e, int) and not isinstance(e, bool) for e in t.experts_per_layer)
                t.gpu_loads(), t.proportions(), t.gaps()
        except MoeloadError as e:
            _one_line(e)


ARROW_TYPES = ["int8", "int32", "int64", "uint64", "float64", "string", "bool", "list<int32>", "list<uint64>",
               "list<float64>", "list<string>", "null"]


def _column(kind: str, n: int, rng: np.random.Generator):
    import pyarrow as pa

    ints = rng.integers(-3, 20, size=n)
    if kind == "null":
        return pa.nulls(n)
    if kind.startswith("list<"):
        inner = kind[5:-1]
        vals = [[int(v) for v in rng.integers(0, 9, size=E)] for _ in range(n)]
        if inner == "uint64":
            vals = [[2**64 - 1 if i == 0 else v for i, v in enumerate(r)] for r in vals]
        if inner == "string":
            return pa.array([[str(v) for v in r] for r in vals], pa.list_(pa.string()))
        return pa.array(vals, pa.list_(getattr(pa, inner)()))
    if kind == "string":
        return pa.array([str(v) for v in ints])
    if kind == "bool":
        return pa.array(ints > 5)
    if kind == "uint64":
        return pa.array(np.abs(ints).astype(np.uint64))
    return pa.array(ints.astype(kind))


@settings(max_examples=120, **SETTINGS)
@given(types=st.fixed_dictionaries({c: st.sampled_from(ARROW_TYPES) for c in ["step", "layer", "rank", "routed", "kept",
                                                                                "tokens", "split"]}),
       omit=st.lists(st.sampled_from(["step", "layer", "rank", "routed", "kept", "tokens", "split"]), max_size=2),
       part=st.integers(0, len(BLOCKS) - 1), seed=st.integers(0, 3))
def test_fuzz_part_schemas(template, types, omit, part, seed):
    """One part replaced by a Parquet file whose columns have arbitrary types (or are missing): reads are
    consistent or one-line errors, never a count read from the wrong type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, _ = template
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "t"
        shutil.copytree(src, d)
        target = sorted((d / "parts").glob("part-*.parquet"))[part]
        n = 5 * L * R
        cols = {c: _column(k, n, rng) for c, k in types.items() if c not in omit}
        pq.write_table(pa.table(cols), target)
        try:
            t = open_trace(d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = t.counts()
                assert c.dtype == np.int64 and (c >= 0).all() and c.shape[1:] == (L, E)
                assert (c < 2**40).all()  # never a uint64 wrapped to a huge or negative count
        except MoeloadError as e:
            _one_line(e)


# ---- importers: valid inputs with about one field in ten replaced by junk ----------------------
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True), st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy, bad: st.SearchStrategy = JSON_VALUE, n: int = 10) -> st.SearchStrategy:
    """valid n - 1 times in n, else bad."""
    return st.integers(0, n - 1).flatmap(lambda i: bad if i == 0 else valid)


def _check_import(fmt: str, src: Path, dest: Path, total: int | None = None) -> bool:
    """Import; on success the trace is consistent and holds `total` assignments. -> imported?"""
    try:
        out = import_trace(fmt, src, dest)
    except MoeloadError as e:
        _one_line(e)
        return False
    t = open_trace(out)
    c = t.counts()
    assert c.shape == (len(t.steps), t.num_layers, t.num_experts) and (c >= 0).all() and len(t.steps)
    if total is not None:
        assert c.sum() == total
    return True


CSV_BAD = st.sampled_from(["", "nan", "inf", "-inf", "-1", "1.5", "abc", "1e30", "0x1", "99999999"])
CSV_ROW = st.tuples(*(mostly(st.integers(0, n).map(str), CSV_BAD, 40) for n in (5, 2, 4, 50)))


@settings(max_examples=150, **SETTINGS)
@given(header=mostly(st.just(["step", "layer", "expert", "count"]), st.permutations(["step", "layer", "expert", "count"])
                     .map(lambda c: c[: len(c) - 1] + ["rank"])),
       rows=st.lists(CSV_ROW, max_size=8, unique_by=lambda r: r[:3]))
def test_fuzz_csv_import(header, rows):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "a.csv"
        src.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
        total = sum(int(r[3]) for r in rows) if header[3] == "count" and all(r[3].isdigit() for r in rows) else None
        _check_import("csv", src, Path(tmp) / "out", total)


NUMPY_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.int64, np.int8, np.uint64, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
    elements=dict(allow_nan=True, allow_infinity=True),
)
COUNTS_3D = hnp.arrays(np.int64, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=4),
                       elements=st.integers(0, 1000))


@settings(max_examples=150, **SETTINGS)
@given(arr=mostly(COUNTS_3D, NUMPY_ARRAYS), as_float=st.booleans(), npz=st.booleans(),
       steps=st.one_of(st.none(), NUMPY_ARRAYS))
def test_fuzz_numpy_import(arr, as_float, npz, steps):
    if as_float and arr.dtype == np.int64:
        arr = arr.astype(np.float64)  # whole-valued floats are counts too
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / ("a.npz" if npz else "a.npy")
        if npz:
            np.savez(src, counts=arr, **({} if steps is None else {"steps": steps}))
        else:
            np.save(src, arr)
        valid = arr.ndim == 3 and arr.size and np.isfinite(arr).all() and (arr >= 0).all() and (arr == np.round(arr)).all()
        total = int(arr.astype(np.int64).sum()) if valid else None
        imported = _check_import("numpy", src, Path(tmp) / "out", total)
        if valid and (steps is None or not npz):
            assert imported


def _nat(x) -> bool:
    return type(x) is int and x >= 0


def _matrix(x, width: int, min_rows: int) -> bool:
    return isinstance(x, list) and len(x) >= min_rows and all(
        isinstance(r, list) and len(r) == width and all(_nat(v) for v in r) for r in x)


MATRIX = st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=2), min_size=1, max_size=3)
TPE_RECORD = st.fixed_dictionaries({"iter": mostly(st.integers(0, 3)), "layer": mostly(st.integers(0, 2)),
                                    "tpe": mostly(MATRIX)})


@settings(max_examples=150, **SETTINGS)
@given(recs=st.lists(TPE_RECORD, min_size=1, max_size=5), garbage=st.integers(0, 9))
def test_fuzz_megatron_tpe_import(recs, garbage):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "tokens_per_expert"
        d.mkdir()
        lines = [json.dumps(r) for r in recs] + (["{oops"] if garbage == 0 else [])
        (d / "rank0.jsonl").write_text("\n".join(lines) + "\n")
        valid = garbage and all(_nat(r["iter"]) and _nat(r["layer"]) and _matrix(r["tpe"], 2, 1) for r in recs)
        total = sum(int(np.sum(r["tpe"])) for r in recs) if valid else None
        assert _check_import("megatron-tpe", Path(tmp), Path(tmp) / "out", total) or not valid


INDICES = st.lists(st.lists(st.integers(0, 5), min_size=2, max_size=2), max_size=4)
ROUTER_RECORD = st.fixed_dictionaries(
    {"step": mostly(st.integers(0, 3)), "layer": mostly(st.integers(0, 1)), "top_indices": mostly(INDICES)},
    optional={"rank": mostly(st.integers(0, 1)), "num_tokens": mostly(st.none()), "topk": mostly(st.just(2))},
).map(lambda r: r if r.get("num_tokens", 0) is not None or not isinstance(r["top_indices"], list)
      else {**r, "num_tokens": len(r["top_indices"])})


@settings(max_examples=150, **SETTINGS)
@given(recs=st.lists(ROUTER_RECORD, min_size=1, max_size=5))
def test_fuzz_megatron_router_trace_import(recs):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "routing"
        d.mkdir()
        (d / "router_trace_rank0.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        (d / "router_trace_rank1.jsonl").write_text("")
        valid = all(_nat(r["step"]) and _nat(r["layer"]) and _matrix(r["top_indices"], 2, 0)
                    and r.get("rank", 0) in (0, 1) and type(r.get("rank", 0)) is int
                    and (type(r.get("topk", 2)) is int and r.get("topk", 2) == 2)
                    and (type(r.get("num_tokens", 0)) is int and r.get("num_tokens", len(r["top_indices"]))
                         == len(r["top_indices"])) for r in recs)
        total = sum(len(r["top_indices"]) * 2 for r in recs) if valid else None
        imported = _check_import("megatron-router-trace", d, Path(tmp) / "out", total)
        assert imported or not valid or not any(r["top_indices"] for r in recs)


TENSORS = NUMPY_ARRAYS.map(lambda a: torch.from_numpy(a.astype(np.float64) if a.dtype == np.uint64 else a))
STAT_COUNTS = COUNTS_3D.map(torch.from_numpy)


@st.composite
def per_pass_dump(draw):
    L, P, E = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    p2l = draw(mostly(hnp.arrays(np.int64, (L, P), elements=st.integers(0, E - 1)).map(torch.from_numpy), TENSORS))
    count = hnp.arrays(np.int64, (L, P), elements=st.integers(0, 50)).map(torch.from_numpy)
    rec = st.fixed_dictionaries({"forward_pass_id": mostly(st.integers(0, 3)), "rank": mostly(st.integers(0, 1)),
                                 "global_physical_count": mostly(count, TENSORS)})
    return {"records": draw(st.lists(rec, min_size=1, max_size=3)), "last_physical_to_logical_map": p2l}


@settings(max_examples=100, **SETTINGS)
@given(dump=st.one_of(
    st.fixed_dictionaries({"logical_count": mostly(STAT_COUNTS, TENSORS)},
                          optional={"average_utilization_rate_over_window": mostly(st.floats(0, 1), JSON_VALUE)}),
    per_pass_dump(),
    JSON_VALUE,
))
def test_fuzz_sglang_import(dump):
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dump, Path(tmp) / "expert_distribution_recorder_1.pt")
        total = None
        if isinstance(dump, dict) and "logical_count" in dump:
            total = int(dump["logical_count"].to(torch.float64).nan_to_num(0).sum())
        _check_import("sglang", Path(tmp), Path(tmp) / "out", total)


# ---- CLI ------------------------------------------------------------------------------------
runner = CliRunner()
OPTION = st.one_of(
    st.tuples(st.just("--steps"), st.sampled_from(["0:5", "5:", ":3", "3:1", "x", "-2:4", "99:100", "7"])),
    st.tuples(st.just("--layers"), st.sampled_from(["0", "1,0", "x.1", "5", "-1", "", "a,,b"])),
    st.tuples(st.sampled_from(["--json", "--skip-bad-parts", "--bogus"])),
)


@pytest.fixture(scope="module")
def cli_traces(template, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fuzz")
    good = template[0]
    bad = root / "bad"
    shutil.copytree(good, bad)
    part = sorted((bad / "parts").iterdir())[1]
    part.write_bytes(part.read_bytes()[:-30])
    empty = root / "empty"
    TraceWriter(empty, Manifest(layers=["a"], experts_per_layer=[4])).close()
    return {"good": good, "bad": bad, "empty": empty, "missing": root / "missing", "file": part}


@settings(max_examples=100, **SETTINGS)
@given(cmd=st.sampled_from(["info", "check", "summary", "states", "export"]),
       which=st.sampled_from(["good", "bad", "empty", "missing", "file"]), opts=st.lists(OPTION, max_size=3))
def test_fuzz_cli_exit_codes(cli_traces, cmd, which, opts):
    with tempfile.TemporaryDirectory() as tmp:
        args = [cmd, str(cli_traces[which])] + ([str(Path(tmp) / "o.npz")] if cmd == "export" else [])
        args += [x for o in opts for x in o]
        r = runner.invoke(app, args)
        assert r.exit_code in (0, 2), (args, r.output, r.exception)
        if r.exit_code == 2:
            lines = [x for x in r.stderr.splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("moeload: error: "), (args, r.stderr)
