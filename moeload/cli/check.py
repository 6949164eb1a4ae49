"""`check`: validate the manifest and every part of a trace and list all problems."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from moeload.cli._common import JSON_OPTION, console, print_json
from moeload.cli.info import gaps_text
from moeload.errors import InputError, TraceFormatError

TRACE_ARG = typer.Argument(..., help="Trace directory (holds manifest.json and parts/).", show_default=False)


def check_data(path: Path) -> dict:
    """Every problem of a trace (manifest, each part, stray files), plus what is readable."""
    from moeload.trace import open_trace
    from moeload.trace.manifest import PARTS_DIR
    from moeload.trace.writer import PART_RE

    out: dict = {"path": str(path), "parts": 0, "bad_parts": [], "steps": 0, "eval_steps": 0, "gaps": []}
    try:
        t = open_trace(path, skip_bad_parts=True)
    except TraceFormatError as e:
        return {**out, "ok": False, "problems": [str(e)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = t.bad_parts
    problems = [f"{p}: {why}" for p, why in bad]
    pdir = t.path / PARTS_DIR
    if not pdir.is_dir():
        problems.append(f"{pdir}: missing; the trace has no parts directory")
    else:
        seen: dict[tuple[int, int], str] = {}
        for p in sorted(pdir.iterdir()):
            m = PART_RE.match(p.name)
            if m is None:
                if not p.name.startswith("."):  # hidden .tmp files are parts a killed writer never finished
                    problems.append(f"{p}: not a part name (part-SEQ-rRANK-SPLIT-sFIRST-LAST.parquet); readers ignore it")
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if key in seen:
                problems.append(f"{p}: same sequence number and writer rank as {seen[key]}; which one wins is undefined")
            seen[key] = p.name
    if not t.parts:
        problems.append(f"{t.path}: no parts; no step has been recorded")
    steps = t.steps
    out.update(
        parts=len(t.parts),
        bad_parts=[{"path": str(p), "problem": why} for p, why in bad],
        steps=len(steps),
        first_step=int(steps[0]) if len(steps) else None,
        last_step=int(steps[-1]) if len(steps) else None,
        eval_steps=len(t.steps_of("eval")),
        gaps=[list(g) for g in t.gaps()],
    )
    return {**out, "ok": not problems, "problems": problems}


def check(trace: Path = TRACE_ARG, as_json: bool = JSON_OPTION) -> None:
    """Validate the manifest and every part of a trace; list every problem (exit code 2 if any).

    Gaps in the step sequence are reported but are not problems.

    Example: moeload check runs/exp1.moeload
    """
    d = check_data(trace)
    if as_json:
        print_json(d)
    else:
        c = console()
        for p in d["problems"]:
            c.print(f"problem: {p}", markup=False, highlight=False)
        if d["parts"] or d["ok"]:
            rng = f" ({d['first_step']}..{d['last_step']})" if d["steps"] else ""
            c.print(f"{d['parts'] - len(d['bad_parts'])} of {d['parts']} part(s) readable, {d['steps']} step(s){rng}"
                    + (f", {d['eval_steps']} eval step(s)" if d["eval_steps"] else ""), markup=False, highlight=False)
        if d["gaps"]:
            c.print(f"gaps: {gaps_text(d['gaps'])}", markup=False, highlight=False)
        if d["ok"]:
            c.print(f"ok: {trace}", markup=False, highlight=False)
    if not d["ok"]:
        n = len(d["problems"])
        first = d["problems"][0]
        raise InputError(first if n == 1 else f"{n} problems in {trace}: {first} (+{n - 1} more)")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
