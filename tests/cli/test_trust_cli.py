"""CLI-level trust: outputs never land inside the input trace, sizes from options are bounded,
imports do not guess top-k, forecast figures name their layer (issue 13)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter, open_trace

runner = CliRunner()
LAYERS = ["blocks.0.moe.gate", "blocks.1.moe.gate", "blocks.2.moe.gate", "blocks.3.moe.gate"]
E = 8


def make_trace(path: Path, steps: int = 80, seed: int = 0) -> Path:
    """A real trace on disk: 4 layers x 8 experts, top-2, two parts."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 2.0), size=len(LAYERS))
    c = np.stack([[rng.multinomial(2048, p[li]) for li in range(len(LAYERS))] for _ in range(steps)]).astype(np.int64)
    m = Manifest(layers=LAYERS, experts_per_layer=E, top_k=2, framework="synthetic", tokens_per_step=1024,
                 world_size=2, ep_size=2)
    with TraceWriter(path, m) as w:
        w.write_block(np.arange(steps // 2), c[: steps // 2])
        w.write_block(np.arange(steps // 2, steps), c[steps // 2 :])
    return path


def digest(trace: Path) -> dict[str, str]:
    """Every file of a trace directory -> sha256 of its bytes."""
    return {str(p.relative_to(trace)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(trace.rglob("*")) if p.is_file()}


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def trace(tmp_path) -> Path:
    return make_trace(tmp_path / "run.moeload")


# ---------------------------------------------------------------- 1. outputs inside the input trace

def _part(t: Path) -> Path:
    return sorted((t / "parts").iterdir())[0]


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "{t}", "--gpus", "2", "-o", "{t}/manifest.json"],
        ["export", "{t}", "{t}/manifest.json", "--format", "csv"],
        ["export", "{t}", "{t}/parts/x.npy"],
        ["backtest", "{t}", "--predictors", "last", "-o", "{part}"],
        ["predict", "{t}", "-o", "{t}/parts/f.npy"],
        ["predict", "{t}", "-o", "{t}/../run.moeload/manifest.json"],
        ["report", "{t}", "-o", "{t}/report.html"],
        ["plot", "{t}", "heatmap", "-o", "{t}"],
        ["plot", "{t}", "heatmap", "-o", "{t}/figs"],
    ],
)
def test_outputs_inside_the_input_trace_are_refused_and_the_trace_is_untouched(trace, args):
    before = digest(trace)
    r = invoke(*[a.format(t=trace, part=_part(trace)) for a in args])
    one_line_error(r, "inside the input trace")
    assert digest(trace) == before
    assert not (trace / "figs").exists()


def test_output_through_a_symlink_into_the_trace_is_refused(trace, tmp_path):
    link = tmp_path / "alias"
    os.symlink(trace, link)
    before = digest(trace)
    one_line_error(invoke("export", trace, link / "manifest.json", "--format", "csv"), "inside the input trace")
    assert digest(trace) == before


def test_report_default_output_inside_the_trace_is_refused(trace, monkeypatch):
    monkeypatch.chdir(trace)  # the default <name>.html would land in the trace directory
    one_line_error(invoke("report", "."), "inside the input trace")
    assert not list(trace.glob("*.html"))


def test_outputs_next_to_the_trace_still_work(trace, tmp_path):
    r = invoke("export", trace, tmp_path / "run.moeload.csv")  # a sibling whose name starts like the trace
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run.moeload.csv").stat().st_size > 0
    assert open_trace(trace).counts().shape == (80, 4, E)
