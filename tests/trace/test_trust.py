"""Issue 13: one writer per trace directory, manifest types and ranges, reader indices and overflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moeload.errors import InputError
from moeload.trace.lock import LOCK_NAME, TraceLock

_HOLDER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from moeload import LoadTracer

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(4, 4)
        def forward(self, x):
            return self.gate(x).softmax(-1)

    m = M()
    with LoadTracer(m, sys.argv[1], gates="gate", top_k=1, flush_every=2) as tr:
        m(torch.randn(3, 4)); tr.step()
        print("started", flush=True)
        sys.stdin.readline()
        m(torch.randn(3, 4)); tr.step()
    print("closed", flush=True)
    """
)


def _start(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p


def test_second_writer_process_is_refused_with_one_line_naming_dir_and_owner(tmp_path):
    path = tmp_path / "t"
    first = _start(path)
    try:
        assert first.stdout.readline().strip() == "started", first.stderr.read()
        second = subprocess.run([sys.executable, "-c", _HOLDER, str(path)], input="\n", capture_output=True,
                                text=True, timeout=120)
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert "InputError" in last and str(path) in last and f"pid {first.pid}" in last
        assert "started" not in second.stdout
    finally:
        out, err = first.communicate("\n", timeout=120)
    assert first.returncode == 0 and "closed" in out, err
    assert not (path / LOCK_NAME).exists()  # released at close
    again = subprocess.run([sys.executable, "-c", _HOLDER, str(path)], input="\n", capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # a later run appends as before


def test_stale_lock_of_dead_pid_is_taken_over_with_warning(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "time": time.time()}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        lock = TraceLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_other_host_or_live_pid_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "time": 0}))
    with pytest.raises(InputError, match=r"another writer holds this trace \(host elsewhere.example pid 1"):
        TraceLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "time": 0}))
    with pytest.raises(InputError, match=str(tmp_path)):
        TraceLock(tmp_path).acquire()
