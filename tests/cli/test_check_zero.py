"""`moeload check` flags silent zeros (issue 12): an all-zero trace, a layer that stops receiving
tokens, steps in which no layer received any, and layers the tracer disabled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import Manifest, TraceWriter

runner = CliRunner()
LAYERS = ["blocks.0.moe.router", "blocks.1.moe.router", "blocks.2.moe.router"]


def healthy(steps: int = 60, seed: int = 0) -> np.ndarray:
    """[S, 3, 8] int64 counts, every layer receives 512 x 2 assignments per step."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(1024, np.full(8, 1 / 8), size=(steps, len(LAYERS))).astype(np.int64)


def write(path: Path, c: np.ndarray, extra: dict | None = None, block: int = 20) -> Path:
    m = Manifest(layers=LAYERS, experts_per_layer=8, top_k=2, framework="synthetic", tokens_per_step=512,
                 extra=extra or {})
    with TraceWriter(path, m) as w:
        for a in range(0, len(c), block):
            w.write_block(np.arange(a, min(a + block, len(c))), c[a : a + block])
    return path


def check(path: Path):
    return runner.invoke(app, ["check", str(path)]), json.loads(runner.invoke(app, ["check", str(path), "--json"]).stdout)


def problems(r) -> list[str]:
    return [x.removeprefix("problem: ") for x in r.stdout.splitlines() if x.startswith("problem: ")]


def test_healthy_trace_is_ok(tmp_path):
    r, d = check(write(tmp_path / "t", healthy()))
    assert r.exit_code == 0 and "ok:" in r.stdout and d["ok"] and d["problems"] == []


def test_all_zero_trace_fails_check(tmp_path):
    """What a model compiled before the tracer attached used to leave: right shape, every count 0."""
    t = write(tmp_path / "t", np.zeros((60, 3, 8), np.int64))
    r, d = check(t)
    line = one_line_error(r, "4 problems in", "every count is zero", "60 step(s) (0..59)", "(+3 more)")
    assert line and not d["ok"]
    ps = problems(r)
    assert len(ps) == 4 and "every count is zero" in ps[0]
    for li, name in enumerate(LAYERS):
        assert f"layer {li} ({name}) received no token in any of the 60 step(s) (0..59)" in ps[li + 1]
        assert "other layers did" not in ps[li + 1]


def test_layer_silent_over_trailing_steps_is_one_line_naming_it(tmp_path):
    c = healthy()
    c[35:, 1] = 0  # layer 1 stops receiving tokens (e.g. its hook was lost) while the others go on
    r, d = check(write(tmp_path / "t", c))
    one_line_error(r, "layer 1 (blocks.1.moe.router)", "25 step(s)", "35..59 (to the end of the trace)")
    assert len(d["problems"]) == 1 and not d["ok"]


def test_layer_that_never_received_a_token_while_others_did(tmp_path):
    c = healthy()
    c[:, 2] = 0
    r, d = check(write(tmp_path / "t", c))
    one_line_error(r, "layer 2 (blocks.2.moe.router) received no token in any of the 60 step(s)", "other layers did")
    assert len(d["problems"]) == 1


def test_steps_in_which_every_layer_is_zero(tmp_path):
    c = healthy()
    c[10:13] = 0  # three steps recorded, nothing routed in any layer
    c[41] = 0
    r, d = check(write(tmp_path / "t", c))
    one_line_error(r, "no layer received a token in 4 of 60 step(s): 10..12, 41")
    assert len(d["problems"]) == 1


def test_zero_runs_spanning_read_blocks_merge(tmp_path):
    """Counts are read block by block (memory bounded); a run across block edges is one range."""
    from moeload.cli.check import zero_problems
    from moeload.trace import open_trace

    c = healthy(70)
    c[5:66, 0] = 0
    t = write(tmp_path / "t", c)
    tr = open_trace(t)
    assert [len(s) for s, _ in tr.iter_blocks(16)] == [16, 16, 16, 16, 6]
    assert zero_problems(tr, block=16) == zero_problems(tr) == [
        f"{t}: layer 0 ({LAYERS[0]}) received no token in 61 step(s) in which other layers did: 5..65"]


def test_runs_keep_the_first_ranges_and_count_the_rest():
    from moeload.cli.check import _Runs

    r = _Runs()
    r.add(np.array([0, 1, 2, 5, 7]))
    r.add(np.array([8, 9, 12, 14, 16, 17]))
    steps = np.arange(100, 118)
    assert (r.n_steps, r.n_runs) == (11, 6)
    assert r.text(steps) == "100..102, 105, 107..109, 112, ... (6 ranges) (to the end of the trace)"


def test_disabled_layers_are_problems_one_line_each(tmp_path):
    extra = {"disabled_layers": {
        LAYERS[0]: {"step": 3, "ranks": [1], "reason": "router output of shape (2,)"},
        LAYERS[2]: {"step": 0, "ranks": [0], "reason": "no forward seen in steps 0..19 (compiled before the tracer attached?)"},
    }}
    r, d = check(write(tmp_path / "t", healthy(), extra))
    one_line_error(r, "2 problems in", f"layer {LAYERS[0]} was disabled by the tracer at step 3 on rank(s) [1]")
    ps = problems(r)
    assert len(ps) == 2 and "router output of shape (2,)" in ps[0] and "compiled before the tracer" in ps[1]


def test_malformed_disabled_layers_note_is_one_problem_not_a_traceback(tmp_path):
    r, _ = check(write(tmp_path / "t", healthy(), {"disabled_layers": ["a", "b"]}))
    one_line_error(r, "extra.disabled_layers is not a mapping")


# ---- real traces from LoadTracer on a torch model compiled before the tracer attached -------------

def _compiled_before_attach(path: Path, whole_step: bool) -> Path:
    """Trace 4 steps of a 2-layer top-2 MoE whose training step (whole_step) or second block alone
    was compiled and run before the tracer attached: dynamo's cached code never calls the hooks."""
    import warnings

    import torch
    from torch import nn

    from moeload import LoadTracer

    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.num_experts, self.top_k = 4, 2

        def forward(self, x):
            p = self.gate(x).softmax(-1)
            w, i = p.topk(2, -1)
            return p, w, i

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = Router()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            _, w, i = self.router(x)
            return x + self.proj(x) * w.sum(-1, keepdim=True) * (i.float().mean(-1, keepdim=True) + 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.block1 = None

        def forward(self, x):
            x = self.layers[0](x)
            return self.block1(x) if self.block1 is not None else self.layers[1](x)

    torch.manual_seed(0)
    torch.compiler.reset()
    net = Net()
    xs = [torch.randn(24, 16) for _ in range(5)]
    if whole_step:
        run = torch.compile(lambda x: net(x).square().mean(), backend="eager")
    else:
        net.block1 = torch.compile(lambda x: net.layers[1](x), backend="eager")
        run = lambda x: net(x).square().mean()  # noqa: E731
    run(xs[0]).backward()  # warm-up before the tracer: dynamo caches hook-less code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns; check must say it too
        with LoadTracer(net, path, gates="*.router", flush_every=2) as tr:
            for x in xs[1:]:
                run(x).backward()
                tr.step()
    torch.compiler.reset()
    return path


def test_compiled_step_before_attach_fails_check(tmp_path):
    t = _compiled_before_attach(tmp_path / "t", whole_step=True)
    r, d = check(t)
    one_line_error(r, "every count is zero", "4 step(s) (0..3)")
    ps = problems(r)
    assert any("layer 0 (layers.0.router) received no token in any" in p for p in ps)
    assert any("layer layers.1.router was disabled by the tracer" in p for p in ps)
    assert not d["ok"]


def test_one_block_compiled_before_attach_fails_check_naming_that_layer(tmp_path):
    t = _compiled_before_attach(tmp_path / "t", whole_step=False)
    r, d = check(t)
    one_line_error(r, "layer 1 (layers.1.router) received no token in any of the 4 step(s)", "other layers did")
    assert all("layers.0.router" not in p for p in d["problems"])


# ---- summary and report say so at the top -------------------------------------------------------

def test_summary_and_report_warn_first_about_silent_zeros_and_disabled_layers(tmp_path):
    c = healthy()
    c[35:, 1] = 0
    extra = {"disabled_layers": {LAYERS[1]: {"step": 35, "ranks": [0], "reason": "router output of shape (2,)"}}}
    t = write(tmp_path / "t", c, extra)
    d = json.loads(runner.invoke(app, ["summary", str(t), "--json"]).stdout)
    assert len(d["warnings"]) == 2 and "35..59 (to the end of the trace)" in d["warnings"][0]
    assert "disabled by the tracer at step 35" in d["warnings"][1]
    r = runner.invoke(app, ["summary", str(t)])
    assert r.exit_code == 0 and r.stdout.startswith("warning: ") and r.stdout.count("warning: ") == 2
    # a selection without the affected layer has nothing to warn about
    assert json.loads(runner.invoke(app, ["summary", str(t), "--layers", "0,2", "--json"]).stdout)["warnings"] == []
    r = runner.invoke(app, ["report", str(t), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "r.html").read_text()
    first_warn, first_section = page.index("<p class=warn>warning: "), page.index("<h2>")
    assert first_warn < first_section and page.count("<p class=warn>") == 2
    assert "layer 1 (blocks.1.moe.router) received no token in 25 step(s)" in page


def test_summary_of_a_healthy_trace_has_no_warnings(tmp_path):
    t = write(tmp_path / "t", healthy())
    assert json.loads(runner.invoke(app, ["summary", str(t), "--json"]).stdout)["warnings"] == []
    assert "warning" not in runner.invoke(app, ["summary", str(t)]).stdout
