"""benchmarks/tracer_overhead.py on CPU: an eager run of the tiny workload reports paired step
times and exact counts, and its count check fails on a trace that missed a gate's forwards.
(The compiled path, --compile / --mode both, spawns a worker per arm and compiles for 20-60 s on 2
cores; it is run by hand: see the script's docstring.)"""

from __future__ import annotations

import importlib.util
import json
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
