"""`moeload report` reads the selected window of counts once and hands the layer ids on as ids."""

from __future__ import annotations

from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace.reader import Trace

runner = CliRunner()


def test_report_reads_the_window_once_and_parses_no_layer_text(monkeypatch, tmp_path, trace_dir):
    import moeload.cli._common as common
    import moeload.cli.figures as figures
    import moeload.cli.forecast as forecast

    reads, parses = [], []
    counts, parse = Trace.counts, common.parse_layers
    monkeypatch.setattr(Trace, "counts", lambda self, *a, **k: reads.append(a) or counts(self, *a, **k))
    for mod in (common, figures, forecast):  # every module that parses --layers text
        if hasattr(mod, "parse_layers"):
            monkeypatch.setattr(mod, "parse_layers", lambda spec: parses.append(spec) or parse(spec))
    r = runner.invoke(app, ["report", str(trace_dir), "-o", str(tmp_path / "r.html"), "--layers", "0,1"])
    assert r.exit_code == 0, r.output
    assert [p for p in parses if p is not None] == ["0,1"]  # the user's text, once; afterwards layer ids
    window = [a for a in reads if a and a[0] is None]  # reads of the whole step range (the forecast reads its own)
    assert len(window) == 1, reads
