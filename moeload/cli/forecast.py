"""Commands that look ahead: `predict`, `backtest`, `plan`."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import typer

from moeload.cli._common import (
    JSON_OPTION,
    LAYERS_OPTION,
    PARAM_OPTION,
    SKIP_BAD_PARTS_OPTION,
    check_alloc,
    console,
    open_trace_arg,
    parse_params,
    print_json,
    progress_status,
    refuse_output_inside,
    select_layers,
    table,
)
from moeload.errors import InputError
from moeload.evaluation.forecast import TraceForecast, forecast_trace

TRACE_ARG = typer.Argument(..., help="Trace directory (holds manifest.json and parts/).", show_default=False)
PREDICTOR_OPTION = typer.Option("sw_avg", "--predictor", help="Predictor name (see `moeload predict --list`).")
HORIZON_OPTION = typer.Option(100, "--horizon", min=1, help="Steps to forecast (in recorded steps).")
AT_OPTION = typer.Option(
    None,
    "--at",
    metavar="STEP",
    help="Forecast origin: fit on the steps before STEP, forecast from STEP on "
    "(default: after the last recorded step).",
)
HISTORY_OPTION = typer.Option(None, "--history", min=1, help="Fit on at most this many steps before the origin.")


Forecast = TraceForecast  # the CLI's name for moeload.evaluation.forecast.TraceForecast


def make_forecast(
    t,
    predictor: str,
    params: dict[str, Any],
    horizon: int,
    at: int | None,
    layers: str | list[int] | None,
    history: int | None,
) -> TraceForecast:
    """The CLI's forecast: the allocation checked first, then `evaluation.forecast_trace` with a status line.
    layers: a --layers string, or layer ids already selected."""
    lay = select_layers(t, layers)
    check_alloc(
        f"--horizon {horizon}",
        horizon * len(lay) * t.num_experts * 8,
        "horizon x layers x experts x 8 bytes for the forecast",
    )
    with progress_status(f"fitting {predictor}"):
        return forecast_trace(t, predictor, horizon, params=params, at=at, layers=list(lay), history=history)


def warn_long_horizon(f: TraceForecast, horizon: int) -> None:
    """A `moeload: warning:` line when `horizon` is over twice the steps `f` was fitted on."""
    if horizon > 2 * len(f.fit_steps):
        warnings.warn(
            f"--horizon {horizon}: over twice the {len(f.fit_steps)} steps the forecast was fitted on; "
            "an extrapolation this far is not backed by the trace",
            stacklevel=1,
        )


def _forecast_errors(f: Forecast, experts: list[int]) -> dict[str, list[float]] | None:
    if len(f.actual) == 0:
        return None
    from moeload.evaluation import contiguous_map, error_metrics

    ex = np.asarray(experts)
    m = error_metrics(f.forecast[: len(f.actual)], f.actual, ex, contiguous_map(ex, f.forecast.shape[2], 1))
    return {k: [float(x) for x in m[k]] for k in ("mae_pp", "havg_mae_pp")}


def list_predictors(value: bool) -> None:
    if value:
        import moeload.predictors as predictors

        typer.echo("\n".join(predictors.available()))
        raise typer.Exit()


def predict(
    trace: Path = TRACE_ARG,
    predictor: str = PREDICTOR_OPTION,
    param: list[str] = PARAM_OPTION,
    horizon: int = HORIZON_OPTION,
    at: int = AT_OPTION,
    history: int = HISTORY_OPTION,
    layers: str = LAYERS_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="Write the forecast [H, L, E] to .npy, .npz or .csv."),
    as_json: bool = JSON_OPTION,
    _list: bool = typer.Option(
        False, "--list", callback=list_predictors, is_eager=True, help="List predictors and exit."
    ),
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Forecast expert load proportions from the end of a trace (or from --at STEP).

    Prints the mean forecast share of the hottest experts per layer, and the error against the
    recorded steps when the trace continues past the origin.

    Example: moeload predict runs/exp1.moeload --predictor ema -p alpha=0.05 --horizon 500 --at 4000
    """
    refuse_output_inside(out, trace)
    t = open_trace_arg(trace, skip_bad_parts)
    f = make_forecast(t, predictor, parse_params(param), horizon, at, layers, history)
    warn_long_horizon(f, horizon)
    experts = [t.experts_per_layer[i] for i in f.layers]
    errs = _forecast_errors(f, experts)
    if out is not None:
        from moeload.cli.export import write_array

        write_array(
            out, f.forecast, "proportions", steps=np.arange(horizon), layer_ids=f.layers, trace=t, step_col="horizon"
        )
    mean = f.forecast.mean(0)  # [L, E]
    d = {
        "path": str(t.path),
        "predictor": predictor,
        "params": f.params,
        "origin": f.origin,
        "fit_steps": [int(f.fit_steps[0]), int(f.fit_steps[-1]), len(f.fit_steps)],
        "horizon": horizon,
        "layers": [t.layers[i] for i in f.layers],
        "forecast_mean": mean,
        "forecast": f.forecast,
        "evaluated_steps": len(f.actual),
        "errors": errs,
        "out": str(out) if out else None,
    }
    if as_json:
        print_json(d)
        return
    rows = []
    for j, li in enumerate(f.layers):
        m = mean[j, : experts[j]]
        order = np.argsort(-m)[:4]
        row = [int(li), " ".join(f"{e}:{m[e]:.1%}" for e in order), float(m.max() * experts[j])]
        if errs:
            row += [errs["mae_pp"][j], errs["havg_mae_pp"][j]]
        rows.append(row)
    cols = ["layer", "hottest (mean forecast share)", "max/mean"]
    if errs:
        cols += ["MAE pp", "horizon-avg MAE pp"]
    c = console()
    title = (
        f"{predictor} fitted on steps {f.fit_steps[0]}..{f.fit_steps[-1]} ({len(f.fit_steps)}), "
        f"forecast of {horizon} steps from {f.origin}"
    )
    c.print(table(title, cols, rows))
    if errs:
        c.print(f"errors against {len(f.actual)} recorded steps after the origin (percentage points)")
    if out:
        c.print(f"forecast [{horizon}, {len(f.layers)}, {f.forecast.shape[2]}] written to {out}")


def _int_list(spec: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag} {spec!r}: expected comma-separated integers, e.g. 100,200") from None
    if not vals or min(vals) < 1:
        raise InputError(f"{flag} {spec!r}: expected positive integers")
    return vals


def backtest(
    trace: Path = TRACE_ARG,
    predictors_: str = typer.Option("last,sw_avg,ema", "--predictors", help="Comma-separated predictor names."),
    horizons: str = typer.Option(
        None, "--horizons", help="Comma-separated horizons in steps (default: 1/10 and 1/5 of the trace)."
    ),
    every: int = typer.Option(
        None, "--every", min=1, help="Steps between forecast origins (default: smallest horizon / 2)."
    ),
    min_history: int = typer.Option(
        None, "--min-history", min=1, help="Steps before the first origin (default: min(100, 1/4 of the trace))."
    ),
    no_phases: bool = typer.Option(False, "--no-phases", help="Do not split results into transient / stable phases."),
    layers: str = LAYERS_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="Write every backtest row to this CSV file."),
    as_json: bool = JSON_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Rolling-origin backtest of predictors (moeload.evaluation.backtest) and its summary table.

    Example: moeload backtest runs/exp1.moeload --predictors last,sw_avg,ema,arima --horizons 1000,2000
    """
    import moeload.evaluation as evaluation
    import moeload.predictors as predictors

    refuse_output_inside(out, trace)
    t = open_trace_arg(trace, skip_bad_parts)
    names = [x.strip() for x in predictors_.split(",") if x.strip()]
    unknown = [n for n in names if n not in predictors.available()]
    if unknown or not names:
        raise InputError(f"--predictors: unknown {unknown or names}; available: {', '.join(predictors.available())}")
    lay = select_layers(t, layers)
    S = len(t.steps)
    if S < 4:
        raise InputError(f"{t.path}: {S} recorded steps are too few to backtest")
    hs = _int_list(horizons, "--horizons") if horizons else sorted({max(1, S // 10), max(1, S // 5)})
    huge = [h for h in hs if h > 2**62]
    if huge:
        raise InputError(f"--horizons {huge[0]}: implausibly large (more than 2^62 steps)")
    if all(h > S for h in hs):  # some too long among others: the backtest skips those with a warning
        raise InputError(
            f"--horizons {hs[0]}: longer than the {S} steps of {t.path}; a backtest needs "
            "history and the horizon inside the trace"
        )
    mh = min_history if min_history is not None else max(1, min(100, S // 4))
    counts = t.counts(None, list(lay))
    gmap = None
    if t.manifest.ep_size > 1:
        rmap = t.manifest.rank_map()
        gmap = np.full((len(lay), t.num_experts), -1, dtype=np.int64)
        for j, li in enumerate(lay):
            gmap[j, : len(rmap[li])] = rmap[li]
    show = sys.stderr.isatty() and not as_json
    df = evaluation.backtest(
        counts,
        predictors=names,
        horizons=hs,
        every=every,
        min_history=mh,
        steps=t.steps,
        phases=False if no_phases else None,
        gpu_map=gmap,
        progress=show,
    )
    if df.empty:
        raise InputError(f"{t.path}: no forecast origin fits (horizons {hs}, min history {mh}, {S} steps)")
    if out is not None:
        df.to_csv(out, index=False)
    summ = evaluation.summarize(df)
    if as_json:
        print_json(
            {
                "path": str(t.path),
                "horizons": hs,
                "min_history": mh,
                "notes": df.attrs.get("notes", []),
                "summary": summ.to_dict(orient="records"),
                "out": str(out) if out else None,
            }
        )
        return
    c = console()
    c.print(f"backtest of {', '.join(names)} on {t.path.name}: horizons {hs}, min history {mh}, {S} steps")
    c.print(evaluation.format_table(df), soft_wrap=True, markup=False)
    for n in df.attrs.get("notes", []):
        c.print(n, markup=False)
    if out:
        c.print(f"{len(df)} rows written to {out}")


LP_POLICIES = ("balanced", "exact")  # policies that solve linear programs over the slots (memory ~ replicas^2)


def _check_plan_sizes(num_layers: int, num_experts: int, gpus: int, replicas: int | None, policy: str) -> None:
    """One-line InputError, before any fitting, for slot counts the plan cannot honour or afford."""
    R = num_experts if replicas is None else replicas
    if R < num_experts:
        raise InputError(f"--replicas {R}: fewer slots than the {num_experts} experts; every expert needs one")
    if R % gpus and replicas is None:
        raise InputError(
            f"{gpus} GPUs do not divide the {num_experts} experts (one slot each); give --gpus that "
            f"divides {num_experts}, or --replicas as a multiple of {gpus}"
        )
    if R % gpus:
        raise InputError(f"--replicas {R}: not a multiple of {gpus} GPUs; every GPU must hold the same number of slots")
    check_alloc(
        f"--replicas {R}",
        num_layers * num_experts * R * 8,
        "layers x experts x replicas x 8 bytes for the expert-to-slot map",
    )
    if policy in LP_POLICIES:
        check_alloc(f"--replicas {R} with --policy {policy}", R * R * 8, "replicas^2 x 8 bytes for its linear programs")


def plan(
    trace: Path = TRACE_ARG,
    gpus: int = typer.Option(
        None, "--gpus", min=1, help="GPUs to place experts on (default: the trace's expert-parallel size, else 8)."
    ),
    replicas: int = typer.Option(
        None, "--replicas", min=1, help="Physical expert slots per layer (default: experts, no replicas)."
    ),
    policy: str = typer.Option("eplb", "--policy", help="Placement policy (moeload.placement.available())."),
    option: list[str] = typer.Option(None, "--option", metavar="KEY=VALUE", help="Policy option, repeatable."),
    predictor: str = PREDICTOR_OPTION,
    param: list[str] = PARAM_OPTION,
    horizon: int = HORIZON_OPTION,
    at: int = AT_OPTION,
    history: int = HISTORY_OPTION,
    layers: str = LAYERS_OPTION,
    out: Path = typer.Option(
        None, "--out", "-o", help="Write the plan (phy2log, replica counts, loads) to a JSON file."
    ),
    as_json: bool = JSON_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Expert placement plan from a trace's forecast (moeload.placement.plan).

    The forecast mean over the horizon is the load each expert is planned for. Compares the
    planned max/mean GPU load with the contiguous placement, and with the recorded steps after
    --at when the trace continues.

    Example: moeload plan runs/exp1.moeload --gpus 8 --replicas 16 --policy eplb --horizon 1000
    """
    import moeload.placement as placement

    refuse_output_inside(out, trace)
    t = open_trace_arg(trace, skip_bad_parts)
    if policy not in placement.available():
        raise InputError(f"--policy: unknown {policy!r}; available: {', '.join(placement.available())}")
    opts = parse_params(option, "--option")
    lay = select_layers(t, layers)
    experts = {t.experts_per_layer[i] for i in lay}
    if len(experts) != 1:
        raise InputError(
            f"{t.path}: selected layers have different expert counts {sorted(experts)}; plan them separately with --layers"
        )
    E = experts.pop()
    G = gpus or (t.manifest.ep_size if t.manifest.ep_size > 1 else 8)
    if len(t.steps) == 0:
        raise InputError(f"{t.path}: the trace holds no training steps")
    _check_plan_sizes(len(lay), E, G, replicas, policy)
    f = make_forecast(t, predictor, parse_params(param), horizon, at, layers, history)
    warn_long_horizon(f, horizon)
    weight = f.forecast.mean(0)[:, :E]
    with progress_status(f"planning ({policy})"):
        pl = placement.plan(weight, num_gpus=G, num_replicas=replicas, policy=policy, **opts)
        base = placement.plan(weight, num_gpus=G, num_replicas=E, policy="contiguous")
    realised = None
    if len(f.actual):
        act = np.nan_to_num(f.actual[:, :, :E])
        realised = {"planned": pl.evaluate(act).imbalance.mean(0), "contiguous": base.evaluate(act).imbalance.mean(0)}
    d = {
        "path": str(t.path),
        "policy": policy,
        "options": opts,
        "predictor": predictor,
        "origin": f.origin,
        "horizon": horizon,
        "num_gpus": G,
        "num_replicas": pl.num_replicas,
        "layers": [t.layers[i] for i in f.layers],
        "weight": weight,
        "phy2log": pl.phy2log,
        "replica_counts": pl.replica_counts,
        "gpu_load": pl.gpu_load,
        "imbalance": pl.imbalance,
        "contiguous_imbalance": base.imbalance,
        "realised_imbalance": realised,
        "evaluated_steps": len(f.actual),
    }
    if out is not None:
        import json

        from moeload.cli._common import to_jsonable

        Path(out).write_text(json.dumps(to_jsonable(d), indent=1) + "\n")
    if as_json:
        print_json(d)
        return
    rows = []
    for j, li in enumerate(f.layers):
        rc = pl.replica_counts[j]
        row = [
            int(li),
            float(pl.imbalance[j]),
            float(base.imbalance[j]),
            " ".join(f"{e}x{rc[e]}" for e in np.flatnonzero(rc > 1)[:6]) or "-",
        ]
        if realised:
            row += [float(realised["planned"][j]), float(realised["contiguous"][j])]
        rows.append(row)
    cols = ["layer", "max/mean planned", "contiguous (no replicas)", "replicated experts"]
    if realised:
        cols += ["realised", "realised contiguous"]
    c = console()
    c.print(
        table(
            f"{policy} plan: {pl.num_replicas} slots on {G} GPUs, for the {predictor} forecast of {horizon} steps from {f.origin}",
            cols,
            rows,
        )
    )
    if realised:
        c.print(f"realised: mean max/mean GPU load over the {len(f.actual)} recorded steps after the origin")
    for line in placement_lines(pl.phy2log, G, [int(li) for li in f.layers]):
        c.print(line, markup=False, highlight=False)
    if out:
        c.print(f"plan written to {out}")


def placement_lines(phy2log: np.ndarray, num_gpus: int, layer_ids: list[int], max_layers: int = 4) -> list[str]:
    """'layer 0: GPU0 [3 5] GPU1 [0 3] ...' for the first `max_layers` layers of phy2log: [L, R]
    (slot s on GPU s // (R // num_gpus)); the full map is in --json and -o."""
    per = phy2log.shape[1] // num_gpus
    out = ["placement (experts in each GPU's slots):"]
    for j, li in enumerate(layer_ids[:max_layers]):
        gpus = " ".join(f"GPU{g} [{' '.join(map(str, phy2log[j, g * per : (g + 1) * per]))}]" for g in range(num_gpus))
        out.append(f"  layer {li}: {gpus}")
    if len(layer_ids) > max_layers:
        out.append(f"  ... {len(layer_ids) - max_layers} more layer(s): see --json or -o")
    return out


def replay(
    trace: Path = TRACE_ARG,
    gpus: int = typer.Option(4, "--gpus", min=1, help="GPUs the experts are placed on."),
    extra_per_gpu: int = typer.Option(1, "--extra-per-gpu", min=0, help="Replica slots per GPU beyond E / G."),
    replan_every: int = typer.Option(100, "--replan-every", min=1, help="Steps between re-plans."),
    window: int = typer.Option(1000, "--window", min=1, help="Steps of history each re-plan uses."),
    skip: int = typer.Option(0, "--skip", min=0, help="Leading recorded steps to drop (e.g. warm-up)."),
    as_json: bool = JSON_OPTION,
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Replay the recorded loads under the standard placement scenarios (moeload.placement.compare).

    Static contiguous, periodic re-plans from the last --window steps (EPLB, balanced), vLLM's
    defaults, forecast-driven plans and the oracle: realised max/mean GPU load per scenario.

    Example: moeload replay runs/exp1.moeload --gpus 4 --extra-per-gpu 1 --replan-every 100
    """
    import moeload.placement as placement

    t = open_trace_arg(trace, skip_bad_parts)
    S, L, E = len(t.steps), t.num_layers, t.num_experts
    check_alloc(
        f"replay of {S} steps x {L} layers",
        S * L * (E + extra_per_gpu * gpus) * 8 * 4,
        "steps x layers x slots x 8 bytes, a few copies",
    )
    counts = t.counts()[skip:]
    if len(counts) == 0:
        raise InputError(f"{trace}: --skip {skip} leaves no step of the {S} recorded")
    R = E + extra_per_gpu * gpus
    if E % gpus or R % gpus:
        raise InputError(f"{trace}: {E} experts and {R} slots must both divide over --gpus {gpus}")
    with progress_status("replaying placements"):
        df = placement.compare(counts, gpus, R, replan_every=replan_every, window=window)
    if as_json:
        print_json({"trace": str(trace), "steps": len(counts), "gpus": gpus, "slots": R, "rows": df.to_dict("records")})
        return
    typer.echo(f"{trace}: counts {counts.shape}, {gpus} GPUs, +{extra_per_gpu} slot(s) per GPU")
    typer.echo(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
    app.command("backtest")(backtest)
    app.command("plan")(plan)
    app.command("replay")(replay)
