"""`check`: validate the manifest and every part of a trace and list all problems."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import typer

from moeload.cli._common import JSON_OPTION, console, print_json
from moeload.cli.info import gaps_text
from moeload.errors import InputError, TraceFormatError, clip

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
                    problems.append(
                        f"{p}: not a part name (part-SEQ-rRANK-SPLIT-sFIRST-LAST.parquet); readers ignore it"
                    )
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if key in seen:
                problems.append(
                    f"{p}: same sequence number and writer rank as {seen[key]}; which one wins is undefined"
                )
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
    if len(steps):
        try:
            problems += zero_problems(t)
        except TraceFormatError as e:  # a part that passed the index check but fails on reading
            problems.append(str(e))
    problems += disabled_problems(t)
    return {**out, "ok": not problems, "problems": problems}


class _Runs:
    """Runs of consecutive recorded-step positions, fed block by block; keeps the first few runs."""

    KEEP = 4

    def __init__(self) -> None:
        self.n_steps = 0
        self.n_runs = 0
        self.first: list[list[int]] = []  # [start, end] positions, at most KEEP
        self.last: list[int] | None = None  # the run that may still grow

    def add(self, pos: np.ndarray) -> None:
        """pos: [n] ascending recorded-step positions (0 = first step of the trace)."""
        if len(pos) == 0:
            return
        self.n_steps += len(pos)
        cut = np.flatnonzero(np.diff(pos) > 1)
        for a, b in zip(np.r_[pos[0], pos[cut + 1]], np.r_[pos[cut], pos[-1]]):
            if self.last is not None and self.last[1] == a - 1:
                self.last[1] = int(b)
                continue
            self.n_runs += 1
            self.last = [int(a), int(b)]
            if len(self.first) < self.KEEP:
                self.first.append(self.last)  # the same list: it keeps growing while it is the last run

    def text(self, steps: np.ndarray) -> str:
        shown = ", ".join(f"{steps[a]}..{steps[b]}" if a != b else f"{steps[a]}" for a, b in self.first)
        more = f", ... ({self.n_runs} ranges)" if self.n_runs > len(self.first) else ""
        end = " (to the end of the trace)" if self.last is not None and self.last[1] == len(steps) - 1 else ""
        return shown + more + end


class ZeroScan:
    """Silent zeros of counts fed block by block: steps in which no layer received a token, and
    per layer, no token at all or none in steps where other layers had some."""

    def __init__(self, num_layers: int) -> None:
        self.dead = _Runs()
        self.starved = [_Runs() for _ in range(num_layers)]
        self.ever = np.zeros(num_layers, bool)
        self.pos = 0

    def add(self, c: np.ndarray) -> None:
        """c: [b, L, E] counts of the next b recorded steps."""
        nz = (c != 0).any(axis=2)  # [b, L]: the layer received a token in that step
        live = nz.any(axis=1)  # [b]
        idx = np.arange(self.pos, self.pos + len(c))
        self.dead.add(idx[~live])
        for li, runs in enumerate(self.starved):
            runs.add(idx[live & ~nz[:, li]])
        self.ever |= nz.any(axis=0)
        self.pos += len(c)

    def problems(self, where: object, steps: np.ndarray, layer_ids: list[int], names: list[str]) -> list[str]:
        """One line per problem; steps: [S] step numbers fed; layer_ids, names: [L] of the layers fed."""
        S = len(steps)
        span = f"{steps[0]}..{steps[-1]}"
        out = []
        if self.dead.n_steps == S:
            out.append(
                f"{where}: every count is zero: no layer received a token in any of the {S} step(s) ({span}); "
                "nothing was recorded (model compiled before the tracer attached? hooks on the wrong modules?)"
            )
        elif self.dead.n_steps:
            out.append(
                f"{where}: no layer received a token in {self.dead.n_steps} of {S} step(s): {self.dead.text(steps)}"
            )
        for li, name, ever, runs in zip(layer_ids, names, self.ever, self.starved):
            what = f"{where}: layer {li} ({name})"
            if not ever:
                out.append(
                    f"{what} received no token in any of the {S} step(s) ({span})"
                    + ("; other layers did" if self.ever.any() else "")
                )
            elif runs.n_steps:
                out.append(
                    f"{what} received no token in {runs.n_steps} step(s) in which other layers did: {runs.text(steps)}"
                )
        return out


def zero_problems(t, block: int | None = None) -> list[str]:
    """ZeroScan over the whole trace, read `block` steps at a time (default: at most 64 MiB of counts)."""
    L, E = t.num_layers, t.num_experts
    block = block or int(min(1000, max(1, 2**26 // max(1, L * E * 8))))
    scan = ZeroScan(L)
    for _, c in t.iter_blocks(block):
        scan.add(c)
    return scan.problems(t.path, t.steps, list(range(L)), t.layers)


def disabled_problems(t, names: set[str] | None = None) -> list[str]:
    """One line per layer that tracing disabled (manifest extra.disabled_layers; only `names` where
    given): its counts are missing from that step on, on the ranks listed."""
    extra = t.meta.get("extra")
    dis = extra.get("disabled_layers") if isinstance(extra, dict) else None
    if not dis:
        return []
    if not isinstance(dis, dict):
        return [
            f"{t.path / 'manifest.json'}: extra.disabled_layers is not a mapping of layer to reason: {clip(dis, 60)}"
        ]
    out = []
    for name, d in dis.items():
        if names is not None and name not in names:
            continue
        d = d if isinstance(d, dict) else {"reason": d}
        ranks = f" on rank(s) {d['ranks']}" if d.get("ranks") else ""
        out.append(
            f"{t.path}: layer {name} was disabled by the tracer at step {d.get('step', '?')}{ranks}, its counts "
            f"are incomplete from there: {clip(d.get('reason', '?'), 160)}"
        )
    return out


def check(trace: Path = TRACE_ARG, as_json: bool = JSON_OPTION) -> None:
    """Validate the manifest and every part of a trace; list every problem (exit code 2 if any).

    Problems: unreadable or inconsistent parts, stray files, layers the tracer disabled, and silent
    zeros (steps in which no layer received a token; a layer with no token where others had
    some). Gaps in the step sequence are reported but are not problems.

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
            c.print(
                f"{d['parts'] - len(d['bad_parts'])} of {d['parts']} part(s) readable, {d['steps']} step(s){rng}"
                + (f", {d['eval_steps']} eval step(s)" if d["eval_steps"] else ""),
                markup=False,
                highlight=False,
            )
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
