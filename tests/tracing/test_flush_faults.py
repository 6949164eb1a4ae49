"""Flush-path faults: a full disk (real tmpfs, and an injected ENOSPC), an unwritable trace directory,
and the per-block conservation check, with real modules through the normal adapters."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _loop import Loop, sgd
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.trace.writer import part_name
from moeload.tracing import Routing

HERE = Path(__file__).resolve().parent
ENOSPC = f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
EROFS = f"OSError: [Errno {errno.EROFS}] {os.strerror(errno.EROFS)}"


class Seen:
    """A sink that tells when the writer thread has handled a block (written or failed) up to a step."""

    def __init__(self) -> None:
        self.last = -1
        self.cond = threading.Condition()

    def __call__(self, block) -> None:
        with self.cond:
            self.last = max(self.last, int(block.steps[-1]))
            self.cond.notify_all()

    def wait(self, step: int, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.last >= step, timeout), f"writer never reached step {step}"


class FakeFullDisk:
    """A FAKE FAULT (runs everywhere, without root or a tmpfs; the real one is in
    test_real_full_disk_and_read_only_remount): wraps the tracer's TraceWriter.write_block so that the
    blocks starting at `fail_first` write part of their temporary file, then raise OSError(ENOSPC)
    as a full disk does."""

    def __init__(self, tracer: LoadTracer, fail_first: set[int]) -> None:
        self.w = tracer._writer.writer
        self.write_block, self.fail_first = self.w.write_block, fail_first
        self.w.write_block = self

    def __call__(self, steps, *args, split: str = "train", **kw):
        if int(steps[0]) in self.fail_first:
            name = part_name(self.w._seq, self.w.writer_rank, split, int(min(steps)), int(max(steps)))
            tmp = self.w.parts_dir / f".{name}.tmp"
            tmp.write_bytes(b"PAR1" + bytes(100))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        return self.write_block(steps, *args, split=split, **kw)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _hidden(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "parts").iterdir() if p.name.startswith("."))


def test_injected_enospc_loses_those_blocks_only_and_tracing_resumes(tmp_path):
    lp, seen, path = Loop(), Seen(), tmp_path / "t"
    tr = LoadTracer(lp.model, path, flush_every=5, sink=seen).start()
    FakeFullDisk(tr, {10, 15, 30})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref1, _ = lp.run(25, tr)
        seen.wait(24)
        # the loss is in the manifest once the next block (20..24) is written, before close
        assert _manifest(path)["extra"]["lost_steps"] == [{"first": 10, "last": 19, "split": "train", "reason": ENOSPC}]
        assert _hidden(path) == []  # the half-written temporary parts were removed
        ref2, _ = lp.run(15, tr)
        tr.close()
    assert len([x for x in w if "trace writing failed" in str(x.message)]) == 1
    assert tr.step_count == 40 and sum(e.startswith("writer:") for e in tr.errors) == 3
    ref = np.concatenate([ref1, ref2])
    t = open_trace(path)
    assert t.gaps() == [(10, 19), (30, 34)]
    assert [(e["first"], e["last"], e["reason"]) for e in t.meta["extra"]["lost_steps"]] == [(10, 19, ENOSPC), (30, 34, ENOSPC)]
    kept_steps = [s for s in range(40) if not (10 <= s <= 19 or 30 <= s <= 34)]
    assert t.steps.tolist() == kept_steps
    np.testing.assert_array_equal(t.counts(), ref[kept_steps])
    assert t.meta["extra"]["dropped_blocks"] == 0 and tr.last_flushed_step == 39
    assert _hidden(path) == []


def test_trace_directory_replaced_by_a_file_then_restored(tmp_path):
    """Unwritable without root tricks: the directory is moved away and a file takes its name."""
    lp, seen, path, away = Loop(), Seen(), tmp_path / "t", tmp_path / "away"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(lp.model, path, flush_every=5, sink=seen) as tr:
            lp.run(5, tr)
            seen.wait(4)
            path.rename(away)
            path.write_text("not a directory")
            lp.run(10, tr)
            seen.wait(14)
            path.unlink()
            away.rename(path)
            lp.run(7, tr)
    assert len([x for x in w if "trace writing failed" in str(x.message)]) == 1
    t = open_trace(path)
    assert t.steps.tolist() == [*range(5), *range(15, 22)] and t.gaps() == [(5, 14)]
    (lost,) = t.meta["extra"]["lost_steps"]
    assert (lost["first"], lost["last"], lost["split"]) == (5, 14, "train")
    assert lost["reason"].startswith("NotADirectoryError: [Errno 20]")
    assert _hidden(path) == []


CHILD = """
import json, os, shutil, subprocess, sys, warnings
sys.path.insert(0, {tests!r})
from _loop import Loop
from test_flush_faults import Seen
from moeload import LoadTracer

mnt, out = sys.argv[1], sys.argv[2]
trace = os.path.join(mnt, "t")
lp, seen, rep = Loop(), Seen(), {{}}

def steps(n):
    lp.run(n, tr)
    seen.wait(tr.step_count - 1)

with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    tr = LoadTracer(lp.model, trace, flush_every=5, sink=seen).start()
    steps(10)
    fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        rep["fill_errno"] = e.errno
    os.close(fd)
    steps(10)                                   # 10..19: the disk is full
    rep["hidden_while_full"] = [p for p in os.listdir(os.path.join(trace, "parts")) if p.startswith(".")]
    rep["lost_while_full"] = json.load(open(os.path.join(trace, "manifest.json")))["extra"].get("lost_steps")
    os.remove(os.path.join(mnt, "filler"))
    steps(5)                                    # 20..24: space again
    rep["lost_after_free"] = json.load(open(os.path.join(trace, "manifest.json")))["extra"]["lost_steps"]
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    steps(10)                                   # 25..34: read-only
    subprocess.run(["mount", "-o", "remount,rw", mnt], check=True)
    steps(5)                                    # 35..39
    tr.close()
rep["warnings"] = [str(x.message) for x in w if "moeload" in str(x.message)]
rep["errors"] = tr.errors
shutil.copytree(trace, out)
print(json.dumps(rep))
"""


def test_real_full_disk_and_read_only_remount(tmp_path, tmpfs_unavailable):
    """A real 256 KiB tmpfs: filled up (ENOSPC), freed, remounted read-only (EROFS), then writable again."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    why = tmpfs_unavailable(mnt)
    if why:
        pytest.skip(why)
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(tests=str(HERE)))
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$1" && exec "$2" "$3" "$1" "$4"', "sh",
         str(mnt), sys.executable, str(child), str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["fill_errno"] == errno.ENOSPC
    assert rep["hidden_while_full"] == []  # no half-written part stays behind
    assert not rep["lost_while_full"]  # the manifest could not be rewritten while full...
    assert rep["lost_after_free"] == [{"first": 10, "last": 19, "split": "train", "reason": ENOSPC}]  # ...then at once
    assert len([m for m in rep["warnings"] if "trace writing failed" in m]) == 1
    assert len(rep["warnings"]) == 1, rep["warnings"]
    assert sum(e.startswith("writer:") for e in rep["errors"]) == 4
    t = open_trace(out)
    assert t.gaps() == [(10, 19), (25, 34)]
    assert t.steps.tolist() == [*range(10), *range(20, 25), *range(35, 40)]
    assert [(e["first"], e["last"], e["reason"]) for e in t.meta["extra"]["lost_steps"]] == [(10, 19, ENOSPC), (25, 34, EROFS)]
    assert _hidden(out) == []


# ---- conservation: real (buggy) gates through the generic adapter --------------------------------
E, K, H, T = 4, 2, 8, 16


class Gate(nn.Module):
    """A linear top-k router; subclasses return what a buggy router would."""

    num_experts, top_k = E, K

    def __init__(self) -> None:
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)

    def topk(self, x: torch.Tensor) -> torch.Tensor:
        return self.wg(x).topk(K, -1).indices

    def forward(self, x: torch.Tensor):
        return {"expert_indices": self.topk(x)}


class OffByOne(Gate):
    """Expert ids shifted by one: the last expert's routes go to id E."""

    def forward(self, x):
        return {"expert_indices": self.topk(x) + 1}


class ExtraRoute(Gate):
    """A routing map in which token 0 has k + 1 experts."""

    def forward(self, x):
        m = torch.zeros(x.shape[0], E, dtype=torch.bool).scatter_(1, self.topk(x), True)
        m[0] = False
        m[0, : K + 1] = True
        return {"routing_map": m}


class TokensOff(Gate):
    """Per-expert counts of a correct top-k routing, with an explicit token count that is 3 too high."""

    def forward(self, x):
        c = torch.bincount(self.topk(x).reshape(-1), minlength=E)
        return Routing(counts=c, tokens=x.shape[0] + 3)


class KeptAbove(Gate):
    """Counts with kept counts above the routed ones for expert 0."""

    def forward(self, x):
        c = torch.bincount(self.topk(x).reshape(-1), minlength=E)
        return Routing(counts=c, kept_counts=c + torch.eye(E, dtype=c.dtype)[0], tokens=x.shape[0])


class Net(nn.Module):
    def __init__(self, *gates: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.gates = nn.ModuleList(gates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return h.pow(2).mean() + sum(g.wg.weight.sum() * 0 for g in self.gates)

    def route(self, x: torch.Tensor) -> None:
        h = self.inp(x)
        for g in self.gates:
            g(h)


def test_conservation_violations_are_flagged_once_and_nothing_is_dropped(tmp_path):
    torch.manual_seed(0)
    model = Net(Gate(), OffByOne(), ExtraRoute(), TokensOff(), KeptAbove())
    path = tmp_path / "t"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(model, path, gate_types=(Gate,), kept="always", flush_every=2) as tr:
            for _ in range(6):
                x = torch.randn(T, H)
                model.route(x)
                model(x).backward()
                sgd(model)
                tr.step()
    msgs = [str(x.message) for x in w if "conservation" in str(x.message)]
    assert len(msgs) == 1 and "gates.1" in msgs[0], msgs
    cons = json.loads((path / "manifest.json").read_text())["extra"]["conservation"]
    assert cons["checked_blocks"] == 3
    by_layer = {}
    for v in cons["violations"]:
        by_layer.setdefault(v["layer"], []).append(v)
    assert sorted(by_layer) == ["gates.1", "gates.2", "gates.3", "gates.4"]  # gates.0 is sound
    for name, vs in by_layer.items():  # one entry per layer: steps 0..5 merged across the 3 blocks
        assert [(v["first"], v["last"], v["rank"]) for v in vs] == [(0, 5, None)], (name, vs)
    assert by_layer["gates.1"][0]["problem"].startswith(f"expert ids >= {E} (")
    assert by_layer["gates.2"][0]["problem"].startswith(f"routes != tokens x top_k ({T * K + 1} routes for {T} tokens")
    assert by_layer["gates.3"][0]["problem"].startswith(f"routes != tokens x top_k ({T * K} routes for {T + 3} tokens")
    assert by_layer["gates.4"][0]["problem"].startswith("kept > routed (experts [0]")
    assert cons["violations_total"] == 4
    t = open_trace(path)  # nothing dropped: every step, with the counts as the gates reported them
    assert t.steps.tolist() == list(range(6))
    assert (t.counts()[:, 2].sum(-1) == T * K + 1).all() and (t.tokens()[:, 3] == T + 3).all()
    assert (t.counts()[:, 1].sum(-1) < T * K).all()  # the ids >= E are not any expert's load


def test_conservation_holds_on_the_workload_with_capacity_dropping(tmp_path):
    """No false alarms: top-2 routing with dropped routes (kept < routed) and micro-batches."""
    lp = Loop()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(lp.model, tmp_path / "t", flush_every=3) as tr:
            for _ in range(6):
                lp.step(tr, micro=2)
    assert not [x for x in w if "conservation" in str(x.message)]
    t = open_trace(tmp_path / "t")
    assert (t.counts(kind="kept") < t.counts()).any()  # drops happened
    assert t.meta["extra"]["conservation"] == {"checked_blocks": 2, "violations": [], "violations_total": 0}


def test_resume_keeps_earlier_losses_before_the_resume_point_only(tmp_path):
    """A run resumed at step N supersedes what the first run wrote from N on (the reader's rule), so
    the first run's lost steps from N on are no longer missing; those before N still are."""
    path = tmp_path / "t"
    lp = Loop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LoadTracer(lp.model, path, flush_every=5) as tr:
            FakeFullDisk(tr, {5, 20})
            lp.run(30, tr)
    assert open_trace(path).gaps() == [(5, 9), (20, 24)]
    with LoadTracer(lp.model, path, flush_every=5) as tr:  # resumed from a checkpoint at step 15
        tr.load_state_dict({"step": 15})
        lp.run(8, tr)
    t = open_trace(path)
    assert t.gaps() == [(5, 9)] and t.steps[-1] == 22
    assert [(e["first"], e["last"]) for e in t.meta["extra"]["lost_steps"]] == [(5, 9)]
    assert t.meta["extra"]["conservation"]["checked_blocks"] == 6 + 2  # both sessions


class EvenStepsBad(Gate):
    """Adds one route to an id >= E on every other training forward: one violation run per step."""

    calls = 0

    def forward(self, x):
        idx = self.topk(x)
        EvenStepsBad.calls += self.training
        if self.training and EvenStepsBad.calls % 2:
            idx[0, 0] = E
        return {"expert_indices": idx}


def test_conservation_entries_are_capped_and_counted(tmp_path):
    from moeload.tracing.flush import VIOLATIONS_CAP

    torch.manual_seed(0)
    model = Net(EvenStepsBad())
    steps = 2 * VIOLATIONS_CAP + 10
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(model, tmp_path / "t", gate_types=(Gate,), flush_every=50) as tr:
            for _ in range(steps):
                model.route(torch.randn(T, H))
                tr.step()
    assert len([x for x in w if "conservation" in str(x.message)]) == 1
    cons = open_trace(tmp_path / "t").meta["extra"]["conservation"]
    assert len(cons["violations"]) == VIOLATIONS_CAP and cons["violations_total"] == steps // 2
    assert [(v["first"], v["last"]) for v in cons["violations"][:3]] == [(0, 0), (2, 2), (4, 4)]
    assert cons["checked_blocks"] == -(-steps // 50)


def test_unusable_trace_path_at_start_is_one_clear_error_before_training(tmp_path):
    """A path that cannot be a directory (a file is in the way) fails fast at start(), as a configuration
    error naming the path, before any step; nothing is hooked."""
    from moeload.errors import InputError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    tr = LoadTracer(Loop().model, blocker / "t.moeload")
    with pytest.raises(InputError, match=r"t\.moeload: cannot open the trace directory") as ei:
        tr.start()
    assert "\n" not in str(ei.value)
    assert not tr._handles


def test_resume_whose_first_block_is_lost_still_supersedes_the_abandoned_steps(tmp_path):
    """Issue 13: a run resumed at step 15 whose first block (15..19) is lost to a full disk (FAKE FAULT,
    FakeFullDisk): the abandoned run's steps 15..29 must not show as the new run's. The session's start
    is in the manifest before its first part, so the reader hides them at once; 15..19 are a gap."""
    path = tmp_path / "t"
    lp = Loop()
    with LoadTracer(lp.model, path, flush_every=5) as tr:
        lp.run(30, tr)
    old = open_trace(path).counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LoadTracer(lp.model, path, flush_every=5) as tr:
            tr.load_state_dict({"step": 15})
            FakeFullDisk(tr, {15})
            ref, _ = lp.run(10, tr)  # steps 15..24; 15..19 lost
    t = open_trace(path)
    assert t.meta["sessions"][-1]["first_step"] == 15
    assert t.steps.tolist() == [*range(15), *range(20, 25)] and t.gaps() == [(15, 19)]
    assert t.superseded() == [(15, 19), (25, 29)]  # the old run's steps not rewritten by the new one
    np.testing.assert_array_equal(t.counts(steps=range(20, 25)), ref[5:])
    np.testing.assert_array_equal(t.counts(steps=range(15)), old[:15])
    assert [(e["first"], e["last"]) for e in t.meta["extra"]["lost_steps"]] == [(15, 19)]
