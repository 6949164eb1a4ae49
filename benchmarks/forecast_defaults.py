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
bias runs (a regime they were not fit on).

  .venv/bin/python benchmarks/forecast_defaults.py [--write] [--json OUT]
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
PHASES = ("transient", "stable")
SW = [{"window": w, "slide": s} for w, s in itertools.product((25, 50, 100, 200, 400, 800, 1600, 3200), (True, False))]
WINDOWS = (25, 50, 100, 200, 400)
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

    def __init__(self, name: str, path: str, regime: str) -> None:
        self.name, self.regime = name, regime
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
        """{(H, phase): errors [n_settings]} of every setting of SETTINGS, by the closed form of the horizon
        average from the predictor's own `pull_terms` (so the forecasts are exactly mean_revert's)."""
        L = self.p.shape[1]
        lay = np.arange(L) if layers is None else np.asarray(layers)
        mask = np.ones(self.p.shape[1:], dtype=bool)
        out = {}
        for H in self.horizons:
            o = self.org[H]
            st = self.labels[o - 1][:, lay]  # [n, L']
            y = window_mean(self.c, o + H, H)[:, lay]  # [n, L', E]
            errs = []
            for w, target, b in itertools.product(WINDOWS, TARGETS, BLOCKS):
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
                    out[(H, ph)] = e[:, sel].mean(axis=1)
        return out


def causal_phase_check(run: Run) -> str:
    """How often states.detect on the history p[:o] (all a forecaster can see) gives the phase the
    backtest assigns from the whole run, at the origins of the shortest horizon."""
    o = run.org[run.horizons[0]]
    hist = np.stack([states.detect(run.p[:oi]).labels[-1] for oi in o])  # [n, L]
    full = run.labels[o - 1]
    return (f"{run.name}: transient pairs {int((~full).sum())}, labelled transient from the history alone "
            f"{int((~full & ~hist).sum())}; stable pairs {int(full.sum())}, labelled stable {int((full & hist).sum())}")


SETTINGS = [{"window": w, "target": t, "block": b, "shrink": k, "rho": rho_of(hl), "halflife": hl}
            for w, t, b in itertools.product(WINDOWS, TARGETS, BLOCKS) for k in SHRINK for hl in HALFLIFE]


def fit(scores: list[dict], sws: list[dict]) -> dict:
    """The setting with the smallest mean over runs of mean over cells of error / SW_Avg(best)."""
    per_run = [np.mean([g[c] / sw[c][0] for c in g], axis=0) for g, sw in zip(scores, sws)]
    i = int(np.argmin(np.mean(per_run, axis=0)))
    return SETTINGS[i]


def params(setting: dict) -> dict:
    return {k: setting[k] for k in ("window", "rho", "shrink", "block", "target")}


def report(run: Run, setting: dict, sw: dict, layers: np.ndarray | None = None, regime: str | None = None) -> dict:
    """{(H, phase): (error, ratio, pairs)} of mean_revert with `setting` (or the shipped `regime` defaults)."""
    spec = ("mean_revert", params(setting) | {"long_window": LONG_WINDOW}) if regime is None else ("mean_revert", {"regime": regime})
    if regime is not None and MEAN_REVERT[regime] != params(setting):
        print(f"note: shipped {regime} defaults {MEAN_REVERT[regime]} differ from this fit {params(setting)}; run --write")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the fitted defaults into moeload/predictors/_defaults.py")
    ap.add_argument("--json", help="write every cell as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs = {n: Run(n, path, regime) for n, (path, regime) in RUNS.items()}
    sw = {n: r.sw_best() for n, r in runs.items()}
    grid = {n: r.grid() for n, r in runs.items()}
    aux = [n for n, r in runs.items() if r.regime == "aux"]
    bias_runs = [n for n, r in runs.items() if r.regime == "bias"]
    s_aux = fit([grid[n] for n in aux], [sw[n] for n in aux])
    s_bias = fit([grid[n] for n in bias_runs], [sw[n] for n in bias_runs])
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
            c = cells.setdefault((label, H, ph), {"sw": sw_c[(H, ph)], "pairs": n,
                                                  "hindsight": float(g[(H, ph)].min() / sw_c[(H, ph)][0]),
                                                  "uniform": runs[label].uniform()[(H, ph)] / sw_c[(H, ph)][0]})
            c[col], c[col + "_havg_mae_pp"] = ratio, e

    for name in aux:  # held out: fit on the other aux-loss runs
        others = [n for n in aux if n != name]
        s = fit([grid[n] for n in others], [sw[n] for n in others])
        fits.append(f"- {name}: fit on {', '.join(others)}: {short(s)}")
        put(name, report(runs[name], s, sw[name]), "held_out", sw[name], grid[name])
        put(name, report(runs[name], s_aux, sw[name], regime="aux"), "shipped", sw[name], grid[name])
    for name in bias_runs:  # held out across runs: fit on the other expert-bias run(s)
        r = runs[name]
        others = [n for n in bias_runs if n != name]
        if others:
            s = fit([grid[n] for n in others], [sw[n] for n in others])
            fits.append(f"- {name}: fit on {', '.join(others)}: {short(s)}")
            put(name, report(r, s, sw[name]), "held_out_bias", sw[name], grid[name])
        put(name, report(r, s_aux, sw[name], regime="aux"), "held_out", sw[name], grid[name])
        put(name, report(r, s_bias, sw[name], regime="bias"), "shipped_bias", sw[name], grid[name])
    cols = (("held_out", "held out: aux defaults fit without this run"),
            ("held_out_bias", "held out: bias setting fit on the other bias run"),
            ("shipped", "shipped aux defaults (in-sample)"), ("shipped_bias", "shipped bias defaults (in-sample)"),
            ("hindsight", "family best on this cell (hindsight, not a forecast)"), ("uniform", "constant 1/E"))
    print("| run | H | phase | pairs | SW_Avg best on this run (havg_mae_pp) | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|---|---|---|---|" + "---|" * len(cols))
    for (label, H, ph), c in cells.items():
        vals = " | ".join(f"{c[k]:.2f}" if k in c else "" for k, _ in cols)
        print(f"| {label} | {H} | {ph} | {c['pairs']} | {c['sw'][0]:.4f} ({c['sw'][1]}) | {vals} |")
    print("\nHeld-out fits:\n" + "\n".join(fits))
    print("\nWhole-model verdicts of the default rule:\n" + "\n".join(
        f"{r.name}: {states.detect(r.p).model_verdict}; horizons {list(r.horizons)}" for r in runs.values()))
    print("\nPhase known to a forecaster (why the defaults are not per phase):\n" + "\n".join(causal_phase_check(r) for r in runs.values()))
    print(f"\nshipped aux: {short(s_aux)}\nshipped bias: {short(s_bias)}\nwall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": [{"run": k[0], "H": k[1], "phase": k[2], **v} for k, v in cells.items()],
                                               "aux": s_aux, "bias": s_bias, "provenance": prov}, indent=1))


if __name__ == "__main__":
    main()
