"""benchmarks/tracer_overhead.py on CPU: an eager run of the tiny workload reports paired step
times and exact counts, and its count check fails on a trace that missed a gate's forwards; a
compiled run with grouped experts (one worker process per arm, dynamo with the aot_eager backend:
same guards and recompiles as inductor, no code generation) compiles only in its warm-up; the
workload's loop experts recompile while measured, which fails the run; a time budget stops a mode
and the result says it is incomplete."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeload import LoadTracer, open_trace
from moeload.workloads import batches, build_model, get_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tracer_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("tracer_overhead_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eager_run_pairs_steps_and_checks_counts(bench, tmp_path):
    r = bench.main(["--device", "cpu", "--config", "tiny", "--steps", "4", "--warmup", "1", "--block", "2",
                    "--hook-rounds", "2", "--flush-every", "3", "--out", str(tmp_path)])
    assert "failed" not in r
    m = r["modes"]["eager"]
    assert m["counts_exact"] and m["count_check_failures"] == []
    assert len(m["traced_s"]) == len(m["plain_s"]) == 4 and min(m["traced_s"] + m["plain_s"]) > 0
    lo, hi = m["summary"]["overhead_ci95_pct"]
    assert lo <= m["summary"]["overhead_pct"] <= hi
    on_disk = json.loads((tmp_path / "tracer_overhead_tiny_cpu.json").read_text())
    assert on_disk["summary"] == m["summary"] and on_disk["dynamo"] is None  # eager: dynamo never ran


def test_count_check_names_a_step_without_forwards(bench, tmp_path):
    cfg = get_config("tiny")
    model = build_model(cfg, 0, torch.device("cpu"))
    data = batches(cfg, 0)
    tracer = LoadTracer(model, tmp_path / "t", flush_every=10).start()
    with pytest.warns(RuntimeWarning, match="step 1: no forward"):
        for s in range(3):
            if s != 1:  # step 1 runs no forward: its counts are zero, as under a compiled graph without the hooks
                x, y = next(data)
                model(x, y).loss.backward()
            tracer.step()
        tracer.close()
    t = open_trace(tmp_path / "t")
    failures = bench.check_counts(t, 3, cfg.tokens_per_batch, cfg.top_k)
    assert len(failures) == 2 and all("step 1," in f for f in failures), failures
    assert bench.check_counts(t, 4, cfg.tokens_per_batch, cfg.top_k) == ["3 steps recorded, 4 run"]


def test_compiled_grouped_experts_compile_once_and_count_exactly(tmp_path):
    steps = 6
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--config", "tiny", "--mode", "compiled",
                          "--steps", str(steps), "--warmup", "2", "--block", "2", "--backend", "aot_eager", "--threads", "1",
                          "--save-every", "0.01", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((tmp_path / "tracer_overhead_tiny_cpu_compiled.json").read_text())
    assert r["complete"] and r["stopped"] == {} and "failed" not in r, r.get("failed")
    assert r["expert_ffn"] == "grouped" and r["capacity_factor"] == 1.25
    m = r["modes"]["compiled"]
    assert m["counts_exact"] and m["summary"]["n_pairs"] == steps and m["compiled_steps_measured"] == []
    graphs = {}
    for name, d in r["dynamo"].items():
        w, e = d["at"]["after_warmup"], d["at"]["end"]
        assert w["graphs"] > 0 and e == w, (name, d)  # compiled in the warm-up, nothing after
        assert d["recompile_limit_hits"] == [] and d["recompile_reasons"]["measured"] == []
        graphs[name] = w["graphs"]
    assert graphs["traced"] == graphs["plain"]  # the tracer's hook adds no graph (it runs in the eager router)
    assert f"[compiled] {steps}/{steps} pairs" in run.stdout and "0 recompiles while measured" in run.stdout
    print(f"compiled tiny run: {took:.1f} s")


def test_loop_experts_recompile_while_measured_and_fail(bench, tmp_path):
    """One arm in this process (the real Arm, dynamo's eager backend): the per-expert chunk sizes change
    with the routing, so dynamo recompiles in measured steps; compose() turns that into a failure."""
    import torch

    args = bench.parse(["--device", "cpu", "--config", "tiny", "--mode", "compiled", "--experts", "loop", "--steps", "14",
                        "--warmup", "2", "--block", "2", "--backend", "eager"])
    cfg, device = bench.setup(args)
    torch.compiler.reset()
    try:
        arm = bench.Arm("traced", args, cfg, device, ["compiled"], str(tmp_path))
        prog = bench.Progress(["compiled"])
        for start in range(0, 16, 2):
            d = arm.run("compiled", list(range(start, start + 2)))
            prog.compiled["compiled"].update(d["compiled"])
            for name in bench.ARMS:
                prog.times["compiled"][name] += d["times"]
            if start == 0:
                arm.mark("after_warmup")
        done = arm.finish()
    finally:
        torch.compiler.reset()
    hot = sorted(j for j in prog.compiled["compiled"] if j >= 2)
    assert hot, "the loop experts' data-dependent chunk sizes should recompile after the warm-up"
    r = bench.compose(args, cfg, ["compiled"], prog, {"traced": done, "plain": done}, "cpu", 1.0, None)
    assert r["modes"]["compiled"]["counts_exact"]  # the counts stay exact; the timing is what is spoiled
    assert r["modes"]["compiled"]["compiled_steps_measured"] == hot
    assert any("compiled or recompiled in" in f for f in r["failed"]) and bench.exit_code(r) == 1


@pytest.mark.parametrize("limit", ["--budget-s", "--deadline-s"])
def test_time_limit_stops_a_mode_and_marks_the_result_incomplete(bench, tmp_path, limit):
    r = bench.main(["--device", "cpu", "--config", "tiny", "--steps", "100000", "--warmup", "1", "--block", "2",
                    "--hook-rounds", "2", limit, "1", "--out", str(tmp_path)])
    m = r["modes"]["eager"]
    assert not r["complete"] and r["stopped"]["eager"].startswith(limit) and "failed" not in r
    assert bench.exit_code(r) == 3
    assert m["summary"]["n_pairs"] < 100000 and m["counts_exact"]  # the steps it ran, all exact
    if limit == "--budget-s":  # measured for 1 s (a deadline of 1 s may pass during the set-up)
        assert m["summary"]["n_pairs"] >= 2
    on_disk = json.loads((tmp_path / "tracer_overhead_tiny_cpu.json").read_text())
    assert on_disk["complete"] is False and on_disk["modes"]["eager"]["summary"] == m["summary"]


def test_bad_input_is_refused_in_one_line(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--budget-s", "-1"])
    assert "--budget-s -1.0: out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "nope"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("tracer_overhead: workload config 'nope': unknown")
