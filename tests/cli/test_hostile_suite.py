"""Issue 13: every `moeload` command against hostile inputs, as a real process under a 4 GiB
address-space limit (resource.setrlimit) and a 60 s timeout.

Hostile traces (manifest.json a FIFO or /dev/zero, deeply nested JSON, 5,000-digit integers, fields
of the wrong type or range, empty directory, parts that are not Parquet or hold uint64 counts beyond
int64) for every trace-reading command; option values that would size huge allocations; importer
inputs with huge ids, .npy headers claiming 10**11 elements, invalid UTF-8, gzip without `.gz`.
Each must end with exit code 2, exactly one non-empty stderr line starting "moeload: error:", and no
traceback. The cases (tests/cli/_hostile.py) run in a small thread pool once per session, each thread
forking them from a server process that imported the CLI once (each case is still its own process, limited
the same way; 117 -> 54 s on 2 cores, and all 249 cases gave the same exit code and stderr as one fresh
process each); each test reads its case's result.
"""

from __future__ import annotations

import json
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


# A fork server, to pay the CLI's imports (~0.5 s a process) once per pool thread, not once per case: it imports
# moeload.cli, then forks one child per case. The child sets the limit, points fds 0/1/2 at /dev/null and two
# files, and runs the command as `python -m moeload` would; its SystemExit or uncaught exception leaves the
# server's loop, so it ends as a normal interpreter does (exit code, traceback, flush, atexit, thread join).
_SERVER = """
import json, os, resource, runpy, signal, sys, time
lim, timeout = int(sys.argv[1]), float(sys.argv[2])
import moeload.cli  # noqa: F401  (the imports every case shares)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        sys.argv = ["moeload", *job["argv"]]
        runpy.run_module("moeload", run_name="__main__")
        sys.exit(0)
    end, status = time.monotonic() + timeout, None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
        elif time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.005)
    print(json.dumps({"rc": status}), flush=True)
"""


class _ForkServer:
    """One `_SERVER` process; `run` is `run_limited` without the per-process imports. Not thread-safe: one per
    thread."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(AS_LIMIT), str(TIMEOUT_S)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
        out, err = cwd / ".stdout", cwd / ".stderr"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit code {self.proc.poll()})")
        rc = json.loads(line)["rc"]
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        if rc == "timeout":
            return subprocess.CompletedProcess(argv, -9, read(out), f"TIMEOUT after {TIMEOUT_S} s")
        return subprocess.CompletedProcess(argv, rc, read(out), read(err))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def _run_all(jobs: list) -> list:
    """(case id, argv, cwd) jobs -> (case id, argv, finished process), in one fork server; a case the server
    could not run (it died) runs as its own process instead."""
    server, done = None, []
    for cid, argv, cwd in jobs:
        try:
            server = server or _ForkServer()
            r = server.run(argv, cwd)
        except (OSError, RuntimeError, ValueError):
            server = None
            r = run_limited(argv, cwd)
        done.append((cid, argv, r))
    if server is not None:
        server.close()
    return done


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
    n = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=n) as pool:  # one fork server per thread, the jobs dealt out in turn
        done = pool.map(_run_all, [jobs[i::n] for i in range(n)])
        return {cid: (argv, r) for part in done for cid, argv, r in part}


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
