"""Issue 13: every `moeload` command against hostile inputs, as a real process under a 4 GiB
address-space limit (resource.setrlimit) and a 60 s timeout.

Hostile traces (manifest.json a FIFO or /dev/zero, deeply nested JSON, 5,000-digit integers, fields
of the wrong type or range, empty directory, parts that are not Parquet or hold uint64 counts beyond
int64) for every trace-reading command; option values that would size huge allocations; importer
inputs with huge ids, .npy headers claiming 10**11 elements, invalid UTF-8, gzip without `.gz`.
Each must end with exit code 2, exactly one non-empty stderr line starting "moeload: error:", and no
traceback. The cases (tests/cli/_hostile.py) run in a small thread pool once per session; each
test reads its case's result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _hostile import Case, all_cases, control_cases, write_good_trace

AS_LIMIT = 4 * 1024**3
TIMEOUT_S = 60
# The child sets its own limit before importing moeload (preexec_fn is not safe with the thread pool).
_LIMIT = "import resource, sys; lim = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); "
_SHIM = _LIMIT + "import runpy; sys.argv = ['moeload'] + sys.argv[2:]; runpy.run_module('moeload', run_name='__main__')"

# Known bugs (issue 13): case id -> reason, marked xfail(strict=True) so a fix shows as an XPASS to remove
# here. None is open now.
XFAILS: dict[str, str] = {}

CASES = all_cases(XFAILS)
CONTROLS = control_cases()


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    return pytest.param(c, id=c.id, marks=marks)


def run_limited(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`moeload *argv` in a child process limited to AS_LIMIT bytes of address space and TIMEOUT_S."""
    try:
        return subprocess.run([sys.executable, "-c", _SHIM, str(AS_LIMIT), *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, -9, str(e.stdout or ""), f"TIMEOUT after {TIMEOUT_S} s")


@pytest.fixture(scope="session")
def results(request, tmp_path_factory) -> dict[str, tuple[list[str], subprocess.CompletedProcess]]:
    """Case id -> (argv, finished process), for the cases this session collected."""
    wanted = {it.callspec.params["case"].id for it in request.session.items  # other files have "case" params too
              if getattr(it, "callspec", None) is not None and isinstance(it.callspec.params.get("case"), Case)}
    root = tmp_path_factory.mktemp("hostile")
    good = write_good_trace(root / "good.moeload")
    jobs = []
    for i, c in enumerate(x for x in CASES + CONTROLS if x.id in wanted):
        d = root / f"c{i:03d}"
        d.mkdir()
        jobs.append((c.id, c.build(d, good), d))
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        done = pool.map(lambda j: (j[0], j[1], run_limited(j[1], j[2])), jobs)
        return {cid: (argv, r) for cid, argv, r in done}


def test_the_suite_covers_every_command():
    """Every subcommand of `moeload --help` has at least one case."""
    from typer.main import get_command

    from moeload.cli import app

    commands = set(get_command(app).commands)
    covered = {c.id.split(":")[0] for c in CASES} | {c.id.split(":")[1].split("-")[0] for c in CASES
                                                     if c.id.split(":")[0] in ("option", "import")}
    assert commands <= covered | {"import"}, commands - covered
    assert "import" in {c.id.split(":")[0] for c in CASES}
    assert len(CASES) == len({c.id for c in CASES}) >= 200


@pytest.mark.slow
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_input_is_one_line_and_exit_code_2(case: Case, results):
    argv, r = results[case.id]
    shown = f"moeload {' '.join(a[:80] for a in argv)}\nrc={r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, shown
    assert len(lines) == 1 and lines[0].startswith("moeload: error:"), shown
    assert "Traceback" not in r.stderr + r.stdout, shown


def test_the_address_space_limit_is_in_force(tmp_path):
    """Under the limit a 5 GiB allocation fails in the child, and `moeload --version` still runs."""
    big = subprocess.run([sys.executable, "-c", _LIMIT + "import numpy; numpy.ones(5 * 2**30 // 8)", str(AS_LIMIT)],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert big.returncode != 0 and "MemoryError" in big.stderr, big.stderr[-500:]
    r = run_limited(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("moeload "), r.stderr[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONTROLS])
def test_the_same_command_on_the_good_trace_succeeds(case: Case, results):
    argv, r = results[case.id]
    assert r.returncode == 0, f"moeload {' '.join(argv)}\nrc={r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    assert "moeload: error" not in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
