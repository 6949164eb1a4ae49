"""`import_trace` builds the trace in a hidden sibling directory and renames it into place only
when complete (issue 13): after a failure the target does not exist and no build directory stays.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from moeload.errors import InputError, TraceFormatError
from moeload.trace import TraceWriter, open_trace
from moeload.trace.importers import import_trace
from moeload.trace.importers._common import BLOCK


def leftovers(parent: Path, name: str) -> list[str]:
    """Entries of `parent` that are the target `name` or one of its hidden build directories."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def tidy_csv(path: Path, steps: int, bad_row: str | None = None) -> Path:
    rows = ["step,layer,expert,count"] + [f"{s},{li},{e},{s + e}" for s in range(steps) for li in range(2)
                                          for e in range(4)]
    if bad_row is not None:
        rows.append(bad_row)
    path.write_text("\n".join(rows) + "\n")
    return path


def npy(path: Path, steps: int) -> Path:
    np.save(path, np.arange(steps * 2 * 4, dtype=np.int64).reshape(steps, 2, 4))
    return path


def fail_on_part(monkeypatch, n: int, exc: BaseException) -> list[int]:
    """FAKE fault (a disk that fills, or an interrupt, cannot be caused at a chosen part here): the
    part writer raises `exc` instead of writing its n-th part. Returns the parts on disk at each call."""
    real = TraceWriter.write_block
    seen: list[int] = []

    def faulty(self, steps, *a, **k):
        seen.append(len(list((self.path / "parts").glob("part-*.parquet"))))
        if len(seen) == n:
            raise exc
        return real(self, steps, *a, **k)

    monkeypatch.setattr(TraceWriter, "write_block", faulty)
    return seen


def test_a_finished_import_leaves_only_the_target(tmp_path):
    out = import_trace("numpy", npy(tmp_path / "c.npy", 2 * BLOCK + 5), tmp_path / "a" / "b" / "t", top_k=2)
    assert out == tmp_path / "a" / "b" / "t"
    assert len(open_trace(out).parts) == 3 and open_trace(out).counts().shape == (2 * BLOCK + 5, 2, 4)
    assert leftovers(tmp_path / "a" / "b", "t") == ["t"]
    assert oct((tmp_path / "a" / "b" / "t").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_disk_full_on_the_third_part_leaves_no_target(tmp_path, monkeypatch):
    seen = fail_on_part(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    dest = tmp_path / "new" / "t"
    with pytest.raises(InputError, match=rf"^{dest}: cannot write the imported trace \(No space left on device\)"):
        import_trace("numpy", npy(tmp_path / "c.npy", 3 * BLOCK), dest, top_k=2)
    assert seen == [0, 1, 2]  # two parts were on disk when it failed
    assert not dest.exists() and not dest.parent.exists()  # nor the parent folder it had made
    assert leftovers(tmp_path, "new") == []


def test_an_interrupt_midway_removes_the_build_directory_and_propagates(tmp_path, monkeypatch):
    seen = fail_on_part(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        import_trace("numpy", npy(tmp_path / "c.npy", 3 * BLOCK), tmp_path / "t", top_k=2)
    assert seen == [0, 1]
    assert leftovers(tmp_path, "t") == []


def test_out_of_memory_midway_is_one_line_naming_the_target(tmp_path, monkeypatch):
    fail_on_part(monkeypatch, 2, MemoryError())
    with pytest.raises(InputError, match=rf"^{tmp_path / 't'}: out of memory while writing"):
        import_trace("numpy", npy(tmp_path / "c.npy", 3 * BLOCK), tmp_path / "t", top_k=2)
    assert leftovers(tmp_path, "t") == []


def test_a_refusing_check_writes_nothing(tmp_path):
    def refuse(imp):
        assert imp.counts.shape == (5, 1, 2, 4)  # it sees what was read
        raise InputError("refused")

    with pytest.raises(InputError, match="refused"):
        import_trace("numpy", npy(tmp_path / "c.npy", 5), tmp_path / "t", check=refuse)
    assert leftovers(tmp_path, "t") == []


def test_malformed_last_row_of_a_large_csv_leaves_nothing(tmp_path):
    src = tidy_csv(tmp_path / "c.csv", 3 * BLOCK, bad_row="2999,0,5,x")
    with pytest.raises(TraceFormatError, match=rf"{src}: column 'count' must hold integers"):
        import_trace("csv", src, tmp_path / "t", top_k=2)
    assert leftovers(tmp_path, "t") == []


def test_an_empty_existing_directory_is_replaced_and_a_full_one_refused(tmp_path):
    (tmp_path / "t").mkdir()
    import_trace("numpy", npy(tmp_path / "c.npy", 5), tmp_path / "t", top_k=2)
    assert open_trace(tmp_path / "t").steps.tolist() == [0, 1, 2, 3, 4]
    before = sorted(p.name for p in (tmp_path / "t").rglob("*"))
    with pytest.raises(InputError, match="already exists"):
        import_trace("numpy", tmp_path / "c.npy", tmp_path / "t", top_k=2)
    assert sorted(p.name for p in (tmp_path / "t").rglob("*")) == before
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        import_trace("numpy", tmp_path / "c.npy", tmp_path / "f", top_k=2)
    assert (tmp_path / "f").read_text() == "x"


def test_a_target_filled_while_importing_is_refused_not_merged(tmp_path, monkeypatch):
    """Another process fills the (absent) target during the import: the rename refuses, its files stay."""
    real = TraceWriter.write_block

    def racing(self, steps, *a, **k):
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "theirs.txt").write_text("theirs")
        return real(self, steps, *a, **k)

    monkeypatch.setattr(TraceWriter, "write_block", racing)
    with pytest.raises(InputError, match=rf"^{tmp_path / 't'}: already exists"):
        import_trace("numpy", npy(tmp_path / "c.npy", 5), tmp_path / "t", top_k=2)
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["theirs.txt"]
    assert leftovers(tmp_path, "t") == ["t"]


def test_a_link_to_an_empty_directory_receives_the_trace(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    import_trace("numpy", npy(tmp_path / "c.npy", 5), tmp_path / "link", top_k=2)
    assert (tmp_path / "link").is_symlink()
    assert open_trace(tmp_path / "real").steps.tolist() == [0, 1, 2, 3, 4]
    assert leftovers(tmp_path, "real") == ["real"]
