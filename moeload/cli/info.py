"""Commands that describe a trace: `info`, `summary`, `states`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moeload.cli._common import (
    JSON_OPTION,
    LAYERS_OPTION,
    PARAM_OPTION,
    SKIP_BAD_PARTS_OPTION,
    STEPS_OPTION,
    console,
    human_bytes,
    layer_stats,
    load_window,
    open_trace_arg,
    parse_params,
    print_json,
    progress_status,
    table,
)
from moeload.errors import clip

TRACE_ARG = typer.Argument(..., help="Trace directory (holds manifest.json and parts/).", show_default=False)


def info(trace: Path = TRACE_ARG, as_json: bool = JSON_OPTION, skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION) -> None:
    """Manifest, size on disk, steps, layers, experts and ranks of a trace.

    Example: moeload info runs/exp1.moeload --json
    """
    t = open_trace_arg(trace, skip_bad_parts)
    d = info_data(t)
    if as_json:
        print_json(d)
        return
    console().print(table(f"trace {t.path.name}", ["field", "value"], info_rows(t, d)))


def info_data(t) -> dict:
    """Everything `info` reports, as a JSON-ready dict."""
    m = t.manifest
    steps = t.steps
    return {
        "path": str(t.path),
        "framework": m.framework,
        "framework_version": m.framework_version,
        "model_name": m.model_name,
        "count_kind": m.count_kind,
        "size_bytes": t.size_bytes + (t.path / "manifest.json").stat().st_size,
        "parts": len(t.parts),
        "num_steps": len(steps),
        "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "eval_steps": len(t.steps_of("eval")),
        "num_layers": t.num_layers,
        "layers": t.layers,
        "experts_per_layer": t.experts_per_layer,
        "top_k": t.top_k,
        "tokens_per_step": m.tokens_per_step,
        "world_size": m.world_size,
        "ep_size": m.ep_size,
        "ranks_recorded": m.ranks_recorded,
        "gaps": [list(g) for g in t.gaps()],
        "bad_parts": [{"path": str(p), "problem": why} for p, why in t.bad_parts],
        "missing_steps": sum(b - a + 1 for a, b in t.gaps()),
        "superseded": [list(g) for g in t.superseded()],
        **{k: m.extra[k] for k in FAULT_KEYS if k in m.extra},
        "manifest": t.meta,
    }


def _framework(name: str, version: str | None) -> str:
    """`deepspeed 0.19.8`, not `deepspeed deepspeed 0.19.8` when the version string already names it."""
    if not version:
        return name
    return version if str(version).split(" ")[0] == name else f"{name} {version}"


def info_rows(t, d: dict) -> list[list[str]]:
    """(field, value) rows of the human `info` table."""
    m, steps, size = t.manifest, t.steps, d["size_bytes"]
    rng = f"{d['first_step']}..{d['last_step']}" if len(steps) else "-"
    return [
        ["path", d["path"]],
        ["framework", _framework(m.framework, m.framework_version)],
        ["model", m.model_name or "-"],
        ["size on disk", f"{human_bytes(size)} in {d['parts']} part(s)"],
        ["steps", f"{len(steps)} ({rng})" + (f", {d['eval_steps']} eval" if d["eval_steps"] else "")],
        ["layers", str(t.num_layers)],
        ["experts", _compact(t.experts_per_layer)],
        ["top-k", _compact(t.top_k)],
        ["counts", m.count_kind],
        [
            "ranks",
            f"world size {m.world_size}, expert-parallel size {m.ep_size}"
            + (", per-rank counts recorded" if m.ranks_recorded else ""),
        ],
        ["tokens / step", str(m.tokens_per_step) if m.tokens_per_step else "-"],
        ["started", m.start_time],
        *(
            [["skipped parts", "; ".join(f"{Path(b['path']).name} ({b['problem']})" for b in d["bad_parts"])]]
            if d["bad_parts"]
            else []
        ),
        *fault_rows(t.gaps(), m.extra),
        *(
            [
                [
                    "superseded",
                    f"steps {_ranges(d['superseded'])} of an abandoned run, hidden since a resumed run "
                    "restarted before them",
                ]
            ]
            if d["superseded"]
            else []
        ),
    ]


FAULT_KEYS = ("lost_steps", "dropped_blocks", "conservation", "disabled_layers", "hook_errors", "tracing_stopped")


def _ranges(rs: list, limit: int = 4) -> str:
    shown = ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in rs[:limit])
    return shown + (f", ... ({len(rs)} ranges)" if len(rs) > limit else "")


def gaps_text(gaps: list) -> str:
    """ "N step(s) missing in M range(s): a..b, ..." for (first, last) ranges."""
    n = sum(b - a + 1 for a, b in gaps)
    return f"{n} step(s) missing in {len(gaps)} range(s): {_ranges(gaps)}"


def fault_rows(gaps: list[tuple[int, int]], extra: dict) -> list[list[str]]:
    """(field, value) rows for step gaps and the fault notes tracing writes into manifest `extra`.

    Only what is present; a note of an unexpected shape is shown as clipped text, never an error.
    """
    rows = []
    if gaps:
        rows.append(["gaps", gaps_text(gaps)])
    for key in FAULT_KEYS:
        if key not in extra:
            continue
        try:
            text = _FAULT_TEXT[key](extra[key])
        except (TypeError, KeyError, AttributeError, ValueError, IndexError):
            text = clip(extra[key])
        rows.append([key.replace("_", " "), text])
    return rows


def _lost(v: list) -> str:
    if not v:
        return "none"
    n = sum(int(d["last"]) - int(d["first"]) + 1 for d in v)
    shown = "; ".join(
        f"{d['first']}..{d['last']} {d.get('split', 'train')} ({clip(d.get('reason', '?'), 60)})" for d in v[:3]
    )
    return f"{n} step(s) in {len(v)} range(s): {shown}" + ("; ..." if len(v) > 3 else "")


def _conservation(v: dict) -> str:
    viol = v.get("violations") or []
    total = int(v.get("violations_total", len(viol)))
    text = f"{int(v.get('checked_blocks', 0))} block(s) checked, {total} violation(s)"
    for d in viol[:2]:
        rank = "" if d.get("rank") is None else f" rank {d['rank']}"
        text += f"; {d['layer']} steps {d['first']}..{d['last']}{rank}: {clip(d.get('problem', '?'), 60)}"
    return text + ("; ..." if total > 2 else "")


def _disabled(v: dict) -> str:
    items = list(v.items())
    shown = "; ".join(
        f"{name} at step {d.get('step', '?')}"
        + (f" ranks {d['ranks']}" if d.get("ranks") else "")
        + f": {clip(d.get('reason', '?'), 60)}"
        for name, d in items[:3]
    )
    return f"{len(items)} layer(s): {shown}" + ("; ..." if len(items) > 3 else "")


def _hook_errors(v: dict) -> str:
    items = list(v.items())
    shown = "; ".join(f"{name}: {clip(msg, 60)}" for name, msg in items[:3])
    return f"{len(items)} layer(s): {shown}" + ("; ..." if len(items) > 3 else "")


_FAULT_TEXT = {
    "lost_steps": _lost,
    "dropped_blocks": lambda v: str(int(v)),
    "conservation": _conservation,
    "disabled_layers": _disabled,
    "hook_errors": _hook_errors,
    "tracing_stopped": lambda v: f"at step {v['step']}: {clip(v.get('reason', '?'))}",
}


def _compact(xs: list[int]) -> str:
    return str(xs[0]) if len(set(xs)) == 1 else ", ".join(map(str, xs))


def summary(
    trace: Path = TRACE_ARG,
    steps: str = STEPS_OPTION,
    layers: str = LAYERS_OPTION,
    method: str = typer.Option("window", "--method", help="Phase detector of moeload.states (window, pelt, test)."),
    as_json: bool = JSON_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Per-layer imbalance (max/mean, CV, min/max), hottest and coldest experts, phase boundaries.

    Example: moeload summary runs/exp1.moeload --steps 0:5000 --layers 0,1
    """
    t = open_trace_arg(trace, skip_bad_parts)
    out = summary_data(t, steps, layers, method)
    rows_json = out["layers"]
    if as_json:
        print_json(out)
        return
    cols, rows = summary_rows(out)
    c_ = console()
    for w in out["warnings"]:  # silent zeros and disabled layers first: the numbers below rest on them
        c_.print(f"warning: {w}", markup=False, highlight=False)
    c_.print(
        table(
            "max/mean: hottest expert over the mean, per step (mean; worst step); CV and min/max of the window's totals"
            f"\n{t.path.name}: steps {out['first_step']}..{out['last_step']} ({out['num_steps']} recorded)",
            cols,
            rows,
        )
    )
    mb = out["model_boundary"]
    c_.print(f"whole model stable from step {mb}" if mb >= 0 else "whole model: not stable yet")
    c_.print("layers: " + ", ".join(f"{d['layer']}={d['name']}" for d in rows_json))


def summary_data(t, steps: str | None, layers: str | None, method: str = "window", *, window=None) -> dict:
    """Everything `summary` reports, as a JSON-ready dict. window: (steps, layer ids, counts) of this
    selection where the caller read it already (`report`), so the trace is read once."""
    import moeload.states as states
    from moeload.cli.check import ZeroScan, disabled_problems

    step_nums, lay, c = load_window(t, steps, layers, what="counts") if window is None else window
    experts = [t.experts_per_layer[i] for i in lay]
    stats = layer_stats(c, experts)
    scan = ZeroScan(len(lay))
    scan.add(c)
    names = [t.layers[i] for i in lay]
    warns = scan.problems(t.path, step_nums, [int(i) for i in lay], names) + disabled_problems(t, set(names))
    with progress_status("detecting phases"):
        r = states.detect(c, method=method, steps=step_nums)
    rows = []
    for j, li in enumerate(lay):
        d = {"layer": int(li), "name": t.layers[li], "experts": experts[j], **stats[j]}
        d["boundary"] = int(r.boundaries[j])
        d["stable_share"] = float(r.labels[:, j].mean())
        rows.append(d)
    return {
        "path": str(t.path),
        "num_steps": len(step_nums),
        "first_step": int(step_nums[0]),
        "last_step": int(step_nums[-1]),
        "method": method,
        "model_boundary": int(r.model_boundary),
        "warnings": warns,
        "layers": rows,
    }


def summary_rows(out: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the human `summary` table."""
    cols = ["layer", "max/mean", "worst", "CV", "min/max", "hottest", "coldest", "stable from"]
    rows = [
        [
            d["layer"],
            d["imbalance_mean"],
            d["imbalance_max"],
            d["cv"],
            d["min_max"],
            _experts(d["hottest"]),
            _experts(d["coldest"]),
            d["boundary"] if d["boundary"] >= 0 else "not stable yet",
        ]
        for d in out["layers"]
    ]
    return cols, rows


def _experts(pairs: list[list[float]]) -> str:
    return " ".join(f"{int(e)}:{s:.0%}" for e, s in pairs)


def states_cmd(
    trace: Path = TRACE_ARG,
    steps: str = STEPS_OPTION,
    layers: str = LAYERS_OPTION,
    method: str = typer.Option("window", "--method", help="Detector: window, pelt or test (moeload.states)."),
    param: list[str] = PARAM_OPTION,
    as_json: bool = JSON_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Transient / stable phases per layer: boundary, stable share and the runs of each state.

    Example: moeload states runs/exp1.moeload --method pelt --json
    """
    import moeload.states as states

    t = open_trace_arg(trace, skip_bad_parts)
    step_nums, lay, c = load_window(t, steps, layers, what="counts")
    with progress_status("detecting phases"):
        r = states.detect(c, method=method, steps=step_nums, **parse_params(param))
    out: dict[str, Any] = {
        "path": str(t.path),
        "method": r.method,
        "params": r.params,
        "model_boundary": int(r.model_boundary),
        "layers": [
            {
                "layer": int(li),
                "name": t.layers[li],
                "boundary": int(r.boundaries[j]),
                "stable_share": float(r.labels[:, j].mean()),
                "segments": [{"start": a, "stop": b, "stable": s} for a, b, s in r.segments[j]],
            }
            for j, li in enumerate(lay)
        ],
    }
    if as_json:
        print_json(out)
        return
    rows = []
    for d in out["layers"]:
        segs = d["segments"]
        shown = ", ".join(f"{s['start']}-{s['stop']}:{'S' if s['stable'] else 'T'}" for s in segs[:6])
        if len(segs) > 6:
            shown += f", ... ({len(segs)} runs)"
        rows.append(
            [
                d["layer"],
                d["name"],
                d["boundary"] if d["boundary"] >= 0 else "not stable yet",
                f"{d['stable_share']:.1%}",
                shown,
            ]
        )
    c_ = console()
    c_.print(
        table(
            f"{t.path.name}: phases ({r.method})",
            ["layer", "name", "stable from", "stable", "runs (T=transient, S=stable)"],
            rows,
        )
    )
    mb = out["model_boundary"]
    c_.print(f"whole model stable from step {mb}" if mb >= 0 else "whole model: not stable yet")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("summary")(summary)
    app.command("states")(states_cmd)
