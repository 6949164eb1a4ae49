"""Issue 8, items 1 and 2: real training subprocesses killed with SIGKILL, and resumed from checkpoints.

The child (_kill_child.py) trains the embedded workload deterministically on one CPU thread with a
real LoadTracer and reports each step on stdout. Killed runs are compared with one uninterrupted
reference run of the same seed; resumed runs append to the killed run's trace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _loop import TINY_DROP

from moeload import open_trace

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).resolve().parent / "_kill_child.py"
REF_STEPS = 160
F = 4  # flush_every of the reference and the killed runs
L = len(TINY_DROP.moe_layers)
E = TINY_DROP.n_experts
TOKENS = TINY_DROP.batch_size * TINY_DROP.seq_len
ROUTES = TOKENS * TINY_DROP.top_k  # sum over experts of one layer's routed counts in one step


def _trial_moments(seed: int = 8, n: int = 6) -> list[dict]:
    """n kill moments from a seeded RNG: distinct target steps; even trials are killed a random few
    milliseconds after the target step is reported, odd trials as soon as the next part (or the
    manifest) is being written after it, i.e. while a block is half on disk."""
    rng = np.random.default_rng(seed)
    steps = rng.choice(np.arange(2, REF_STEPS - 3 * F), size=n, replace=False)
    out = []
    for i, k in enumerate(steps.tolist()):
        if i % 2 == 0:
            out.append({"trial": i, "after_step": k, "mode": "delay", "delay_ms": round(float(rng.uniform(0, 8)), 2)})
        else:
            out.append({"trial": i, "after_step": k, "mode": "mid-write"})
    return out


MOMENTS = _trial_moments()


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _parse(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return out


def _finish(proc: subprocess.Popen, timeout: float = 60) -> list[dict]:
    """Wait for a child that should exit 0; -> all its stdout records."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return _parse(out.splitlines())


def _tmp_files(trace: Path) -> list[str]:
    found = []
    for d in (trace, trace / "parts"):
        if d.is_dir():
            found += [n for n in os.listdir(d) if n.endswith(".tmp")]
    return found


def _kill(proc: subprocess.Popen) -> list[str]:
    """SIGKILL the child; -> the stdout lines it wrote before dying."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out, err = proc.stdout.read(), proc.stderr.read()  # through the buffers `_read_until` filled
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    return out.splitlines()


def _read_until(proc: subprocess.Popen, stop, lines: list[str], timeout: float = 60) -> dict:
    """Read stdout records until `stop(record)`; -> that record (fails if the child exits first)."""
    deadline = time.time() + timeout
    for line in iter(proc.stdout.readline, ""):
        lines.append(line)
        rec = _parse([line])
        if rec and stop(rec[0]):
            return rec[0]
        if time.time() > deadline:
            break
    proc.kill()
    pytest.fail(f"child ended or stalled before the expected record: {proc.stderr.read()[-3000:]}")


def _run_kill_trial(moment: dict, base: Path) -> dict:
    """One kill; a mid-write trial whose kill missed the write (no temporary file left) is run once more."""
    for attempt in (1, 2):
        r = _kill_once(moment, base / f"trial{moment['trial']}-{attempt}")
        if moment["mode"] == "delay" or r["tmp_left"]:
            break
    return {**r, "attempts": attempt}


def _kill_once(moment: dict, trace: Path) -> dict:
    proc = _spawn("--trace", str(trace), "--steps", str(REF_STEPS), "--flush-every", str(F),
                  "--hold-at", str(REF_STEPS - 1))
    lines: list[str] = []
    tmp_seen_before_kill: list[str] = []
    try:
        _read_until(proc, lambda r: r.get("step") == moment["after_step"], lines)
        if moment["mode"] == "delay":
            time.sleep(moment["delay_ms"] / 1000)
        else:  # poll for the next temporary file: a part (or the manifest) being written right now
            deadline = time.time() + 10
            while not (tmp_seen_before_kill := _tmp_files(trace)) and time.time() < deadline:
                pass
        lines += _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    recs = [r for r in _parse(lines) if "step" in r]
    return {**moment, "trace": trace, "last_step": recs[-1]["step"],
            "last_flushed": max((r["flushed"] for r in recs if r["flushed"] is not None), default=-1),
            "tmp_before_kill": tmp_seen_before_kill, "tmp_left": _tmp_files(trace)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference run and the kill trials, two processes at a time."""
    base = tmp_path_factory.mktemp("kill")
    t0 = time.perf_counter()

    def reference():
        proc = _spawn("--trace", str(base / "ref"), "--steps", str(REF_STEPS), "--flush-every", str(F))
        recs = _finish(proc, timeout=120)
        return open_trace(base / "ref"), np.array([r["counts"] for r in recs if "step" in r])

    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(reference)
        trials = list(pool.map(lambda m: _run_kill_trial(m, base), MOMENTS))
        ref_trace, ref_probe = ref.result()
    for r in trials:  # shown with -s: the moments and what each kill left
        print(f"\n{r['trial']}: {r['mode']} after step {r['after_step']} (+{r.get('delay_ms', '-')} ms): "
              f"last step reported {r['last_step']}, last flushed reported {r['last_flushed']}, "
              f"steps in trace {len(open_trace(r['trace']).steps)}, tmp left {r['tmp_left']}, attempts {r['attempts']}",
              end="")
    return {"ref": ref_trace, "ref_probe": ref_probe, "trials": trials, "seconds": time.perf_counter() - t0}


def _assert_whole_blocks_raw(trace: Path) -> int:
    """Every visible part holds every (step, layer) row of its step range with E counts each -> rows."""
    rows = 0
    for p in sorted((trace / "parts").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["step", "layer", "routed"])
        steps = np.unique(t.column("step").to_numpy())
        assert len(t) == len(steps) * L, p.name
        assert set(zip(t.column("step").to_pylist(), t.column("layer").to_pylist())) == {
            (int(s), li) for s in steps for li in range(L)}, p.name
        assert {len(x) for x in t.column("routed").to_pylist()} == {E}, p.name
        rows += len(t)
    return rows


def test_reference_run_matches_its_own_router_counts(runs):
    ref, probe = runs["ref"], runs["ref_probe"]
    assert ref.steps.tolist() == list(range(REF_STEPS))
    assert not ref.meta["extra"].get("lost_steps") and not ref.meta["extra"].get("dropped_blocks")
    np.testing.assert_array_equal(ref.counts(), probe)  # tracer vs the child's own router hooks
    assert (ref.counts().sum(-1) == ROUTES).all()


@pytest.mark.parametrize("moment", MOMENTS, ids=lambda m: f"trial{m['trial']}-{m['mode']}-after{m['after_step']}")
def test_sigkill_leaves_whole_flushed_blocks_equal_to_the_reference(runs, moment):
    r = runs["trials"][moment["trial"]]
    t = open_trace(r["trace"])  # opens: manifest intact
    steps = t.steps
    # whole blocks, a prefix of the run, every step the child saw flushed, nothing it had not stepped
    assert len(steps) % F == 0
    assert steps.tolist() == list(range(len(steps)))
    assert len(steps) - 1 >= r["last_flushed"]
    assert len(steps) - 1 <= r["last_step"] + 1
    assert t.gaps() == []
    # the reader never lists a temporary file; a plain pyarrow dataset skips them too
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in t.parts)
    rows = _assert_whole_blocks_raw(r["trace"])
    assert rows == len(steps) * L
    if len(steps):
        assert pq.ParquetDataset(r["trace"] / "parts").read(columns=["step"]).num_rows == rows
        c = t.counts()
        assert c.shape == (len(steps), L, E)
        assert (c.sum(-1) == ROUTES).all()  # conservation: tokens x top_k in every layer of every step
        assert (t.tokens() == TOKENS).all()
        assert (t.counts(kind="kept") <= c).all()
        np.testing.assert_array_equal(c, runs["ref"].counts(steps))  # no corruption
        np.testing.assert_array_equal(t.counts(kind="kept"), runs["ref"].counts(steps, kind="kept"))
    assert len(to_pd := t.to_pandas()) == len(steps) * L * E
    assert not to_pd.duplicated(["step", "layer", "expert"]).any()


def test_some_kills_landed_while_a_block_was_being_written(runs):
    """The mid-write trials must really have hit a write: a temporary file was left behind."""
    hit = [r for r in runs["trials"] if r["mode"] == "mid-write" and r["tmp_left"]]
    assert hit, [(r["trial"], r["tmp_before_kill"], r["tmp_left"]) for r in runs["trials"]]
    for r in hit:  # the half-written block is not in the trace
        t = open_trace(r["trace"])
        for name in r["tmp_left"]:
            if name.startswith(".part-"):
                first = int(name.split("-s")[1].split("-")[0])
                assert first not in t.steps


def _hold_and_kill(trace: Path, ckpts: Path, hold_at: int, flush_every: int, ckpt_every: int, steps: int) -> dict:
    """Run until step `hold_at`, wait for the writer to finish the complete blocks, SIGKILL."""
    ckpts.mkdir(exist_ok=True)
    proc = _spawn("--trace", str(trace), "--steps", str(steps), "--flush-every", str(flush_every),
                  "--ckpt-dir", str(ckpts), "--ckpt-every", str(ckpt_every), "--hold-at", str(hold_at))
    lines: list[str] = []
    try:
        held = _read_until(proc, lambda r: "hold" in r, lines)
        lines += _kill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return held


def _resume(trace: Path, ckpt: Path, flush_every: int, steps: int, *extra: str) -> np.ndarray:
    """Resume from `ckpt` to `steps`, closing normally; -> the child's own router counts [S, L, E]."""
    proc = _spawn("--trace", str(trace), "--steps", str(steps), "--flush-every", str(flush_every),
                  "--resume", str(ckpt), *extra)
    return np.array([r["counts"] for r in _finish(proc) if "step" in r])


def test_resume_replaces_replayed_steps_never_duplicates(runs, tmp_path):
    """flush_every 4, checkpoints every 10; killed at step 29 (steps 0..27 flushed); resumed from the
    checkpoint at step 20 with reshuffled batches, so the replayed steps 20..27 get other counts."""
    trace, M = tmp_path / "t.moeload", 60
    held = _hold_and_kill(trace, tmp_path / "ck", hold_at=29, flush_every=4, ckpt_every=10, steps=M)
    assert held["flushed"] == 27
    ref = runs["ref"].counts((0, M))
    first = open_trace(trace)
    assert first.steps.tolist() == list(range(28))
    np.testing.assert_array_equal(first.counts(), ref[:28])

    resumed = _resume(trace, tmp_path / "ck" / "ckpt-20.pt", 4, M, "--data-seed", "1")
    assert resumed.shape == (M - 20, L, E)
    t = open_trace(trace)
    assert t.steps.tolist() == list(range(M))  # each step once
    assert t.gaps() == []
    assert len(t.meta["sessions"]) == 2
    assert t.meta["sessions"][0]["pid"] != t.meta["sessions"][1]["pid"]
    df = t.to_pandas()
    assert len(df) == M * L * E and not df.duplicated(["step", "layer", "expert"]).any()
    c = t.counts()
    np.testing.assert_array_equal(c[:20], ref[:20])  # before the checkpoint: the first run's
    np.testing.assert_array_equal(c[20:], resumed)  # from it on: the resumed run's, replayed steps included
    assert (c[20:28] != ref[20:28]).any()  # ... which differ from what the first run had written
    assert (c.sum(-1) == ROUTES).all()
    # both copies of the replayed steps are on disk; the reader shows the later one only
    holders = [p for p in t.parts if 20 in pq.read_table(p, columns=["step"]).column("step").to_pylist()]
    assert len(holders) == 2
    assert _tmp_files(trace) == []


def test_resume_past_the_last_flush_leaves_a_reported_gap(runs, tmp_path):
    """flush_every 8, checkpoints every 5; killed at step 46 (steps 0..39 flushed, 40..46 lost);
    resumed from the checkpoint at step 45: the trace misses 40..44 and says so; the resumed run,
    with model, optimizer, data position and step numbering restored, equals the reference."""
    trace, M = tmp_path / "t.moeload", 64
    held = _hold_and_kill(trace, tmp_path / "ck", hold_at=46, flush_every=8, ckpt_every=5, steps=M)
    assert held["flushed"] == 39
    resumed = _resume(trace, tmp_path / "ck" / "ckpt-45.pt", 8, M)
    t = open_trace(trace)
    want = [*range(40), *range(45, M)]
    assert t.steps.tolist() == want
    assert t.gaps() == [(40, 44)]
    assert len(t.meta["sessions"]) == 2
    ref = runs["ref"].counts(want)
    np.testing.assert_array_equal(t.counts(), ref)  # deterministic resume: no corruption, no shift
    np.testing.assert_array_equal(resumed, ref[40:])
    assert (t.counts().sum(-1) == ROUTES).all()
