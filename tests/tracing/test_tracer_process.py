"""Real processes: a traced run killed with SIGKILL, and a 2-rank gloo run (per-rank counts, one collective per flush)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from moeload import open_trace
from moeload.trace.writer import PART_RE

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent

KILLED = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from moeload import LoadTracer
    from moeload.workloads import batches, build_model, get_config
    cfg = get_config("tiny")
    model, data = build_model(cfg), batches(cfg)
    from _loop import sgd
    tracer = LoadTracer(model, sys.argv[1], flush_every=3).start()
    while True:  # runs until killed
        x, y = next(data)
        model(x, y).loss.backward()
        sgd(model)
        tracer.step()
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
    env.pop("MASTER_PORT", None)
    return env


def test_sigkilled_writer_leaves_a_readable_trace_of_whole_blocks(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED)
    path = tmp_path / "killed.moeload"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if path.joinpath("parts").is_dir() and len(list(path.joinpath("parts").glob("part-*"))) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    t = open_trace(path)
    parts = [p for p in t.parts if PART_RE.match(p.name)]
    assert len(parts) >= 4
    assert t.steps.tolist() == list(range(3 * len(parts)))  # exactly the flushed steps, whole blocks
    assert (t.counts().sum(-1) == 4 * 32 * 2).all()  # no step is partial


WORKER = textwrap.dedent(
    """
    import sys, numpy as np, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from torch.autograd.profiler import profile  # the legacy profiler: no kineto start-up cost
    from _loop import Loop
    from moeload import LoadTracer
    rank, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    lp = Loop(seed=0, data_seed=100 + rank)  # same weights, different data on each rank
    tracer = LoadTracer(lp.model, path, flush_every=3)
    refs, kept, per_step, prof = [], [], [], []
    with tracer:
        for s in range(7):
            before = tracer.collectives
            with profile(use_kineto=False) as p:
                r, k = lp.step(tracer)  # forward, backward, optimizer step, tracer.step()
            prof.append(sum(e.name.startswith("c10d::") for e in p.function_events))
            per_step.append(tracer.collectives - before)
            refs.append(r); kept.append(k)
        before = tracer.collectives
    np.savez(out, routed=np.stack(refs), kept=np.stack(kept), per_step=per_step, prof=prof,
             close=tracer.collectives - before, flushes=tracer.flushes)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_per_rank_and_global_counts_one_collective_per_flush(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path = tmp_path / "dist.moeload"
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(path), str(tmp_path / f"rank{r}.npz")],
                         env=env, stderr=subprocess.PIPE)
        for r in range(2)
    ]
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers hung")
    for p in procs:
        assert p.returncode == 0, p.stderr.read().decode()[-3000:]
    res = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    t = open_trace(path)
    assert t.meta["world_size"] == 2 and t.meta["ranks_recorded"] is True
    assert t.steps.tolist() == list(range(7))
    rc, rk = t.rank_counts(), t.rank_counts(kind="kept")  # [S, R, L, E]
    for r in range(2):
        np.testing.assert_array_equal(rc[:, r], res[r]["routed"])
        np.testing.assert_array_equal(rk[:, r], res[r]["kept"])
    np.testing.assert_array_equal(t.counts(), res[0]["routed"] + res[1]["routed"])
    assert not np.array_equal(res[0]["routed"], res[1]["routed"])  # the ranks really saw different data
    for r in range(2):
        # flush_every=3: steps 2 and 5 flush (one collective each), the others none; close() one more
        assert res[r]["per_step"].tolist() == [0, 0, 1, 0, 0, 1, 0]
        assert res[r]["prof"].tolist() == [0, 0, 1, 0, 0, 1, 0]  # the profiler agrees: one c10d op
        assert int(res[r]["close"]) == 1 and int(res[r]["flushes"]) == 3
