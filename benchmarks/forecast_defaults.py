"""Fit the shipped defaults of `mean_revert` across runs and report them on held-out runs.

Error = havg_mae_pp of moeload.evaluation (100 x mean over experts of |forecast mean share - realised
mean share over the next H steps|), per layer, averaged over the (origin, layer) pairs of a phase;
phase = moeload.states window label of the layer at the step before the origin (backtest's default).
Runs of >= 1,250 steps: H = 1,000 and 2,000 where origin + H fits, origins every 125 steps from 250;
shorter runs: H = 100, origins every 25 steps from 100. Baseline: SW_Avg, windows 25 ... 3,200,
sliding or flat, the best per (run, H, phase) cell chosen on that run itself (in its favour).

Fit: a grid over (window, rho, shrink, target); the score of a setting on a set of runs is the mean
over runs of the mean over that run's (H, phase) cells of error / SW_Avg(best). Held out: for every
run R, the setting fit on the other runs of R's regime is reported on R (via evaluation.backtest):
aux-loss runs on the other aux-loss runs, expert-bias runs on the other expert-bias run(s) (bias-s0
-> bias-s1 and bias-s1 -> bias-s0; both have H = 1,000 only, H = 2,000 does not fit after 250 steps
of history). Shipped: the setting fit on all runs of a regime ("aux", "bias"; in-sample there);
`--write` puts both into moeload/predictors/_defaults.py. The aux defaults are also reported on the
bias runs (a regime they were not fit on). `--corpus extended` adds NEW_RUNS (the train_long traces)
to the aux runs and windows 800 / 1,600 to the grid; its "held out" column is then leave-one-run-out
over all seven aux runs.

  .venv/bin/python benchmarks/forecast_defaults.py [--corpus shipped|extended] [--write] [--json OUT]

`--test TRACE` fits nothing: every registered predictor at its default settings (`mean_revert` with
the shipped defaults as they are in _defaults.py; `backtest`'s incremental mode, so `lstm` trains once
at the first origin) on a run never used for fitting, against SW_Avg at its best window chosen on
that run, with hindsight bounds chosen on the test cells themselves: the best mean_revert setting
of the extended grid per cell and per (origin, layer) pair, the best SW_Avg window per pair, and the
best linear blend of window means per cell (`linear_bound`):

  .venv/bin/python benchmarks/forecast_defaults.py --test experiments/traces/gpt3-small-moe-aux-s0.moeload [--json OUT] [--figure PNG]

`online_blend` (weights learned on the test run's own past at each forecast, nothing fit on other
runs) is one of the registered predictors --test reports. `--summary J1,J2,...` reads --test JSON
outputs of several runs and prints one table (and with --figure, one chart) of `--predictors`
(default online_blend, mean_revert) per run and cell, with pairs, SW_Avg(best) and the hindsight
linear-blend bound:

  .venv/bin/python benchmarks/forecast_defaults.py --summary /tmp/fd/ob_a.json,/tmp/fd/ob_b.json [--figure PNG]

`--test ... --by-origin N` also prints every cell's errors per block of N origins (where a ratio comes
from). `--online-grid RUN,RUN,...` (names of RUNS / NEW_RUNS) scores online_blend's ONLINE_GRID on those
runs: how its defaults were chosen, with the leave-one-run-out choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from moeload import open_trace, states
from moeload.evaluation import backtest
from moeload.predictors import spec_label
from moeload.predictors._defaults import MEAN_REVERT
from moeload.predictors._windows import cumsum0, window_mean
from moeload.predictors.mean_revert import pull_terms

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (trace, regime)
    "gpt3-small-moe-s0": ("experiments/traces/gpt3-small-moe-s0.moeload", "aux"),
    "gpt3-small-moe-s1": ("experiments/traces/gpt3-small-moe-s1.moeload", "aux"),
    "gpt3-medium-moe-s0": ("experiments/traces/gpt3-medium-moe-s0.moeload", "aux"),
    "gpt3-medium-moe-s1": ("experiments/traces/gpt3-medium-moe-s1.moeload", "aux"),
    "demo": ("notebooks/data/demo.moeload", "aux"),
    "gpt3-small-moe-bias-s0": ("experiments/traces/gpt3-small-moe-bias-s0.moeload", "bias"),
    "gpt3-small-moe-bias-s1": ("experiments/traces/gpt3-small-moe-bias-s1.moeload", "bias"),
}
NEW_RUNS = {  # --corpus extended adds these (experiments/train_long.py, 32,768 tokens/step)
    "gpt3-medium-moe-aux-s0": ("experiments/traces/gpt3-medium-moe-aux-s0.moeload", "aux"),  # 1,400 steps
    "gpt3-small-moe-aux-s0": ("experiments/traces/gpt3-small-moe-aux-s0.moeload", "aux"),  # 10,000 steps
}
PHASES = ("transient", "stable")
SW = [{"window": w, "slide": s} for w, s in itertools.product((25, 50, 100, 200, 400, 800, 1600, 3200), (True, False))]
WINDOWS = (25, 50, 100, 200, 400)  # the grid the shipped defaults were fit on
WINDOWS_EXTENDED = (25, 50, 100, 200, 400, 800, 1600)  # --corpus extended and the --test bounds
SHRINK = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
BLOCKS = (1, 10, 25)  # steps per block of the noise estimate
HALFLIFE = (None, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800)  # steps; None = no pull (rho = 1)
TARGETS = ("uniform", "long")
LONG_WINDOW = 1600


def rho_of(halflife: float | None) -> float:
    return 1.0 if halflife is None else float(0.5 ** (1.0 / halflife))


def protocol(S: int) -> tuple[tuple[int, ...], int, int]:
    """(horizons, every, min_history) for a run of S steps."""
    if S >= 1250:
        return tuple(h for h in (1000, 2000) if 250 + h <= S), 125, 250
    return (100,), 25, 100


class Run:
    """One trace: proportions, phase labels, origins per horizon and SW_Avg's best error per cell."""

    def __init__(self, name: str, path: str, regime: str, windows: tuple[int, ...] = WINDOWS) -> None:
        self.name, self.regime, self.windows = name, regime, windows
        self.p = open_trace(ROOT / path).proportions()  # [S, L, E]
        S = self.p.shape[0]
        self.horizons, every, mh = protocol(S)
        self.labels = states.detect(self.p).labels  # [S, L]
        self.org = {H: np.arange(mh, S - H + 1, every) for H in self.horizons}
        self.c = cumsum0(self.p)

    def sw_best(self, layers: np.ndarray | None = None) -> dict:
        """{(H, phase): (error, label)} of SW_Avg at its best (window, slide) on this run."""
        out = {}
        for H in self.horizons:
            df = backtest(self.p, [("sw_avg", s) for s in SW], horizons=[H], origins=self.org[H], phases=self.labels)
            if layers is not None:
                df = df[df["layer"].isin(layers)]
            g = df.groupby(["phase", "predictor"])["havg_mae_pp"].mean()
            for ph in PHASES:
                if ph in g.index.get_level_values(0):
                    out[(H, ph)] = (float(g[ph].min()), str(g[ph].idxmin()))
        return out

    def uniform(self) -> dict:
        """{(H, phase): error} of the constant forecast 1/E (what full shrinkage, or an instant pull, gives)."""
        out = {}
        for H in self.horizons:
            o = self.org[H]
            e = 100 * np.abs(1 / self.p.shape[2] - window_mean(self.c, o + H, H)).mean(-1)  # [n, L]
            st = self.labels[o - 1]
            for ph in PHASES:
                sel = st == (ph == "stable")
                if sel.any():
                    out[(H, ph)] = float(e[sel].mean())
        return out

    def grid(self, layers: np.ndarray | None = None) -> dict:
        """{(H, phase): errors [n_settings]} of every setting of settings(self.windows) (mean over the cell's pairs)."""
        return {c: e.mean(axis=1) for c, e in self.grid_pairs(layers).items()}

    def grid_pairs(self, layers: np.ndarray | None = None) -> dict:
        """{(H, phase): errors [n_settings, pairs]} of every setting of settings(self.windows), by the closed form of the
        horizon average from the predictor's own `pull_terms` (so the forecasts are exactly mean_revert's)."""
        L = self.p.shape[1]
        lay = np.arange(L) if layers is None else np.asarray(layers)
        mask = np.ones(self.p.shape[1:], dtype=bool)
        out = {}
        for H in self.horizons:
            o = self.org[H]
            st = self.labels[o - 1][:, lay]  # [n, L']
            y = window_mean(self.c, o + H, H)[:, lay]  # [n, L', E]
            errs = []
            for w, target, b in itertools.product(self.windows, TARGETS, BLOCKS):
                terms = [pull_terms(self.p[:oi], mask, w, b, target, LONG_WINDOW) for oi in o]
                t = np.stack([x[0] for x in terms])[:, lay]
                dev = np.stack([x[1] for x in terms])[:, lay]
                ratio = np.stack([x[2] for x in terms])[:, lay]
                for k in SHRINK:
                    s = np.clip(1 - k * ratio, 0, 1)[..., None]
                    for hl in HALFLIFE:
                        r = rho_of(hl)
                        g = 1.0 if r == 1.0 else r * (1 - r**H) / ((1 - r) * H)
                        errs.append(100 * np.abs(t + dev * s * g - y).mean(-1))  # [n, L']
            e = np.stack(errs)  # [n_settings, n, L']
            for ph in PHASES:
                sel = st == (ph == "stable")
                if sel.any():
                    out[(H, ph)] = e[:, sel]
        return out


def causal_phase_check(run: Run) -> str:
    """How often states.detect on the history p[:o] (all a forecaster can see) gives the phase the
    backtest assigns from the whole run, at the origins of the shortest horizon."""
    o = run.org[run.horizons[0]]
    hist = np.stack([states.detect(run.p[:oi]).labels[-1] for oi in o])  # [n, L]
    full = run.labels[o - 1]
    return (
        f"{run.name}: transient pairs {int((~full).sum())}, labelled transient from the history alone "
        f"{int((~full & ~hist).sum())}; stable pairs {int(full.sum())}, labelled stable {int((full & hist).sum())}"
    )


def settings(windows: tuple[int, ...] = WINDOWS) -> list[dict]:
    """The fit grid, in the order of Run.grid_pairs."""
    return [
        {"window": w, "target": t, "block": b, "shrink": k, "rho": rho_of(hl), "halflife": hl}
        for w, t, b in itertools.product(windows, TARGETS, BLOCKS)
        for k in SHRINK
        for hl in HALFLIFE
    ]


SETTINGS = settings(WINDOWS)


def fit(scores: list[dict], sws: list[dict], windows: tuple[int, ...] = WINDOWS) -> dict:
    """The setting with the smallest mean over runs of mean over cells of error / SW_Avg(best)."""
    per_run = [np.mean([g[c] / sw[c][0] for c in g], axis=0) for g, sw in zip(scores, sws)]
    i = int(np.argmin(np.mean(per_run, axis=0)))
    return settings(windows)[i]


def params(setting: dict) -> dict:
    return {k: setting[k] for k in ("window", "rho", "shrink", "block", "target")}


def report(run: Run, setting: dict, sw: dict, layers: np.ndarray | None = None, regime: str | None = None) -> dict:
    """{(H, phase): (error, ratio, pairs)} of mean_revert with `setting` (or the shipped `regime` defaults)."""
    spec = (
        ("mean_revert", params(setting) | {"long_window": LONG_WINDOW})
        if regime is None
        else ("mean_revert", {"regime": regime})
    )
    if regime is not None and MEAN_REVERT[regime] != params(setting):
        print(
            f"note: shipped {regime} defaults {MEAN_REVERT[regime]} differ from this fit {params(setting)}; run --write"
        )
    out = {}
    for H in run.horizons:
        df = backtest(run.p, [spec], horizons=[H], origins=run.org[H], phases=run.labels)
        if layers is not None:
            df = df[df["layer"].isin(layers)]
        for ph, g in df.groupby("phase"):
            e = float(g["havg_mae_pp"].mean())
            out[(H, ph)] = (e, e / sw[(H, ph)][0], len(g))
    return out


def short(s: dict) -> str:
    hl = "none" if s["halflife"] is None else f"{s['halflife']} steps"
    return f"w={s['window']}, pull half-life {hl}, shrink={s['shrink']}, block={s['block']}, target={s['target']}"


def write_defaults(aux: dict, bias: dict, prov: dict) -> None:
    """Write moeload/predictors/_defaults.py and update the loaded table in place (this process reports it)."""
    table = {"aux": params(aux), "bias": params(bias)}
    text = (
        '"""Shipped default parameters of `mean_revert`, fit across runs (written by benchmarks/forecast_defaults.py --write)."""\n\n'
        f"MEAN_REVERT = {json.dumps(table, indent=4)}\n"
        f"PROVENANCE = {json.dumps(prov, indent=4)}\n"
    )
    (ROOT / "moeload/predictors/_defaults.py").write_text(text)
    MEAN_REVERT.clear()
    MEAN_REVERT.update(table)


LIN_WINDOWS = (25, 50, 100, 200, 400, 800, 1600, 3200)


def linear_bound(run: Run, iters: int = 60) -> dict:
    """{(H, phase): error} of the best fixed linear combination of window means (LIN_WINDOWS, the whole
    history's mean, 1/E), its weights chosen on the test cell itself by least absolute deviation
    (IRLS), i.e. in the forecaster's favour. No forecast that is one linear blend of these means per
    cell (SW_Avg at any window, blend, mean_revert with rho = 1 and shrink = 0, EMA up to its kernel's
    fit by these windows) can have a smaller error on that cell."""
    out = {}
    for H in run.horizons:
        o = run.org[H]
        st = run.labels[o - 1]  # [n, L]
        y = window_mean(run.c, o + H, H)  # [n, L, E]
        feats = [window_mean(run.c, o, w) for w in LIN_WINDOWS] + [window_mean(run.c, o, o)]
        X = np.stack(feats + [np.full_like(y, 1 / run.p.shape[2])], axis=-1)  # [n, L, E, k]
        for ph in PHASES:
            sel = st == (ph == "stable")
            if not sel.any():
                continue
            A, b = X[sel].reshape(-1, X.shape[-1]), y[sel].reshape(-1)
            w = np.linalg.lstsq(A, b, rcond=None)[0]
            for _ in range(iters):  # IRLS for least absolute deviation
                sq = 1 / np.sqrt(np.maximum(np.abs(A @ w - b), 1e-9))
                w = np.linalg.lstsq(A * sq[:, None], b * sq, rcond=None)[0]
            out[(H, ph)] = float(100 * np.abs(A @ w - b).reshape(int(sel.sum()), -1).mean())
    return out


def blocks_by_origin(run: Run, sw: dict, frames: dict, n: int) -> None:
    """Per block of n consecutive origins of every (H, phase) cell: pairs, share of the cell's error, and the mean
    error of each predictor next to SW_Avg at the cell's best setting (where in the run a cell's ratio comes from)."""
    by_label = {spec_label(("sw_avg", s)): ("sw_avg", s) for s in SW}
    for H in run.horizons:
        o = run.org[H]
        for ph in PHASES:
            if (H, ph) not in sw:
                continue
            ref = backtest(run.p, [by_label[sw[(H, ph)][1]]], horizons=[H], origins=o, phases=run.labels)
            ref = ref[ref["phase"] == ph]
            print(f"\nH={H} {ph}: per {n} origins, mean havg_mae_pp (share of the cell's error) vs {sw[(H, ph)][1]}")
            for lo in range(0, len(o), n):
                blk = o[lo : lo + n]
                r = ref[ref["origin"].isin(blk)]
                if r.empty:
                    continue
                parts = []
                for pname, dfs in frames.items():
                    d = next(x for x in dfs if x["horizon"].iloc[0] == H)
                    d = d[d["phase"] == ph]
                    b = d[d["origin"].isin(blk)]["havg_mae_pp"]
                    parts.append(f"{pname} {b.mean():.4f} ({b.sum() / d['havg_mae_pp'].sum():.0%})")
                print(
                    f"  origins {blk[0]}-{blk[-1]}: {len(r)} pairs; "
                    + "; ".join(parts)
                    + f"; SW_Avg {r['havg_mae_pp'].mean():.4f}"
                )


def heldout(
    path: str, json_out: str | None, fig_out: str | None, predictors: list[str] | None = None, by_origin: int = 0
) -> None:
    """Every registered predictor at its default settings on a run never used for fitting (fits nothing)."""
    from moeload.predictors import available

    t0 = time.perf_counter()
    name = Path(path).name.removesuffix(".moeload")
    run = Run(name, path, "aux", WINDOWS_EXTENDED)
    S, L, E = run.p.shape
    _, every, mh = protocol(S)
    print(
        f"{name}: {S} steps, {L} layers x {E} experts; {states.detect(run.p).model_verdict}; horizons {list(run.horizons)}, "
        f"origins every {every} from {mh}",
        flush=True,
    )
    sw = run.sw_best()
    print(f"SW_Avg best per cell done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows: dict[str, dict] = {}
    frames: dict[str, list] = {}
    for pname in predictors or available():
        t1 = time.perf_counter()
        res = {}
        for H in run.horizons:
            df = backtest(run.p, [pname], horizons=[H], origins=run.org[H], phases=run.labels)
            frames.setdefault(pname, []).append(df)
            for ph, g in df.groupby("phase"):
                e = float(g["havg_mae_pp"].mean())
                res[(H, ph)] = (e, e / sw[(H, ph)][0], len(g))
        rows[pname] = res
        per_origin = np.mean([d.groupby("origin")["fit_s"].first().mean() for d in frames[pname]])
        print(
            f"  {pname:13s} "
            + "  ".join(f"H={H} {ph} {v[1]:.2f}" for (H, ph), v in res.items())
            + f"  ({time.perf_counter() - t1:.1f} s; update + predict {1e3 * per_origin:.2f} ms per origin)",
            flush=True,
        )
    if by_origin:
        blocks_by_origin(run, sw, frames, by_origin)
    uni = run.uniform()
    rows["constant 1/E (reference)"] = {c: (e, e / sw[c][0], 0) for c, e in uni.items()}
    grid = run.grid_pairs()
    rows["mean_revert, best setting per cell (hindsight)"] = {
        c: (float(e.mean(axis=1).min()), float(e.mean(axis=1).min()) / sw[c][0], e.shape[1]) for c, e in grid.items()
    }
    per_setting = np.mean([e.mean(axis=1) / sw[c][0] for c, e in grid.items()], axis=0)  # [n_settings]
    one = int(per_setting.argmin())
    print(
        f"best single mean_revert setting for every cell (hindsight): {short(settings(run.windows)[one])}", flush=True
    )
    rows["mean_revert, best single setting for all cells (hindsight)"] = {
        c: (float(e[one].mean()), float(e[one].mean()) / sw[c][0], e.shape[1]) for c, e in grid.items()
    }
    rows["mean_revert, best setting per pair (hindsight)"] = {
        c: (float(e.min(axis=0).mean()), float(e.min(axis=0).mean()) / sw[c][0], e.shape[1]) for c, e in grid.items()
    }
    sw_pick = {}
    for H in run.horizons:
        df = backtest(run.p, [("sw_avg", s) for s in SW], horizons=[H], origins=run.org[H], phases=run.labels)
        for ph, g in df.groupby(["phase", "origin", "layer"])["havg_mae_pp"].min().groupby("phase"):
            sw_pick[(H, ph)] = (float(g.mean()), float(g.mean()) / sw[(H, ph)][0], len(g))
    rows["SW_Avg, best window per pair (hindsight)"] = sw_pick
    lin = linear_bound(run)
    rows["best linear blend of window means per cell (hindsight)"] = {
        c: (e, e / sw[c][0], grid[c].shape[1]) for c, e in lin.items()
    }
    cells = [c for c in sw]
    print("\nratio to SW_Avg at its best window on this run (havg_mae_pp in brackets); <= 0.80 is the target\n")
    print("| predictor | " + " | ".join(f"H={H} {ph}" for H, ph in cells) + " |")
    print("|---|" + "---|" * len(cells))
    print("| SW_Avg, best window on this run | " + " | ".join(f"{sw[c][0]:.4f} ({sw[c][1]})" for c in cells) + " |")
    for k, res in rows.items():
        print(f"| {k} | " + " | ".join(f"{res[c][1]:.2f} ({res[c][0]:.4f})" if c in res else "-" for c in cells) + " |")
    print("| pairs (origin x layer) | " + " | ".join(str(grid[c].shape[1]) for c in cells) + " |")
    print("\n" + drift(run))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")
    if json_out:
        Path(json_out).write_text(
            json.dumps(
                {
                    "trace": path,
                    "sw_best": {f"{H} {ph}": v for (H, ph), v in sw.items()},
                    "rows": {k: {f"{H} {ph}": v for (H, ph), v in r.items()} for k, r in rows.items()},
                },
                indent=1,
            )
        )
    if fig_out:
        figure(rows, sw, cells, name, fig_out)


def drift(run: Run, block: int = 100) -> str:
    """How far 100-step means move over a lag, against the noise of a mean, and whether past moves predict future ones."""
    p = run.p
    n = p.shape[0] // block
    b = p[: n * block].reshape(n, block, *p.shape[1:]).mean(axis=1)  # [n, L, E]
    lags = [k for k in (1, 2, 5, 10, 20) if k < n]
    rms = [1e4 * float(np.sqrt(np.mean((b[k:] - b[:-k]) ** 2))) for k in lags]
    white = 1e4 * float(np.sqrt(2 * np.mean(np.var(np.diff(p, axis=0), axis=0) / 2) / block))
    past, fut = (b[2:-2] - b[:-4]).ravel(), (b[4:] - b[3:-1]).ravel()
    return (
        f"{run.name}: rms change of {block}-step means x1e4 at lags {[k * block for k in lags]} steps: "
        f"{', '.join(f'{v:.1f}' for v in rms)} (independent steps would give {white:.1f}); "
        f"corr(b[t-1] - b[t-3], b[t+1] - b[t]) = {np.corrcoef(past, fut)[0, 1]:+.2f}"
    )


def figure(rows: dict, sw: dict, cells: list, name: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows if k != "last"]  # last == kalman here; one bar is enough
    fig, ax = plt.subplots(figsize=(12, 6))
    x = np.arange(len(cells))
    width = 0.85 / len(names)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(names):
        v = [rows[k][c][1] if c in rows[k] else np.nan for c in cells]
        hind = "hindsight" in k
        ax.bar(
            x - 0.425 + width * (i + 0.5),
            v,
            width,
            color=cmap(i % 20),
            hatch="//" if hind else None,
            edgecolor="0.3" if hind else None,
            label=k,
        )
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8x")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"H={H}, {ph}" for H, ph in cells])
    ax.set_ylabel("havg_mae_pp / SW_Avg (best window on this run), log scale")
    ax.set_title(f"{name}, held out: predictors at default settings (hatched: hindsight bounds, not forecasts)")
    ax.legend(fontsize=7.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(json_in: str, path: str) -> None:
    """The --test figure again from its --json output (no recomputation)."""
    d = json.loads(Path(json_in).read_text())
    key = lambda c: (int(c.split()[0]), c.split()[1])  # noqa: E731
    rows = {k: {key(c): v for c, v in r.items()} for k, r in d["rows"].items()}
    sw = {key(c): v for c, v in d["sw_best"].items()}
    figure(rows, sw, list(sw), Path(d["trace"]).name.removesuffix(".moeload"), path)


ONLINE_GRID = [
    {"halflife": hl, "pool": pool, "min_origin": mo, "fresh": True}
    for hl, pool, mo in itertools.product((125.0, 250.0), ("layer", "model"), (25, 100, 200, 400))
]


def online_grid(names: list[str]) -> None:
    """How online_blend's defaults were chosen: every ONLINE_GRID setting on the runs `names` (keys of
    RUNS | NEW_RUNS), scored per run by the mean over its (H, phase) cells of error / SW_Avg(best), then by
    the mean over runs, and by the mean over every subset that leaves one run out."""
    corpus = RUNS | NEW_RUNS
    specs = [("online_blend", g) for g in ONLINE_GRID]
    score = np.zeros((len(specs), len(names)))
    cells: dict = {}
    for j, n in enumerate(names):
        t0 = time.perf_counter()
        run = Run(n, *corpus[n])
        sw = run.sw_best()
        for H in run.horizons:
            df = backtest(run.p, specs, horizons=[H], origins=run.org[H], phases=run.labels)
            for (lab, ph), g in df.groupby(["predictor", "phase"]):
                cells.setdefault((n, lab), {})[(H, ph)] = float(g["havg_mae_pp"].mean()) / sw[(H, ph)][0]
        for i, sp in enumerate(specs):
            score[i, j] = np.mean(list(cells[(n, spec_label(sp))].values()))
        print(f"{n}: {len(specs)} settings ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n| setting | " + " | ".join(names) + " | mean | " + " | ".join(f"mean without {n}" for n in names) + " |")
    print("|---|" + "---|" * (2 * len(names) + 1))
    for i in np.argsort(score.mean(axis=1)):
        lo = [np.delete(score[i], j).mean() for j in range(len(names))]
        print(
            f"| {spec_label(specs[i])} | "
            + " | ".join(f"{v:.3f}" for v in score[i])
            + f" | {score[i].mean():.3f} | "
            + " | ".join(f"{v:.3f}" for v in lo)
            + " |"
        )
    for j, n in enumerate(names):
        i = int(np.argmin(np.delete(score, j, axis=1).mean(axis=1)))
        c = cells[(n, spec_label(specs[i]))]
        print(
            f"chosen without {n}: {spec_label(specs[i])}; on {n}: "
            + ", ".join(f"H={H} {ph} {v:.2f}" for (H, ph), v in sorted(c.items()))
        )
    for n in names:
        per = {c: [cells[(n, spec_label(sp))][c] for sp in specs] for c in cells[(n, spec_label(specs[0]))]}
        print(
            f"range over the grid on {n}: "
            + ", ".join(f"H={H} {ph} {min(v):.2f}-{max(v):.2f}" for (H, ph), v in sorted(per.items()))
        )


LINEAR = "best linear blend of window means per cell (hindsight)"


def summary(paths: list[str], names: list[str], fig_out: str | None) -> None:
    """One table (and chart) of `names` over several --test JSON outputs: ratio to SW_Avg(best) per run and cell."""
    cells = []  # (run, H, phase, pairs, sw error, sw label, {name: ratio}, linear-bound ratio)
    for path in paths:
        d = json.loads(Path(path).read_text())
        run = Path(d["trace"]).name.removesuffix(".moeload")
        for c, (e, lab) in d["sw_best"].items():
            H, ph = c.split()
            missing = [n for n in names if n not in d["rows"]]
            if missing:
                raise SystemExit(f"{path}: no row for {', '.join(missing)}; rerun --test with them in --predictors")
            r = {n: d["rows"][n][c][1] for n in names}
            cells.append((run, int(H), ph, d["rows"][names[0]][c][2], e, lab, r, d["rows"][LINEAR][c][1]))
    print(
        "| run | H | phase | pairs | SW_Avg best (havg_mae_pp, setting) | "
        + " | ".join(names)
        + " | linear blend per cell (hindsight) | <= 0.80 |"
    )
    print("|---|---|---|---|---|" + "---|" * (len(names) + 2))
    for run, H, ph, n, e, lab, r, lin in cells:
        ok = "met" if r[names[0]] <= 0.8 else "missed"
        vals = " | ".join(f"{r[k]:.2f}" for k in names)
        print(f"| {run} | {H} | {ph} | {n} | {e:.4f} ({lab}) | {vals} | {lin:.2f} | {ok} ({names[0]}) |")
    if fig_out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(cells)), 5))
        x = np.arange(len(cells))
        width = 0.8 / (len(names) + 1)
        for i, k in enumerate(names + [LINEAR]):
            v = [c[6][k] if k in c[6] else c[7] for c in cells]
            hind = k == LINEAR
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                v,
                width,
                label="linear blend per cell (hindsight bound)" if hind else k,
                hatch="//" if hind else None,
                color="0.85" if hind else None,
                edgecolor="0.3" if hind else None,
            )
        ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8x")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(
            x,
            [f"{c[0].replace('gpt3-', '').replace('-moe', '')} H={c[1]} {c[2][:5]}" for c in cells],
            fontsize=7,
            rotation=60,
            ha="right",
        )
        ax.set_ylabel("havg_mae_pp / SW_Avg (best window on that run)")
        ax.set_title("held-out runs, predictors at default settings")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--write", action="store_true", help="write the fitted defaults into moeload/predictors/_defaults.py"
    )
    ap.add_argument("--json", help="write every cell as JSON here")
    ap.add_argument(
        "--corpus",
        choices=("shipped", "extended"),
        default="shipped",
        help="shipped: the runs and grid the shipped defaults were fit on; extended: + NEW_RUNS, windows to 1,600",
    )
    ap.add_argument("--test", help="held-out run: every predictor at its defaults, nothing fitted")
    ap.add_argument("--figure", help="with --test: bar chart (PNG) here")
    ap.add_argument(
        "--predictors", help="with --test: only these (comma-separated; default every registered predictor)"
    )
    ap.add_argument("--replot", help="with --figure: draw the --test figure from this --json output")
    ap.add_argument(
        "--by-origin", type=int, default=0, help="with --test: errors per block of this many origins of every cell"
    )
    ap.add_argument("--online-grid", help="comma-separated run names: score online_blend's ONLINE_GRID on them")
    ap.add_argument("--summary", help="comma-separated --test JSON outputs: one table (and --figure) over runs")
    args = ap.parse_args()
    if args.online_grid:
        return online_grid(args.online_grid.split(","))
    if args.summary:
        names = args.predictors.split(",") if args.predictors else ["online_blend", "mean_revert"]
        return summary(args.summary.split(","), names, args.figure)
    if args.replot:
        return replot(args.replot, args.figure)
    if args.test:
        return heldout(
            args.test, args.json, args.figure, args.predictors.split(",") if args.predictors else None, args.by_origin
        )
    t0 = time.perf_counter()
    ext = args.corpus == "extended"
    win = WINDOWS_EXTENDED if ext else WINDOWS
    corpus = RUNS | NEW_RUNS if ext else RUNS
    print(f"corpus {args.corpus}: {', '.join(corpus)}; windows {win}", flush=True)
    runs = {n: Run(n, path, regime, win) for n, (path, regime) in corpus.items()}
    sw = {n: r.sw_best() for n, r in runs.items()}
    grid = {n: r.grid() for n, r in runs.items()}
    aux = [n for n, r in runs.items() if r.regime == "aux"]
    bias_runs = [n for n, r in runs.items() if r.regime == "bias"]
    s_aux = fit([grid[n] for n in aux], [sw[n] for n in aux], win)
    s_bias = fit([grid[n] for n in bias_runs], [sw[n] for n in bias_runs], win)
    prov = {
        "aux": f"fit by benchmarks/forecast_defaults.py on {', '.join(aux)}: {short(s_aux)}",
        "bias": f"fit by benchmarks/forecast_defaults.py on {', '.join(bias_runs)} (aux-loss-free, expert bias): {short(s_bias)}",
    }
    if args.write:
        write_defaults(s_aux, s_bias, prov)
        print("wrote moeload/predictors/_defaults.py")
    cells: dict[tuple, dict] = {}  # (run label, H, phase) -> columns
    fits: list[str] = []

    def put(label: str, res: dict, col: str, sw_c: dict, g: dict) -> None:
        for (H, ph), (e, ratio, n) in res.items():
            c = cells.setdefault(
                (label, H, ph),
                {
                    "sw": sw_c[(H, ph)],
                    "pairs": n,
                    "hindsight": float(g[(H, ph)].min() / sw_c[(H, ph)][0]),
                    "uniform": runs[label].uniform()[(H, ph)] / sw_c[(H, ph)][0],
                },
            )
            c[col], c[col + "_havg_mae_pp"] = ratio, e

    for name in aux:  # held out: fit on the other aux-loss runs
        others = [n for n in aux if n != name]
        s = fit([grid[n] for n in others], [sw[n] for n in others], win)
        fits.append(f"- {name}: fit on {', '.join(others)}: {short(s)}")
        put(name, report(runs[name], s, sw[name]), "held_out", sw[name], grid[name])
        put(name, report(runs[name], s_aux, sw[name], regime="aux"), "shipped", sw[name], grid[name])
    for name in bias_runs:  # held out across runs: fit on the other expert-bias run(s)
        r = runs[name]
        others = [n for n in bias_runs if n != name]
        if others:
            s = fit([grid[n] for n in others], [sw[n] for n in others], win)
            fits.append(f"- {name}: fit on {', '.join(others)}: {short(s)}")
            put(name, report(r, s, sw[name]), "held_out_bias", sw[name], grid[name])
        put(name, report(r, s_aux, sw[name], regime="aux"), "held_out", sw[name], grid[name])
        put(name, report(r, s_bias, sw[name], regime="bias"), "shipped_bias", sw[name], grid[name])
    cols = (
        ("held_out", "held out: aux defaults fit without this run"),
        ("held_out_bias", "held out: bias setting fit on the other bias run"),
        ("shipped", "shipped aux defaults (in-sample)"),
        ("shipped_bias", "shipped bias defaults (in-sample)"),
        ("hindsight", "family best on this cell (hindsight, not a forecast)"),
        ("uniform", "constant 1/E"),
    )
    print(
        "| run | H | phase | pairs | SW_Avg best on this run (havg_mae_pp) | " + " | ".join(c[1] for c in cols) + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(cols))
    for (label, H, ph), c in cells.items():
        vals = " | ".join(f"{c[k]:.2f}" if k in c else "" for k, _ in cols)
        print(f"| {label} | {H} | {ph} | {c['pairs']} | {c['sw'][0]:.4f} ({c['sw'][1]}) | {vals} |")
    print("\nHeld-out fits:\n" + "\n".join(fits))
    print(
        "\nWhole-model verdicts of the default rule:\n"
        + "\n".join(f"{r.name}: {states.detect(r.p).model_verdict}; horizons {list(r.horizons)}" for r in runs.values())
    )
    print(
        "\nPhase known to a forecaster (why the defaults are not per phase):\n"
        + "\n".join(causal_phase_check(r) for r in runs.values())
    )
    print(f"\nshipped aux: {short(s_aux)}\nshipped bias: {short(s_bias)}\nwall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cells": [{"run": k[0], "H": k[1], "phase": k[2], **v} for k, v in cells.items()],
                    "aux": s_aux,
                    "bias": s_bias,
                    "provenance": prov,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
