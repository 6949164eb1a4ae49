"""Trace store: round trip, slicing, resume/replace, per-rank and per-GPU reads, plain readers, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from moeload import open_trace
from moeload.errors import TraceFormatError, TraceMismatchError
from moeload.trace import Manifest, TraceWriter


def manifest(**kw) -> Manifest:
    base = dict(layers=["blocks.1.moe.router", "blocks.3.moe.router"], experts_per_layer=[8, 8], top_k=2)
    base.update(kw)
    return Manifest(**base)


def random_counts(rng, S, R, L, E, tokens=64, k=2):
    """Multinomial counts: each (step, rank, layer) routes tokens*k assignments."""
    p = rng.dirichlet(np.ones(E), size=(S, R, L))
    return np.stack([[[rng.multinomial(tokens * k, p[s, r, l]) for l in range(L)] for r in range(R)] for s in range(S)])


def test_round_trip_in_blocks(tmp_path):
    rng = np.random.default_rng(0)
    c = random_counts(rng, 30, 1, 2, 8)
    with TraceWriter(tmp_path / "t", manifest(flush_every=10)) as w:
        for b in range(3):
            sl = slice(b * 10, b * 10 + 10)
            w.write_block(np.arange(30)[sl], c[sl], tokens=np.full((10, 1, 2), 64))
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(30))
    np.testing.assert_array_equal(t.counts(), c[:, 0])
    assert t.counts().dtype == np.int64
    np.testing.assert_allclose(t.proportions().sum(-1), 1.0)
    np.testing.assert_array_equal(t.tokens(), np.full((30, 2), 64))
    assert len(t.parts) == 3
    # slices: by range, tuple, explicit steps, layer name and index
    np.testing.assert_array_equal(t.counts((5, 17)), c[5:17, 0])
    np.testing.assert_array_equal(t.counts(range(8, 12), layers=["blocks.3.moe.router"]), c[8:12, 0, 1:2])
    np.testing.assert_array_equal(t.counts([29, 0], layers=1), c[[29, 0], 0, 1:2])


def test_rewritten_step_replaces_old_one_across_restart(tmp_path):
    rng = np.random.default_rng(1)
    c = random_counts(rng, 20, 1, 2, 8)
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block(np.arange(20), c)
    # a resumed run from a checkpoint at step 15 writes steps 15..24 again
    c2 = random_counts(rng, 10, 1, 2, 8)
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block(np.arange(15, 25), c2)
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(25))
    np.testing.assert_array_equal(t.counts((0, 15)), c[:15, 0])
    np.testing.assert_array_equal(t.counts((15, 25)), c2[:, 0])
    assert len(t.meta["sessions"]) == 2


def test_append_with_other_shape_is_refused(tmp_path):
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block([0], np.ones((1, 2, 8), int))
    with pytest.raises(TraceMismatchError, match="experts_per_layer"):
        TraceWriter(tmp_path / "t", manifest(experts_per_layer=[8, 16]))


def test_per_rank_global_and_gpu_loads(tmp_path):
    rng = np.random.default_rng(2)
    R, E = 2, 8
    c = random_counts(rng, 12, R, 2, E)
    kept = np.minimum(c, 10)
    m = manifest(world_size=R, ep_size=R, ranks_recorded=True, count_kind="both",
                 expert_to_rank=[[0, 1] * 4, [0] * 4 + [1] * 4])
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_block(np.arange(6), c[:6], kept=kept[:6])
        w.write_block(np.arange(6, 12), c[6:], kept=kept[6:])
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.rank_counts(), c)
    np.testing.assert_array_equal(t.counts(), c.sum(1))
    np.testing.assert_array_equal(t.counts(kind="kept"), kept.sum(1))
    g = t.gpu_loads()
    glob = c.sum(1)
    np.testing.assert_array_equal(g[:, 0, 0], glob[:, 0, 0::2].sum(-1))
    np.testing.assert_array_equal(g[:, 1, 1], glob[:, 1, 4:].sum(-1))
    assert g.sum() == glob.sum()
    df = t.to_pandas(per_rank=True)
    assert set(df.columns) == {"step", "rank", "layer", "layer_name", "expert", "count", "kept"}
    assert len(df) == 12 * R * 2 * E and df["count"].sum() == c.sum()


def test_uneven_experts_per_layer_and_tidy_frame(tmp_path):
    m = manifest(experts_per_layer=[4, 6])
    c = np.zeros((3, 1, 2, 6), int)
    c[:, :, 0, :4] = 5
    c[:, :, 1, :] = 3
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_block(np.arange(3), c)
    t = open_trace(tmp_path / "t")
    assert t.counts().shape == (3, 2, 6)
    assert t.counts()[:, 0, 4:].sum() == 0
    df = t.to_pandas()
    assert len(df) == 3 * (4 + 6)
    assert df.groupby("layer")["expert"].max().tolist() == [3, 5]


def test_plain_pandas_pyarrow_duckdb_read_parts(tmp_path):
    c = random_counts(np.random.default_rng(3), 5, 1, 2, 8)
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block(np.arange(5), c)
    part = open_trace(tmp_path / "t").parts[0]
    df = pd.read_parquet(part).sort_values(["step", "layer"])
    assert {"step", "layer", "rank", "split", "tokens", "routed"} <= set(df.columns)
    assert np.array_equal(np.stack(df["routed"].to_numpy()).reshape(5, 2, 8), c[:, 0])
    assert pq.read_table(part).num_rows == 10
    duckdb = pytest.importorskip("duckdb")
    total = duckdb.sql(
        f"select sum(x) from (select unnest(routed) as x from read_parquet('{tmp_path}/t/parts/*.parquet'))"
    ).fetchall()[0][0]
    assert total == c.sum()
    man = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert man["layers"] == ["blocks.1.moe.router", "blocks.3.moe.router"] and man["schema_version"] == 1


def test_left_over_temporary_part_is_ignored(tmp_path):
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block([0, 1], np.ones((2, 2, 8), int))
    (tmp_path / "t" / "parts" / ".part-000001-r0-train-s000000002-000000003.parquet.tmp").write_bytes(b"PAR1 half")
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == [0, 1]


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "manifest.json").write_text('{"layers": []}'), "missing field"),
        (lambda d: (d / "manifest.json").write_text('{"layers": ["a"], "experts_per_layer": [4, 4]}'), "2 entries for 1 layers"),
        (lambda d: (d / "manifest.json").write_text('{"layers": ["a"], "experts_per_layer": [4], "schema_version": 99}'), "newer than"),
    ],
)
def test_bad_manifest_gives_one_line_error_naming_the_file(tmp_path, damage, match):
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block([0], np.ones((1, 2, 8), int))
    damage(tmp_path / "t")
    with pytest.raises(TraceFormatError, match=match) as ei:
        open_trace(tmp_path / "t")
    assert str(tmp_path / "t") in str(ei.value) and "\n" not in str(ei.value)


def test_corrupt_part_and_bad_selections(tmp_path):
    with TraceWriter(tmp_path / "t", manifest()) as w:
        p = w.write_block([0, 1], np.ones((2, 2, 8), int))
    t = open_trace(tmp_path / "t")
    with pytest.raises(TraceFormatError, match="not recorded"):
        t.counts([5])
    with pytest.raises(TraceFormatError, match="no layer named"):
        t.counts(layers=["nope"])
    with pytest.raises(TraceFormatError, match="global counts only"):
        t.rank_counts()
    with pytest.raises(TraceFormatError, match="routed counts only"):
        t.counts(kind="kept")
    p.write_bytes(b"garbage")
    with pytest.raises(TraceFormatError, match="unreadable Parquet part"):
        open_trace(tmp_path / "t").counts()
    with pytest.raises(TraceFormatError, match="no such trace directory"):
        open_trace(tmp_path / "missing")


def test_proportions_nan_for_rows_without_tokens(tmp_path):
    c = np.ones((2, 2, 8), int)
    c[1, 0] = 0
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block([0, 1], c)
    p = open_trace(tmp_path / "t").proportions()
    assert np.isnan(p[1, 0]).all() and np.allclose(p[0].sum(-1), 1)


def test_iter_blocks_covers_every_step_once(tmp_path):
    c = random_counts(np.random.default_rng(4), 25, 1, 2, 8)
    with TraceWriter(tmp_path / "t", manifest()) as w:
        w.write_block(np.arange(25), c)
    t = open_trace(tmp_path / "t")
    got = [(s, x) for s, x in t.iter_blocks(block=10)]
    assert [len(s) for s, _ in got] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([x for _, x in got]), c[:, 0])
