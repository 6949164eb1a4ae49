"""`advise` (what each balancing strategy would save, in seconds) and `calibrate` (time the GEMMs)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeload.cli._common import (
    SKIP_BAD_PARTS_OPTION,
    check_alloc,
    console,
    human_bytes,
    open_trace_arg,
    print_json,
    progress_status,
    refuse_output_inside,
    table,
    to_jsonable,
)
from moeload.errors import InputError

MAX_GPUS = 1 << 16


def _positive(name: str, v: int | None, upper: int) -> None:
    if v is not None and not 1 <= v <= upper:
        raise InputError(f"{name} {v}: must be in 1..{upper}")


def advise_cmd(
    trace: Path = typer.Argument(..., help="Trace directory.", show_default=False),
    gpus: int = typer.Option(..., "--gpus", help="Expert-parallel GPUs per MoE layer.", show_default=False),
    nodes: int = typer.Option(1, "--nodes", help="Nodes the GPUs span (all-to-all crosses nodes when > 1)."),
    replicas: int = typer.Option(
        None,
        "--replicas",
        help="Physical expert slots per layer (default: experts, no replicas); a multiple of --gpus.",
        show_default=False,
    ),
    calibration: Path = typer.Option(
        None,
        "--calibration",
        help="calib.json from `moeload calibrate` (default: documented H200 defaults, flagged as such).",
        show_default=False,
    ),
    hidden: int = typer.Option(
        None,
        "--hidden",
        help="Expert input width (default: from the trace's workload, else a Mixtral-8x7B expert).",
        show_default=False,
    ),
    ffn_hidden: int = typer.Option(None, "--ffn-hidden", help="Expert inner width.", show_default=False),
    gated: bool = typer.Option(False, "--gated", help="Experts are SwiGLU (three matrices)."),
    micro_batches: int = typer.Option(
        1, "--micro-batches", help="Micro-batches per step (the step's routes are split evenly over them)."
    ),
    other_ms: float = typer.Option(
        0.0,
        "--other-ms",
        help="Time of the rest of a step (attention, dense layers, optimizer) in ms, added to every strategy.",
    ),
    copies: int = typer.Option(1, "--copies-per-gpu", help="reactive: temporary expert copies per GPU and layer."),
    artifacts: Path = typer.Option(
        None,
        "--artifacts",
        help="Directory for the files to act on the advice (SGLang, vLLM, Megatron, EPLB phy2log).",
        show_default=False,
    ),
    figure: Path = typer.Option(
        None, "--figure", help="Bar chart of predicted step time per strategy (.png/.svg).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Replay the trace through every balancing strategy and say what each would save.

    Example: moeload advise runs/exp1.moeload --gpus 8 --replicas 80 --artifacts advice/
    """
    from moeload.advise import advise, resolve_shape, write_artifacts

    _positive("--gpus", gpus, MAX_GPUS)
    _positive("--nodes", nodes, MAX_GPUS)
    _positive("--micro-batches", micro_batches, 1 << 12)
    _positive("--copies-per-gpu", copies, 64)
    if not (other_ms >= 0 and other_ms < 1e9):
        raise InputError(f"--other-ms {other_ms}: must be a non-negative number of milliseconds")
    for out, what in ((artifacts, "--artifacts"), (figure, "--figure")):
        refuse_output_inside(out, trace, what)
    t = open_trace_arg(trace, skip_bad_parts)
    E = int(max(t.experts_per_layer))
    if replicas is not None:
        _positive("--replicas", replicas, E * 64)
        check_alloc("--replicas", 1000 * len(t.layers) * replicas * 8 * 4, "1000 steps x layers x replicas x 8 B x 4")
    shape = resolve_shape(t.meta, hidden, ffn_hidden, gated)
    with progress_status("replaying strategies") as status:
        adv = advise(
            t,
            gpus,
            num_nodes=nodes,
            num_replicas=replicas,
            calibration=calibration,
            shape=shape,
            micro_batches=micro_batches,
            other_ms=other_ms,
            copies_per_gpu=copies,
            progress=lambda done, total: status.update(f"replaying strategies: step {done:,} of {total:,}"),
        )
    paths = write_artifacts(adv, artifacts) if artifacts is not None else {}
    if figure is not None:
        from moeload.plots import advise as plot_advise

        plot_advise.savefig(adv, figure)
    if as_json:
        obj = adv.to_jsonable()
        if paths:
            obj["artifacts"] = {k: str(v) for k, v in paths.items()}
        print_json(to_jsonable(obj))
        return
    info = adv.info
    basis = adv.calibration
    title = (
        f"{trace}: {info['steps']} steps, {info['layers']} layers x {info['experts']} experts on {gpus} GPUs"
        f" ({nodes} node{'s' if nodes > 1 else ''}), {info['replicas']} slots/layer; expert "
        f"{shape.hidden}x{shape.ffn_hidden} ({shape.source}); GEMMs: {basis} calibration ({info['calibration_device']}),"
        f" all-to-all: {info['all_to_all']}"
    )
    rows = []
    for r in adv.table.to_dict("records"):
        rows.append(
            [
                r["name"],
                f"{r['step_ms']:.3f}",
                f"{r['saving_pct']:+.1f}",
                f"{r['saving_lo']:+.1f} .. {r['saving_hi']:+.1f}" if r["name"] != "none" else "",
                str(r["replans"]),
                str(r["moved_experts"]),
                human_bytes(int(r["moved_bytes"])),
                human_bytes(int(r["extra_memory_bytes"])),
                basis,
            ]
        )
    c = console()
    c.print(
        table(
            title,
            [
                "strategy",
                "MoE ms/step",
                "saving %",
                "95 % interval",
                "re-plans",
                "experts moved",
                "bytes moved",
                "extra mem/GPU",
                "basis",
            ],
            rows,
        )
    )
    c.print(f"recommended: {adv.recommended} - {adv.reason} ({basis} calibration)")
    c.print(f"forecast re-plans every {info['forecast_interval']} steps (chosen on the first half of the trace)")
    if basis == "default":
        c.print(
            "times rest on documented H200 defaults, not on this cluster: run `moeload calibrate` on a GPU "
            "and pass --calibration"
        )
    for k, p in paths.items():
        c.print(f"wrote {k}: {p}")
    if figure is not None:
        c.print(f"wrote figure: {figure}")


def calibrate_cmd(
    out: Path = typer.Option(..., "--out", help="Calibration JSON to write.", show_default=False),
    trace: Path = typer.Option(
        None, "--trace", help="Take the expert shape from this trace's workload.", show_default=False
    ),
    hidden: int = typer.Option(None, "--hidden", help="Expert input width.", show_default=False),
    ffn_hidden: int = typer.Option(None, "--ffn-hidden", help="Expert inner width.", show_default=False),
    gated: bool = typer.Option(False, "--gated", help="Experts are SwiGLU (three matrices)."),
    experts_per_gpu: int = typer.Option(
        ..., "--experts-per-gpu", help="Local experts per GPU (experts / GPUs).", show_default=False
    ),
    device: str = typer.Option("cuda", "--device", help="cuda (default) or cpu (timed, and marked as CPU)."),
    repeats: int = typer.Option(10, "--repeats", help="Timed repeats per grid point (median)."),
) -> None:
    """Time the grouped expert GEMMs of a layer's shape on this GPU over a grid of routes.

    Example: moeload calibrate --trace runs/exp1.moeload --experts-per-gpu 4 --out calib.json
    """
    from moeload.advise import ExpertShape, resolve_shape
    from moeload.advise.calibrate import calibrate

    _positive("--experts-per-gpu", experts_per_gpu, 1 << 12)
    _positive("--repeats", repeats, 1000)
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise InputError(f"--device {device!r}: expected cuda, cuda:N or cpu")
    if trace is not None:
        refuse_output_inside(out, trace, "--out")
        shape = resolve_shape(open_trace_arg(trace).meta, hidden, ffn_hidden, gated)
    elif hidden is None or ffn_hidden is None:
        raise InputError("calibrate: give --trace, or --hidden and --ffn-hidden")
    else:
        shape = ExpertShape(hidden, ffn_hidden, gated)
    check_alloc(
        "calibrate",
        131072 * max(shape.hidden, shape.ffn_hidden) * 2 * 6 + experts_per_gpu * shape.params * 2 * 3,
        "largest grid point's activations + the local experts' weights and gradients",
    )
    c = console()
    cal = calibrate(shape, experts_per_gpu, device=device, repeats=repeats, progress=lambda m: c.print(m))
    cal.save(out)
    c.print(f"wrote {out}: {len(cal.tokens) - 1} grid points on {cal.device}, expert {shape.hidden}x{shape.ffn_hidden}")


def register(app: typer.Typer) -> None:
    app.command("advise")(advise_cmd)
    app.command("calibrate")(calibrate_cmd)
