"""`moeload import` interrupted midway leaves no trace at all (issue 13): the import is built in a
hidden sibling directory and renamed into place only when complete.

Real faults in real processes: a per-file size limit (RLIMIT_FSIZE, EFBIG) and a real full tmpfs
(ENOSPC, where `unshare -m` can mount one). Each input holds three 1000-step parts: the first two
compress to a few KiB, the third (random counts) to about 250 KiB, so the failure comes after two
parts were written. A fault injected into the part writer stands in where none can be caused.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cli import one_line_error
from typer.testing import CliRunner

from moeload.cli import app
from moeload.trace import TraceWriter, open_trace

runner = CliRunner()
LIMIT = 64 * 1024  # bytes: holds the manifest and the two small parts, not the third part


def counts_file(path: Path, steps: int = 3000) -> Path:
    """A .npy of counts [steps, 2, 16]: near-constant for 2000 steps, then random 40-bit counts."""
    rng = np.random.default_rng(0)
    c = np.ones((steps, 2, 16), dtype=np.int64)
    if steps > 2000:
        c[2000:] = rng.integers(0, 2**40, size=(steps - 2000, 2, 16))
    np.save(path, c)
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    """Entries of `parent` that are the target `name` or one of its hidden build directories."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def moeload(*args: object, preexec_fn=None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeload", *map(str, args)], capture_output=True, text=True,
                          timeout=180, preexec_fn=preexec_fn, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def stderr_line(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("moeload: error: "), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    return lines[0]


def _fsize_limit() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))  # Python ignores SIGXFSZ: writes fail with EFBIG


def test_file_size_limit_hit_on_the_third_part_leaves_no_target(tmp_path):
    small, big = counts_file(tmp_path / "small.npy", 2000), counts_file(tmp_path / "big.npy")
    ok = moeload("import", "numpy", small, tmp_path / "ok", "--top-k", "2", preexec_fn=_fsize_limit)
    assert ok.returncode == 0, ok.stderr  # two parts and the manifest fit under the limit
    assert len(open_trace(tmp_path / "ok").parts) == 2
    p = moeload("import", "numpy", big, tmp_path / "new" / "t", "--top-k", "2", preexec_fn=_fsize_limit)
    line = stderr_line(p)
    assert str(tmp_path / "new" / "t") in line and os.strerror(errno.EFBIG) in line and "nothing was written" in line
    assert not (tmp_path / "new").exists()  # the parent folder the import created is gone too
    assert leftovers(tmp_path, "t") == []
    assert p.stdout == ""
    full = moeload("import", "numpy", big, tmp_path / "t", "--top-k", "2")  # without the limit: all three parts
    assert full.returncode == 0, full.stderr
    assert open_trace(tmp_path / "t").counts().shape == (3000, 2, 16)
    assert leftovers(tmp_path, "t") == ["t"]


def test_real_full_disk_midway_leaves_no_target(tmp_path, tmpfs_unavailable):
    """A real 96 KiB tmpfs: a 2000-step import fits; a 3000-step one fills it at its third part."""
    mnt = tmp_path / "mnt"
    why = tmpfs_unavailable(mnt)
    if why:
        pytest.skip(why)
    small, big = counts_file(tmp_path / "small.npy", 2000), counts_file(tmp_path / "big.npy")
    script = ('mount -t tmpfs -o size=96k tmpfs "$1" || exit 9; '
              '"$2" -m moeload import numpy "$3" "$1/ok" --top-k 2 2>"$5/ok.err"; echo $? > "$5/ok.rc"; '
              '"$2" -m moeload import numpy "$4" "$1/t" --top-k 2; rc=$?; '
              'ls -A "$1" > "$5/listing"; ls -A "$1/ok/parts" > "$5/ok.parts"; exit $rc')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(mnt), sys.executable, str(small), str(big),
                        str(tmp_path)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "ok.rc").read_text().strip() == "0", (tmp_path / "ok.err").read_text()
    assert len((tmp_path / "ok.parts").read_text().split()) == 2  # two parts fit on this disk
    line = stderr_line(r)
    assert f"{mnt}/t: cannot write the imported trace" in line and os.strerror(errno.ENOSPC) in line
    assert (tmp_path / "listing").read_text().split() == ["ok"]  # no target, no hidden build directory


def test_injected_write_fault_after_two_parts_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """FAKE fault (stands in for a disk that fills while the CLI runs in-process): the part writer
    raises ENOSPC on its third part, after two parts were really written."""
    src = counts_file(tmp_path / "c.npy")
    real = TraceWriter.write_block
    seen: list[int] = []

    def fake_full_disk(self, steps, *a, **k):
        seen.append(len(list((self.path / "parts").glob("part-*.parquet"))))
        if len(seen) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, steps, *a, **k)

    monkeypatch.setattr(TraceWriter, "write_block", fake_full_disk)
    r = runner.invoke(app, ["import", "numpy", str(src), str(tmp_path / "t"), "--top-k", "2"])
    one_line_error(r, str(tmp_path / "t"), "No space left on device", "nothing was written")
    assert seen == [0, 1, 2]  # the fault came with two parts on disk
    assert leftovers(tmp_path, "t") == []


def test_existing_target_is_refused_and_left_untouched(tmp_path):
    src = counts_file(tmp_path / "c.npy", 10)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    one_line_error(runner.invoke(app, ["import", "numpy", str(src), str(tmp_path / "t"), "--top-k", "2"]),
                   str(tmp_path / "t"), "already exists")
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path, "t") == ["t"]
