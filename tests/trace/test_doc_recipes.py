"""The plain-pandas recipe in docs/trace-format.md ("Reading without moeload") gives what moeload's
reader gives, also on a resumed trace whose abandoned steps must stay hidden (issue 13)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from moeload import LoadTracer, open_trace

DOC = Path(__file__).resolve().parents[2] / "docs" / "trace-format.md"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracing"))


def recipe() -> str:
    """The python block of the docs that defines `read_counts`."""
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "def read_counts" in b]
    assert len(found) == 1, "docs/trace-format.md must hold one python block defining read_counts"
    return found[0]


def test_pandas_recipe_matches_the_reader_on_a_resumed_trace(tmp_path, monkeypatch):
    from _loop import Loop

    path = tmp_path / "run.moeload"
    lp = Loop()
    with LoadTracer(lp.model, path, flush_every=5) as tr:
        lp.run(30, tr)
    with LoadTracer(lp.model, path, flush_every=5) as tr:  # resumed from a checkpoint at step 12
        tr.load_state_dict({"step": 12})
        lp.run(6, tr)  # steps 12..17; the first run's 18..29 are abandoned
    t = open_trace(path)
    ns: dict = {}
    monkeypatch.chdir(tmp_path)  # the recipe reads "run.moeload"
    exec(recipe(), ns)
    np.testing.assert_array_equal(ns["counts"].reshape(t.counts().shape), t.counts())
    df = ns["read_counts"](str(path))
    assert sorted(df.step.unique().tolist()) == t.steps.tolist() == list(range(18))
    got = np.stack(df.sort_values(["step", "layer"]).groupby(["step", "layer"]).routed
                   .apply(lambda r: np.sum(np.stack(r), 0)).to_list()).reshape(18, t.num_layers, -1)
    np.testing.assert_array_equal(got, t.counts())
    assert isinstance(df, pd.DataFrame)
