"""LoadTracer core: count kinds in the manifest, sinks attached with add_sink, crash-resume overwriting steps."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from _loop import Loop

from moeload import LoadTracer, open_trace
from moeload.errors import InputError
from moeload.tracing import Adapter, GateSpec, Routing


class KeptOnlyRouters(Adapter):
    """The embedded workload's routers read the way megatron-core's are with a capacity factor: the
    gate shows only the routes left after dropping (dropped routes as -1), so its counts are kept
    counts (`count_kind="kept"`). Layers listed in `both` are read normally (routed + kept)."""

    name = "kept-only-test"

    def __init__(self, both: tuple[int, ...] = ()) -> None:
        self.both = both

    def find(self, model):
        out = []
        for i, (n, m) in enumerate(model.routers().items()):
            if i in self.both:
                out.append(GateSpec(m, n, m.num_experts, m.top_k, lambda mod, a, o: Routing(indices=o.indices, kept=o.kept),
                                    has_kept=True))
            else:
                out.append(GateSpec(m, n, m.num_experts, m.top_k,
                                    lambda mod, a, o: Routing(indices=torch.where(o.kept, o.indices, -1)), count_kind="kept"))
        return out


def test_kept_only_gates_make_a_kept_trace(tmp_path):
    lp = Loop()
    with LoadTracer(lp.model, tmp_path / "t", adapters=[KeptOnlyRouters()], flush_every=2) as tr:
        ref_r, ref_k = lp.run(3, tr)
    assert tr.layer_count_kinds == ["kept", "kept"]
    t = open_trace(tmp_path / "t")
    assert t.meta["count_kind"] == "kept" and "layer_count_kinds" not in t.meta["extra"]
    assert (ref_k != ref_r).any()  # capacity really drops here
    np.testing.assert_array_equal(t.counts(), ref_k)  # the main counts are the kept counts
    np.testing.assert_array_equal(t.counts(kind="kept"), ref_k)


def test_layers_that_disagree_give_both_with_per_layer_kinds(tmp_path):
    lp = Loop()
    with LoadTracer(lp.model, tmp_path / "t", adapters=[KeptOnlyRouters(both=(1,))], flush_every=2) as tr:
        ref_r, ref_k = lp.run(3, tr)
    t = open_trace(tmp_path / "t")
    assert t.meta["count_kind"] == "both" and t.meta["extra"]["layer_count_kinds"] == ["kept", "both"]
    np.testing.assert_array_equal(t.counts()[:, 0], ref_k[:, 0])  # routed column of a kept layer: kept counts
    np.testing.assert_array_equal(t.counts()[:, 1], ref_r[:, 1])
    np.testing.assert_array_equal(t.counts(kind="kept"), ref_k)


def test_kept_false_still_labels_kept_only_gates(tmp_path):
    lp = Loop()
    tr = LoadTracer(lp.model, tmp_path / "t", adapters=[KeptOnlyRouters(both=(1,))], kept=False)
    assert tr.layer_count_kinds == ["kept", "routed"] and tr.manifest.count_kind == "both"
    with pytest.raises(ValueError, match="count_kind"):
        GateSpec(lp.model, "x", 4, 2, lambda *a: None, count_kind="dropped")


def _wait_flushed(tr: LoadTracer, step: int) -> None:
    deadline = time.time() + 60  # generous: CI shares 2 cores; returns as soon as the block is written
    while tr.last_flushed_step != step and time.time() < deadline:
        time.sleep(0.01)
    assert tr.last_flushed_step == step


def test_add_sink_after_start_sees_later_blocks_and_a_failing_sink_stops_nothing(tmp_path):
    lp = Loop()
    early, late = [], []

    def broken(block):
        raise RuntimeError("sink bug")

    tr = LoadTracer(lp.model, tmp_path / "t", sink=early.append, flush_every=2).start()
    ref_r, _ = lp.run(2, tr)
    _wait_flushed(tr, 1)  # block 0..1 is done before the new sinks are attached
    assert tr.add_sink(broken) is broken
    tr.add_sink(late.append)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        more, _ = lp.run(3, tr)
        tr.close()
    assert [b.steps.tolist() for b in early] == [[0, 1], [2, 3], [4]]
    assert [b.steps.tolist() for b in late] == [[2, 3], [4]]
    np.testing.assert_array_equal(np.concatenate([b.routed[:, 0] for b in late]), more)
    t = open_trace(tmp_path / "t")  # the broken sink stopped neither the writing nor the next sink
    assert t.steps.tolist() == list(range(5))
    np.testing.assert_array_equal(t.counts(), np.concatenate([ref_r, more]))
    assert sum("sink" in e and "RuntimeError: sink bug" in e for e in tr.errors) == 2
    assert len([x for x in w if "sink bug" in str(x.message)]) == 1
    with pytest.raises(InputError, match="after close"):
        tr.add_sink(late.append)
    with pytest.raises(InputError, match="callable"):
        LoadTracer(lp.model, sink=early.append).add_sink("not a function")


def test_resume_after_crash_rewrites_steps_past_the_checkpoint(tmp_path):
    """Run 1 checkpoints at step 4 and dies after its block 6..8 is on disk; run 2 resumes from the
    checkpoint (other data, so its counts differ) and rewrites steps 4..6. The trace holds run 1's
    counts for 0..3 and run 2's for 4..6; run 1's 7..8 belong to the abandoned run and are
    superseded (hidden, listed by `superseded()`), though run 2 has not reached them."""
    path = tmp_path / "t"
    run1 = Loop(data_seed=0)
    tr1 = LoadTracer(run1.model, path, flush_every=3).start()
    first, _ = run1.run(4, tr1)
    checkpoint = tr1.state_dict()
    after, _ = run1.run(5, tr1)
    _wait_flushed(tr1, 8)  # everything up to step 8 is written; the process "dies" here
    first = np.concatenate([first, after])
    tr1.close()

    run2 = Loop(data_seed=1)
    tr2 = LoadTracer(run2.model, path, flush_every=3)
    tr2.load_state_dict(checkpoint)
    seen = []
    tr2.add_sink(lambda b: seen.append(b.steps.tolist()))
    with tr2:
        second, _ = run2.run(3, tr2)
    assert seen == [[4, 5, 6]]
    t = open_trace(path)
    assert t.steps.tolist() == list(range(7)) and len(t.meta["sessions"]) == 2
    assert t.superseded() == [(7, 8)] and t.gaps() == []
    assert (second != first[4:7]).any()  # the replayed steps really differ
    expected = np.concatenate([first[:4], second])
    np.testing.assert_array_equal(t.counts(), expected)
    np.testing.assert_array_equal(t.counts(steps=[1, 5]), expected[[1, 5]])
