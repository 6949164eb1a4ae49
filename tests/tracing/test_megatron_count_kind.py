"""Megatron-core with a capacity factor: the real adapter path writes a trace whose manifest says "kept"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
from test_megatron import SEQ, B, Net, mcore, run  # noqa: E402, F401  (mcore: the module's fixture)

from moeload import LoadTracer, open_trace  # noqa: E402


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_manifest_count_kind_follows_the_router(mcore, tmp_path, capacity):  # noqa: F811
    torch.manual_seed(3)
    model = Net(mcore, 2, capacity)
    with LoadTracer(model, tmp_path / "t", flush_every=2) as tr:
        ref_map, _, ref_kept = run(model, tr, steps=3)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), ref_map)
    if capacity is None:
        assert tr.layer_count_kinds == ["routed", "routed"] and t.meta["count_kind"] == "routed"
        assert (t.counts().sum(-1) == SEQ * B * 2).all()
    else:
        assert tr.layer_count_kinds == ["kept", "kept"] and t.meta["count_kind"] == "kept"
        assert (t.counts().sum(-1) < SEQ * B * 2).all()  # after dropping
        np.testing.assert_array_equal(t.counts(kind="kept"), ref_kept)
