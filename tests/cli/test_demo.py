"""`moeload demo` end to end on the tiny workload: real training, trace read back, analysis printed."""

from __future__ import annotations

import pandas as pd

from moeload import open_trace
from moeload.cli.demo import run_demo


def test_demo_trains_traces_and_analyses(tmp_path, capsys):
    out = tmp_path / "demo.moeload"
    s = run_demo(out, config="tiny", steps=120, flush_every=25, threads=1, progress=False)
    text = capsys.readouterr().out
    assert s["steps"] == 120 and s["conserved"] is True
    assert len(s["boundaries"]) == len(s["layers"])
    for needle in ("conservation", "Phases", "Forecasts", "Placement", "sw_avg"):
        assert needle in text
    # the trace on disk is plain Parquet
    df = pd.read_parquet(out / "parts")
    assert df["step"].nunique() == 120
    t = open_trace(out)
    assert (t.counts().sum(-1) == t.tokens() * 2).all()
    assert isinstance(s["placement"], pd.DataFrame) and "static contiguous" in set(s["placement"]["scenario"])
