"""Load at reduced scale: step() never waits for a slow writer; what is dropped is counted, memory is capped.

The model and step loop are benchmarks/trace_load.py's (real generic-adapter gates, a real tracer);
the slow writer is a real slow consumer: a sink that blocks on a threading.Event.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from moeload import LoadTracer, open_trace

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trace_load.py"
_spec = importlib.util.spec_from_file_location("trace_load", SCRIPT)
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)

L, E, K, TOK, F, CAP = 8, 64, 4, 16, 10, 3
STALL_S = 1.5


class StalledSink:
    """A slow consumer: the first block it gets blocks the writer thread until `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.blocks: list[tuple[int, int]] = []

    def __call__(self, block) -> None:
        self.entered.set()
        self.release.wait(60)
        self.blocks.append((int(block.steps[0]), int(block.steps[-1])))


def test_step_never_waits_for_a_stalled_writer_and_drops_are_counted(tmp_path):
    model = load.build(L, E, K, TOK)
    sink, path = StalledSink(), tmp_path / "t"
    tr = LoadTracer(model, path, gate_types=(load.LoadGate,), flush_every=F, max_pending=CAP, sink=sink).start()
    assert tr._writer.buffers_allocated == CAP  # preallocated up front
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stalled = [load.run(model, tr, F)["step_s"]]  # block 0: the writer writes it, then stalls in the sink
        assert sink.entered.wait(30)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < STALL_S or len(stalled) < 12:
            stalled.append(load.run(model, tr, F)["step_s"])  # one block
        stall = time.perf_counter() - t0
        assert not sink.blocks  # the writer sat in the sink all along
        sink.release.set()
        deadline = time.time() + 30
        while tr._writer.pending and time.time() < deadline:  # the writer catches up: every buffer free
            time.sleep(0.01)
        assert len(sink.blocks) == CAP
        manifest_before_close = json.loads((path / "manifest.json").read_text())["extra"]
        after = load.run(model, tr, CAP * F + 4)["step_s"]  # CAP blocks fit the freed buffers; close() the rest
        tr.close()
    step_s = np.concatenate(stalled[1:])
    n_stalled = len(stalled)
    # step() never waited: the worst step is a small fraction of the writer's stall
    assert stall >= STALL_S and step_s.max() < stall / 10, (step_s.max(), stall)
    # blocks 0..CAP-1 hold the buffers (one in the sink, the rest queued); every later one was dropped
    assert tr.dropped_blocks == n_stalled - CAP
    assert tr._writer.buffers_allocated == CAP  # no buffer was added under pressure
    drops = [x for x in w if "writer is behind" in str(x.message)]
    assert len(drops) == 1, [str(x.message) for x in w]
    lost = [{"first": CAP * F, "last": n_stalled * F - 1, "split": "train",
             "reason": f"dropped: trace writer behind (all max_pending={CAP} blocks still being written)"}]
    # recorded at the first manifest write after the drops (the writer's next block), and at close
    assert manifest_before_close["lost_steps"] == lost and manifest_before_close["dropped_blocks"] == n_stalled - CAP
    t = open_trace(path)
    assert t.meta["extra"]["lost_steps"] == lost and t.meta["extra"]["dropped_blocks"] == n_stalled - CAP
    total = n_stalled * F + len(after)
    assert t.gaps() == [(CAP * F, n_stalled * F - 1)]
    assert t.steps.tolist() == [*range(CAP * F), *range(n_stalled * F, total)]  # everything not dropped
    assert (t.counts().sum(-1) == TOK * K).all()
    assert t.meta["extra"]["conservation"]["violations_total"] == 0
    assert sink.blocks[0] == (0, F - 1) and tr.step_count == total


def test_benchmark_script_runs_at_small_scale(tmp_path):
    out = tmp_path / "load.json"
    res = load.main(["--steps", "300", "--layers", "4", "--experts", "32", "--flush-every", "50", "--out", str(out)])
    assert json.loads(out.read_text())["steps_on_disk"] == res["steps_on_disk"]
    # steps this fast can outrun the writer on a busy machine: then blocks are dropped, never waited for
    assert res["steps_on_disk"] + 50 * res["dropped_blocks"] == 300
    assert res["bytes_per_step"] > 0 and res["flush_step"]["max_ms"] > 0
