"""Commands that describe a trace: `info`, `summary`, `states`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from moeload.cli._common import (
    JSON_OPTION,
    LAYERS_OPTION,
    STEPS_OPTION,
    console,
    human_bytes,
    open_trace_arg,
    print_json,
    table,
)

TRACE_ARG = typer.Argument(..., help="Trace directory (holds manifest.json and parts/).", show_default=False)


def info(trace: Path = TRACE_ARG, as_json: bool = JSON_OPTION) -> None:
    """Manifest, size on disk, steps, layers, experts and ranks of a trace.

    Example: moeload info runs/exp1.moeload --json
    """
    t = open_trace_arg(trace)
    m = t.manifest
    steps = t.steps
    size = t.size_bytes + (t.path / "manifest.json").stat().st_size
    d = {
        "path": str(t.path),
        "framework": m.framework,
        "framework_version": m.framework_version,
        "model_name": m.model_name,
        "count_kind": m.count_kind,
        "size_bytes": size,
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
        "manifest": t.meta,
    }
    if as_json:
        print_json(d)
        return
    c = console()
    rng = f"{d['first_step']}..{d['last_step']}" if len(steps) else "-"
    rows = [
        ["path", d["path"]],
        ["framework", f"{m.framework}" + (f" {m.framework_version}" if m.framework_version else "")],
        ["model", m.model_name or "-"],
        ["size on disk", f"{human_bytes(size)} in {d['parts']} part(s)"],
        ["steps", f"{len(steps)} ({rng})" + (f", {d['eval_steps']} eval" if d["eval_steps"] else "")],
        ["layers", str(t.num_layers)],
        ["experts", _compact(t.experts_per_layer)],
        ["top-k", _compact(t.top_k)],
        ["counts", m.count_kind],
        ["ranks", f"world size {m.world_size}, expert-parallel size {m.ep_size}"
         + (", per-rank counts recorded" if m.ranks_recorded else "")],
        ["tokens / step", str(m.tokens_per_step) if m.tokens_per_step else "-"],
        ["started", m.start_time],
    ]
    c.print(table(f"trace {t.path.name}", ["field", "value"], rows))


def _compact(xs: list[int]) -> str:
    return str(xs[0]) if len(set(xs)) == 1 else ", ".join(map(str, xs))


def register(app: typer.Typer) -> None:
    app.command("info")(info)
