"""Shared fixtures for the whole suite."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests use tiny models: one thread is fastest, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tmpfs_unavailable(where: Path) -> str | None:
    """None where `unshare -m` + a tmpfs mount at `where` (created here) works on this machine, else why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount not installed"
    where.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace: {r.stderr.strip()}"


@pytest.fixture
def tmpfs_unavailable() -> Callable[[Path], str | None]:
    """The probe for the real full-disk tests (a small tmpfs in a private mount namespace)."""
    return _tmpfs_unavailable
