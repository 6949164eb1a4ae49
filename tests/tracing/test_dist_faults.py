"""A dead or slow rank at a flush, on 2 real gloo processes: no rank hangs, tracing stops cleanly where
the flush's collective fails or passes `flush_timeout`, what was written before stays readable.

Every run is bounded by a hard timeout (the processes are killed and the test fails), so CI never hangs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _loop import Loop

from moeload import LoadTracer, open_trace

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
HARD_TIMEOUT = 60

WORKER = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    import numpy as np, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from _loop import Loop
    from moeload import LoadTracer
    rank, path, out, mode, timeout, delay = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    lp = Loop(seed=0, data_seed=100 + rank)
    tracer = LoadTracer(lp.model, path, flush_every=3, flush_timeout=timeout)
    refs, step_s = [], []
    t_start = time.time()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with tracer:
            for s in range(9):  # flushes at steps 2, 5 and 8
                if rank == 1 and s == 3 and mode == "dead":
                    os._exit(0)  # dies between two flushes, without a word
                if rank == 1 and s == 8 and mode == "nan":  # this rank's router 1 goes NaN in the last block
                    lp.model.blocks[1].moe.router.gate.weight.data.fill_(float("nan"))
                refs.append(np.stack(lp.step(None)))  # forward, backward, optimizer step: [2 (routed, kept), L, E]
                if rank == 1 and s == 5:
                    time.sleep(delay)  # slow before the flush of steps 3..5
                t0 = time.time()
                tracer.step()
                step_s.append(time.time() - t0)
    res = dict(rank=rank, step_s=step_s, total_s=time.time() - t_start, refs=np.stack(refs).tolist(),
               stopped=tracer.tracing_stopped, collectives=tracer.collectives, flushes=tracer.flushes,
               step_count=tracer.step_count, disabled=tracer.disabled_layers,
               warnings=[str(x.message) for x in w if str(x.message).startswith("moeload")])
    Path = __import__("pathlib").Path
    Path(out).write_text(json.dumps(res))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(tmp_path: Path, mode: str, timeout: float, delay: float = 0.0) -> tuple[list[dict | None], float]:
    """Both ranks of `mode`; -> (their results, None for a rank that wrote none; wall seconds)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "t"), str(outs[r]), mode, str(timeout),
                               str(delay)], env=env, stderr=subprocess.PIPE) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=max(1.0, HARD_TIMEOUT - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{mode}: a rank hung (killed after {HARD_TIMEOUT} s)")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    wall = time.time() - t0
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r}: " + p.stderr.read().decode()[-3000:]
    return [json.loads(o.read_text()) if o.exists() else None for o in outs], wall


def manifest_extra(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]


def stop_warnings(res: dict) -> list[str]:
    return [m for m in res["warnings"] if "tracing stopped" in m]


def test_dead_rank_rank0_stops_tracing_within_the_timeout(tmp_path):
    timeout = 3.0
    (r0, r1), _ = run_pair(tmp_path, "dead", timeout)
    assert r1 is None  # rank 1 died at step 3
    assert max(r0["step_s"]) < timeout + 1.5  # the failed flush (step 5) returned within timeout + slack
    assert r0["step_count"] == 9 and len(r0["refs"]) == 9  # training went on to the end
    assert len(stop_warnings(r0)) == 1 and len(r0["warnings"]) == 1
    assert r0["stopped"]["step"] == 3 and r0["flushes"] == 1 and r0["collectives"] == 2
    extra = manifest_extra(tmp_path)
    assert extra["tracing_stopped"] == r0["stopped"] and "flush collective failed" in extra["tracing_stopped"]["reason"]
    assert [(e["first"], e["last"], e["split"]) for e in extra["lost_steps"]] == [(3, 5, "train")]
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == [0, 1, 2]  # the block flushed before the death is intact
    np.testing.assert_array_equal(t.rank_counts()[:, 0], np.array(r0["refs"])[:3, 0])
    assert t.gaps() == [] and (t.rank_counts()[:, 1].sum(-1) > 0).all()


def test_slow_rank_within_the_timeout_completes_the_trace_and_nan_on_one_rank(tmp_path):
    """Rank 1 is 1.5 s late at the flush of steps 3..5 (flush_timeout 10 s, a wide margin for a loaded CI
    machine; the test takes no longer for it): nothing stops, every step is
    there with each rank's own counts. Also: rank 1's router 1 goes NaN in the last block: both ranks
    see it in the gathered block and disable the layer, one warning each; the manifest names rank 1."""
    (r0, r1), _ = run_pair(tmp_path, "nan", 10.0, delay=1.5)
    for r in (r0, r1):
        assert r["stopped"] is None and r["flushes"] == 3 and not stop_warnings(r)
        assert r["disabled"] == ["blocks.1.moe.router"]
        assert [m for m in r["warnings"] if "disabled" in m] == r["warnings"] and len(r["warnings"]) == 1
    assert max(r0["step_s"]) > 0.5  # rank 0 really waited for the late rank
    extra = manifest_extra(tmp_path)
    assert "tracing_stopped" not in extra and not extra.get("lost_steps")
    assert extra["disabled_layers"] == {"blocks.1.moe.router": {"step": 8, "ranks": [1], "reason": "NaN router probabilities"}}
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(9))
    rc = t.rank_counts()
    for q, r in enumerate((r0, r1)):
        np.testing.assert_array_equal(rc[:, q], np.array(r["refs"])[:, 0])


def test_rank_slower_than_the_timeout_both_stop_cleanly(tmp_path):
    """Rank 1 is 4 s late at the flush of steps 3..5 (flush_timeout 2 s): rank 0 gives up after 2 s and
    stops tracing; rank 1, arriving late, finds the flush failed and stops as well; neither hangs."""
    timeout, delay = 2.0, 4.0
    (r0, r1), wall = run_pair(tmp_path, "slow", timeout, delay)
    assert timeout - 0.2 < r0["step_s"][5] < timeout + 1.5
    assert r1["step_s"][5] < timeout + 1.5
    for r in (r0, r1):
        assert r["stopped"]["step"] == 3 and len(stop_warnings(r)) == 1 and len(r["warnings"]) == 1
        assert r["step_count"] == 9 and r["flushes"] == 1
    extra = manifest_extra(tmp_path)
    assert extra["tracing_stopped"] == r0["stopped"]
    assert open_trace(tmp_path / "t").steps.tolist() == [0, 1, 2]
    assert wall < HARD_TIMEOUT


class CopyEvent:
    """A FAKE for the CUDA event of a block's device->host copy stuck behind an NCCL all_gather (a dead
    or slow peer), which a CPU-only machine cannot produce: query() turns True `after` seconds from
    creation (None: never)."""

    def __init__(self, after: float | None) -> None:
        self.done_at = None if after is None else time.monotonic() + after

    def query(self) -> bool:
        return self.done_at is not None and time.monotonic() >= self.done_at


@pytest.mark.parametrize("late", [None, 1.0])
def test_stuck_device_copy_is_given_up_after_the_timeout_and_close_returns(tmp_path, late):
    """NCCL path (the writer thread's wait for the copy): the copy of steps 3..5 never completes (dead
    peer) or completes 1 s late (slow peer), flush_timeout 0.5 s. The block is given up after 0.5 s (its
    steps in extra.lost_steps, one warning); a later copy still stuck behind it waits its own timeout, or
    none once close() has begun; once the stream moves again, later blocks are written. close() never
    hangs; tracing itself goes on."""
    lp = Loop()
    tr = LoadTracer(lp.model, tmp_path / "t", flush_every=3, flush_timeout=0.5).start()
    jobs = tr._writer._jobs
    put = jobs.put
    events = {3: CopyEvent(late), 6: CopyEvent(None if late is None else 0.0)}
    jobs.put = lambda job, *a, **k: put(job if job is None or int(job.steps[0]) not in events
                                        else job._replace(event=events[int(job.steps[0])]), *a, **k)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        lp.run(9, tr)
        t0 = time.time()
        tr.close()
        close_s = time.time() - t0
    msgs = [str(x.message) for x in w if str(x.message).startswith("moeload")]
    assert len(msgs) == 1 and "did not reach the host" in msgs[0] and "flush_timeout=0.5" in msgs[0]
    assert close_s < 0.5 + 1.5 and tr.tracing_stopped is None and tr.flushes == 3
    extra = manifest_extra(tmp_path)
    lost = [(e["first"], e["last"]) for e in extra["lost_steps"]]
    t = open_trace(tmp_path / "t")
    if late is None:  # the stream never moves again: 6..8 given up at once behind 3..5
        assert lost == [(3, 8)] and t.steps.tolist() == [0, 1, 2]
    else:
        assert lost == [(3, 5)] and t.steps.tolist() == [0, 1, 2, 6, 7, 8] and t.gaps() == [(3, 5)]


def test_flush_timeout_must_be_positive_seconds_or_none(tmp_path):
    from moeload.errors import InputError

    model = Loop().model
    for bad in (0, -1.0, "300", True):
        with pytest.raises(InputError, match="flush_timeout"):
            LoadTracer(model, tmp_path / "t", flush_timeout=bad)
    assert LoadTracer(model, tmp_path / "t", flush_timeout=None).flush_timeout is None
    assert LoadTracer(model, tmp_path / "t").flush_timeout == 300.0
