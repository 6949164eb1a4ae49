"""Damaged and empty traces on the command line: `check`, `--skip-bad-parts`, schema versions.

Every failure is exit code 2 with exactly one stderr line naming the file and the problem.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter

runner = CliRunner()
READERS = ["info", "summary", "states", "predict", "backtest", "plan", "export", "plot", "report"]


def _args(cmd, path, tmp_path):
    extra = {"export": [str(tmp_path / "x.npy")], "plot": ["-o", str(tmp_path / "figs")],
             "report": ["-o", str(tmp_path / "r.html")]}
    return [cmd, str(path), *extra.get(cmd, [])]


@pytest.fixture
def damaged(trace_dir, tmp_path):
    """The shared 160-step trace with its second part (steps 80..159) truncated."""
    d = tmp_path / "damaged"
    shutil.copytree(trace_dir, d)
    part = sorted((d / "parts").iterdir())[1]
    part.write_bytes(part.read_bytes()[:100])
    return d, part


def test_check_accepts_a_clean_trace(trace_dir):
    r = runner.invoke(app, ["check", str(trace_dir)])
    assert r.exit_code == 0 and "2 of 2 part(s) readable, 160 step(s) (0..159)" in r.stdout and "ok:" in r.stdout
    d = json.loads(runner.invoke(app, ["check", str(trace_dir), "--json"]).stdout)
    assert d["ok"] and d["problems"] == [] and d["steps"] == 160 and d["gaps"] == []


def test_check_lists_every_problem(damaged):
    d, part = damaged
    (d / "parts" / "notes.txt").write_text("x")
    (d / "parts" / ".part-000002-r0-train-s000000160-000000169.parquet.tmp").write_bytes(b"half")  # killed writer
    r = runner.invoke(app, ["check", str(d)])
    line = one_line_error(r, "2 problems in", part.name, "unreadable Parquet part", "(+1 more)")
    problems = [x for x in r.stdout.splitlines() if x.startswith("problem: ")]
    assert len(problems) == 2 and "notes.txt: not a part name" in problems[1]
    assert "1 of 2 part(s) readable, 80 step(s) (0..79)" in r.stdout and line
    r = runner.invoke(app, ["check", str(d), "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 2 and not out["ok"] and out["bad_parts"][0]["path"] == str(part)
    assert out["gaps"] == [[80, 159]]


@pytest.mark.parametrize("cmd", READERS)
def test_skip_bad_parts_reads_the_rest_with_one_warning_line(cmd, damaged, tmp_path):
    d, part = damaged
    one_line_error(runner.invoke(app, _args(cmd, d, tmp_path)), str(part), "--skip-bad-parts")
    r = runner.invoke(app, [*_args(cmd, d, tmp_path), "--skip-bad-parts"])
    assert r.exit_code == 0, (r.output, r.exception)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeload: warning: ") and part.name in lines[0], r.stderr


def test_info_with_skipped_parts_shows_the_gap(damaged):
    d, _ = damaged
    # a later, healthy part past the damaged one: steps 80..159 become a gap inside the trace
    m = Manifest(layers=["model.layers.0.mlp.gate", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate"],
                 experts_per_layer=8, top_k=2, framework="synthetic", tokens_per_step=4096, world_size=2, ep_size=2)
    with TraceWriter(d, m) as w:
        w.write_block(np.arange(160, 170), np.ones((10, 3, 8), int))
    out = json.loads(runner.invoke(app, ["info", str(d), "--json", "--skip-bad-parts"]).stdout)
    assert out["gaps"] == [[80, 159]] and out["num_steps"] == 90 and out["last_step"] == 169
    assert len(out["bad_parts"]) == 1 and "unreadable Parquet part" in out["bad_parts"][0]["problem"]
    r = runner.invoke(app, ["info", str(d), "--skip-bad-parts"], env={"COLUMNS": "400"})
    assert "skipped parts" in r.stdout and "80 step(s) missing in 1 range(s): 80..159" in r.stdout


@pytest.mark.parametrize("cmd", ["info", "check", "summary"])
def test_manifest_from_a_future_schema_version(cmd, trace_dir, tmp_path):
    d = tmp_path / "future"
    shutil.copytree(trace_dir, d)
    man = json.loads((d / "manifest.json").read_text())
    man["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(man))
    one_line_error(runner.invoke(app, [cmd, str(d)]), str(d / "manifest.json"), "schema_version 99 is newer", "upgrade moeload")


def test_missing_manifest_in_check(trace_dir, tmp_path):
    d = tmp_path / "nomanifest"
    shutil.copytree(trace_dir, d)
    (d / "manifest.json").unlink()
    one_line_error(runner.invoke(app, ["check", str(d)]), "manifest.json: missing")


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    d = tmp_path_factory.mktemp("empty") / "t"
    TraceWriter(d, Manifest(layers=["a", "b"], experts_per_layer=[4, 4], top_k=2)).close()
    return d


def test_empty_trace_info_and_check(empty):
    r = runner.invoke(app, ["info", str(empty), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["num_steps"] == 0
    one_line_error(runner.invoke(app, ["check", str(empty)]), "no parts; no step has been recorded")


@pytest.mark.parametrize("cmd", [c for c in READERS if c != "info"])
def test_empty_trace_commands_say_there_are_no_steps(cmd, empty, tmp_path):
    one_line_error(runner.invoke(app, _args(cmd, empty, tmp_path)), str(empty))
