"""`plot` (PNG / SVG files via moeload.plots) and `report` (one self-contained HTML page)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import typer

from moeload.cli._common import (
    SKIP_BAD_PARTS_OPTION,
    STEPS_OPTION,
    console,
    fmt,
    load_window,
    open_trace_arg,
    refuse_output_inside,
    select_layers,
)
from moeload.errors import InputError

PER_LAYER = ("heatmap", "proportions", "forecast", "gpu-load")
FIGURE_NAMES = ("heatmap", "proportions", "fluctuation", "forecast", "gpu-load", "backtest")


class Data:
    """What the figures draw, computed once: proportions [S, L, E] of the selected steps and
    layers, phases, a forecast, a backtest."""

    def __init__(
        self, t, steps: str | None, layers: list[int], predictor: str, horizon: int, at: int | None, predictors: str
    ) -> None:
        self.t = t
        self.steps_spec = steps
        self.layers = layers
        self.predictor, self.horizon, self.at, self.predictors = predictor, horizon, at, predictors

    @cached_property
    def counts_window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps [S], layer ids [L], counts [S, L, E]): the one read of the selected window."""
        return load_window(self.t, self.steps_spec, self.layers, what="counts")

    @cached_property
    def window(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from moeload.trace.reader import shares

        steps, lay, c = self.counts_window
        return steps, lay, shares(c)

    @cached_property
    def states(self):
        import moeload.states as states

        steps, _, p = self.window
        return states.detect(p, steps=steps)

    @cached_property
    def forecast(self):
        from moeload.cli.forecast import make_forecast

        return make_forecast(self.t, self.predictor, {}, self.horizon, self.at, list(self.layers), None)

    @cached_property
    def backtest(self):
        import moeload.evaluation as evaluation

        S = len(self.t.steps)
        hs = sorted({max(1, S // 10), max(1, S // 5)})
        names = [x.strip() for x in self.predictors.split(",") if x.strip()]
        steps, _, p = self.window
        return evaluation.backtest(p, predictors=names, horizons=hs, min_history=max(1, min(100, S // 4)), steps=steps)

    def names(self) -> list[str]:
        return [f"{i}: {self.t.layers[i]}" for i in self.layers]


def _fig_heatmap(d: Data, j: int):
    import moeload.plots as plots

    steps, _, p = d.window
    return plots.load_heatmap(p, layer=j, steps=steps).figure


def _fig_proportions(d: Data, j: int):
    import moeload.plots as plots

    steps, _, p = d.window
    return plots.proportions_over_time(p, steps=steps, labels=d.states, layer=j).figure


def _fig_fluctuation(d: Data, j: int | None):
    import moeload.plots as plots

    return plots.fluctuation(d.states, layer_names=d.names()).figure


def _fig_forecast(d: Data, j: int):
    import moeload.plots as plots

    f = d.forecast
    hist = d.t.proportions(f.fit_steps, [int(f.layers[j])])
    actual = None
    if len(f.actual):  # the trace may end before the horizon: pad with NaN rows (not recorded)
        actual = np.full(f.forecast[:, j].shape, np.nan)
        actual[: len(f.actual)] = f.actual[:, j]
    li = int(f.layers[j])
    return plots.forecast_vs_actual(
        hist[:, 0], f.forecast[:, j], actual, start=int(f.fit_steps[0]), layer_name=f"layer {li} ({d.t.layers[li]})"
    ).figure


def _fig_gpu_load(d: Data, j: int):
    import moeload.plots as plots

    if d.t.manifest.ep_size < 2:
        raise InputError(f"{d.t.path}: gpu-load needs an expert-parallel trace (ep_size is {d.t.manifest.ep_size})")
    steps, lay, _ = d.window
    li = int(lay[j])  # [S, G] of that layer alone; layer= then only names it in the title
    return plots.gpu_load(d.t.gpu_loads(steps, [li])[:, 0], steps=steps, layer=li).figure


def _fig_backtest(d: Data, j: int | None):
    import moeload.plots as plots

    return plots.backtest_errors(d.backtest).figure


FIGURES: dict[str, Callable[[Data, Any], Any]] = {
    "heatmap": _fig_heatmap,
    "proportions": _fig_proportions,
    "fluctuation": _fig_fluctuation,
    "forecast": _fig_forecast,
    "gpu-load": _fig_gpu_load,
    "backtest": _fig_backtest,
}


def _agg() -> None:
    import matplotlib

    matplotlib.use("Agg")


def _data_layers(t, layers: str | None) -> list[int]:
    """Layer ids the figures use: the --layers selection, else every layer."""
    if layers is None:
        return list(range(t.num_layers))
    return [int(i) for i in select_layers(t, layers)]


def plot(
    trace: Path = typer.Argument(..., help="Trace directory.", show_default=False),
    figures: list[str] = typer.Argument(
        None,
        help=f"Figures to draw: {', '.join(FIGURE_NAMES)} or all (gpu-load "
        "where the trace is expert-parallel; default: heatmap, proportions, fluctuation).",
    ),
    out: Path = typer.Option(Path("."), "--out", "-o", help="Directory for the image files (created if missing)."),
    fmt_: str = typer.Option("png", "--format", help="png or svg."),
    dpi: int = typer.Option(120, "--dpi", min=30, max=600, help="Resolution of PNG files."),
    steps: str = STEPS_OPTION,
    layers: str = typer.Option(
        None,
        "--layers",
        metavar="LIST",
        help="Layers to draw: comma-separated indices (negative ones count from the end: -1 is the last layer) or "
        "module paths (default: layer 0 in per-layer figures, all layers in fluctuation and backtest).",
    ),
    predictor: str = typer.Option("sw_avg", "--predictor", help="Predictor of the forecast figure."),
    horizon: int = typer.Option(100, "--horizon", min=1, help="Forecast horizon in steps."),
    at: int = typer.Option(None, "--at", metavar="STEP", help="Forecast origin (default: end of the trace)."),
    predictors_: str = typer.Option("last,sw_avg,ema", "--predictors", help="Predictors of the backtest figure."),
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """Draw figures of a trace to PNG or SVG files, one file per figure (and per layer).

    Example: moeload plot runs/exp1.moeload heatmap forecast --layers 0,3 --at 4000 -o figs --format svg
    """
    if fmt_ not in ("png", "svg"):
        raise InputError(f"--format {fmt_!r}: expected png or svg")
    names = list(figures or ["heatmap", "proportions", "fluctuation"])
    bad = [n for n in names if n not in FIGURES and n != "all"]
    if bad or ("all" in names and len(names) > 1):
        raise InputError(f"figure(s) {bad or names}: unknown; choose from {', '.join(FIGURE_NAMES)}, or all alone")
    refuse_output_inside(out, trace)
    t = open_trace_arg(trace, skip_bad_parts)
    if names == ["all"]:  # gpu-load needs an expert-parallel trace
        names = [n for n in FIGURE_NAMES if n != "gpu-load" or t.manifest.ep_size > 1]
    d = Data(t, steps, _data_layers(t, layers), predictor, horizon, at, predictors_)
    per_layer = range(len(d.layers)) if layers is not None else range(1)
    out.mkdir(parents=True, exist_ok=True)
    _agg()
    import matplotlib.pyplot as plt
    from rich.progress import Progress

    jobs = [(n, j) for n in names for j in (per_layer if n in PER_LAYER else [None])]
    written = []
    with Progress(console=_stderr(), transient=True) as prog:
        task = prog.add_task("drawing", total=len(jobs))
        for n, j in jobs:
            fig = FIGURES[n](d, j)
            name = f"{n}.{fmt_}" if j is None else f"{n}-layer{d.layers[j]}.{fmt_}"
            fig.savefig(out / name, dpi=dpi, format=fmt_)
            plt.close(fig)
            written.append(out / name)
            prog.advance(task)
    console().print("wrote " + ", ".join(str(p) for p in written))


def _stderr():
    import sys

    from rich.console import Console

    return Console(file=sys.stderr)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(cols: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f4f4f4}img{max-width:100%;display:block;margin:1em 0}.note{color:#666;font-size:.9em}
.warn{color:#8a1f11;background:#fdecea;border-left:4px solid #c0392b;padding:.4em .8em}"""


def report(
    trace: Path = typer.Argument(..., help="Trace directory.", show_default=False),
    out: Path = typer.Option(None, "--out", "-o", help="HTML file to write (default: <trace name>.html here)."),
    steps: str = STEPS_OPTION,
    layers: str = typer.Option(
        None,
        "--layers",
        metavar="LIST",
        help="Layers to report: comma-separated indices (negative ones count from the end: -1 is the last layer) "
        "or module paths (default: all; figures of the first 4).",
    ),
    predictor: str = typer.Option("sw_avg", "--predictor", help="Predictor of the forecast section."),
    horizon: int = typer.Option(100, "--horizon", min=1, help="Forecast horizon in steps."),
    at: int = typer.Option(None, "--at", metavar="STEP", help="Forecast origin (default: end of the trace)."),
    backtest: bool = typer.Option(False, "--backtest", help="Also run a backtest of --predictors (slower)."),
    predictors_: str = typer.Option("last,sw_avg,ema", "--predictors", help="Predictors of the backtest section."),
    gpus: int = typer.Option(
        None,
        "--gpus",
        help="GPUs of the advice section (moeload advise; default: the "
        "trace's expert-parallel size when > 1, else no advice section).",
        show_default=False,
    ),
    skip_bad_parts: bool = SKIP_BAD_PARTS_OPTION,
) -> None:
    """One self-contained HTML page (figures embedded as PNG, tables inline; viewable offline).

    Example: moeload report runs/exp1.moeload -o exp1.html --backtest
    """
    from moeload.cli.info import info_data, info_rows, summary_data, summary_rows

    t = open_trace_arg(trace, skip_bad_parts)
    out = out or Path(f"{t.path.name}.html")
    refuse_output_inside(out, trace)
    if out.parent and not out.parent.exists():
        raise InputError(f"{out}: directory {out.parent} does not exist")
    d = Data(t, steps, _data_layers(t, layers), predictor, horizon, at, predictors_)
    per_layer = range(len(d.layers)) if layers is not None else range(min(4, len(d.layers)))
    _agg()
    from rich.progress import Progress

    parts: list[str] = []
    with Progress(console=_stderr(), transient=True) as prog:
        task = prog.add_task("report", total=5 + 3 * len(per_layer) + 2 * backtest)

        def step(html_: str) -> None:
            parts.append(html_)
            prog.advance(task)

        step("<h2>Trace</h2>" + _html_table(["field", "value"], info_rows(t, info_data(t))))
        sd = summary_data(t, steps, layers, window=d.counts_window)
        cols, rows = summary_rows(sd)
        mb = sd["model_boundary"]
        step(
            f"<h2>Imbalance and phases, steps {sd['first_step']}..{sd['last_step']}</h2>"
            "<p class=note>max/mean: hottest expert over the mean expert load, per step (mean over steps; worst "
            "step). CV, min/max: of each expert's total over the window. Stable from: first step of the final "
            "stable phase (moeload.states, window rule).</p>"
            + _html_table(cols, rows)
            + f"<p>{'Whole model stable from step ' + str(mb) if mb >= 0 else 'Whole model: not stable yet.'}</p>"
        )
        step(f"<img alt='fluctuation' src='data:image/png;base64,{_png(_fig_fluctuation(d, None))}'>")
        if t.manifest.ep_size > 1:
            parts.append(
                f"<h2>Per-GPU load, layer {d.layers[0]} (recorded expert placement, "
                f"{t.manifest.ep_size} expert-parallel ranks)</h2>"
                f"<img alt='gpu load' src='data:image/png;base64,{_png(_fig_gpu_load(d, 0))}'>"
            )
        for j in per_layer:
            li = d.layers[j]
            step(
                f"<h2>Layer {li}: {html.escape(t.layers[li])}</h2>"
                f"<img alt='heatmap' src='data:image/png;base64,{_png(_fig_heatmap(d, j))}'>"
            )
            step(f"<img alt='proportions' src='data:image/png;base64,{_png(_fig_proportions(d, j))}'>")
            step(f"<img alt='forecast' src='data:image/png;base64,{_png(_fig_forecast(d, j))}'>")
        f = d.forecast
        mean = f.forecast.mean(0)
        frows = [
            [int(li), " ".join(f"{e}:{mean[j, e]:.1%}" for e in np.argsort(-mean[j])[:4])]
            for j, li in enumerate(f.layers)
        ]
        step(
            f"<h2>Forecast: {html.escape(predictor)}, {horizon} steps from step {f.origin}</h2>"
            + _html_table(["layer", "hottest experts (mean forecast share)"], frows)
        )
        G = gpus if gpus is not None else (t.manifest.ep_size if t.manifest.ep_size > 1 else None)
        if G is not None:
            step(_advise_section(t, G))
        if backtest:
            import moeload.evaluation as evaluation

            bt = d.backtest
            s = evaluation.summarize(bt)
            cols = ["predictor", "horizon", "phase", "n_origins", "havg_mae_pp", "mae_pp", "maxload_err"]
            step("<h2>Backtest</h2>" + _html_table(cols, s[cols].values.tolist()))
            step(f"<img alt='backtest' src='data:image/png;base64,{_png(_fig_backtest(d, None))}'>")
    warn_html = "".join(f"<p class=warn>warning: {html.escape(w)}</p>" for w in sd["warnings"])
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moeload report: {html.escape(t.path.name)}</title>"
        f"<style>{CSS}</style></head><body><h1>moeload report: {html.escape(str(t.path))}</h1>"
        f"<p class=note>generated {now}</p>{warn_html}{''.join(parts)}</body></html>\n"
    )
    out.write_text(page, encoding="utf-8")
    console().print(f"report written to {out} ({len(page) // 1024} KiB)")


def _advise_section(t, gpus: int) -> str:
    """HTML of `moeload advise` on `gpus` GPUs: table, recommendation, figure (or why it is absent)."""
    from moeload.advise import advise
    from moeload.plots.advise import strategies

    try:
        adv = advise(t, gpus)
    except InputError as e:
        return f"<h2>Advice on {gpus} GPUs</h2><p class=warn>not computed: {html.escape(str(e))}</p>"
    cols = ["strategy", "MoE ms/step", "saving %", "95 % interval", "experts moved", "extra memory/GPU (B)"]
    rows = [
        [
            r["name"],
            f"{r['step_ms']:.3f}",
            f"{r['saving_pct']:+.1f}",
            "" if r["name"] == "none" else f"{r['saving_lo']:+.1f} .. {r['saving_hi']:+.1f}",
            int(r["moved_experts"]),
            int(r["extra_memory_bytes"]),
        ]
        for r in adv.table.to_dict("records")
    ]
    return (
        f"<h2>Advice on {gpus} GPUs ({html.escape(adv.calibration)} calibration, all-to-all "
        f"{html.escape(adv.info['all_to_all'])})</h2><p class=note>Predicted MoE-layer time per step under each "
        "balancing strategy (moeload advise; model and assumptions in docs/advise.md).</p>"
        + _html_table(cols, rows)
        + f"<p>recommended: <b>{html.escape(adv.recommended)}</b> - {html.escape(adv.reason)}</p>"
        f"<img alt='advice' src='data:image/png;base64,{_png(strategies(adv).figure)}'>"
    )


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)
    app.command("report")(report)
