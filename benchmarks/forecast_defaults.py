"""Fit the shipped defaults of `mean_revert` across runs and report them on held-out runs.

Error = havg_mae_pp of moeload.evaluation (100 x mean over experts of |forecast mean share - realised
mean share over the next H steps|), per layer, averaged over the (origin, layer) pairs of a phase;
phase = moeload.states window label of the layer at the step before the origin (backtest's default).
Runs of >= 1,250 steps: H = 1,000 and 2,000 where origin + H fits, origins every 125 steps from 250;
shorter runs: H = 100, origins every 25 steps from 100. Baseline: SW_Avg, windows 25 ... 3,200,
sliding or flat, the best per (run, H, phase) cell chosen on that run itself (in its favour).

Fit: a grid over (window, rho, shrink, target); the score of a setting on a set of runs is the mean
over runs of the mean over that run's (H, phase) cells of error / SW_Avg(best). Held out: for every
aux-loss run R, the setting fit on the other aux-loss runs is reported on R (via evaluation.backtest).
Shipped: the setting fit on all aux-loss runs (regime "aux") and on the expert-bias run (regime
"bias"; one run only, so its own numbers are in-sample); `--write` puts both into
moeload/predictors/_defaults.py. For the bias run a held-out check across layers is printed too
(fit on even layers, report on odd ones and vice versa).

  .venv/bin/python benchmarks/forecast_defaults.py [--write] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import pprint
import time
from pathlib import Path

import numpy as np

from moeload import open_trace, states
from moeload.evaluation import backtest
from moeload.predictors._windows import cumsum0, window_mean

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name: (trace, regime)
    "gpt3-small-moe-s0": ("experiments/traces/gpt3-small-moe-s0.moeload", "aux"),
    "gpt3-small-moe-s1": ("experiments/traces/gpt3-small-moe-s1.moeload", "aux"),
    "gpt3-medium-moe-s0": ("experiments/traces/gpt3-medium-moe-s0.moeload", "aux"),
    "gpt3-medium-moe-s1": ("experiments/traces/gpt3-medium-moe-s1.moeload", "aux"),
    "demo": ("notebooks/data/demo.moeload", "aux"),
    "gpt3-small-moe-bias-s0": ("experiments/traces/gpt3-small-moe-bias-s0.moeload", "bias"),
}
PHASES = ("transient", "stable")
SW = [{"window": w, "slide": s} for w, s in itertools.product((25, 50, 100, 200, 400, 800, 1600, 3200), (True, False))]
WINDOWS = (25, 50, 100, 200, 400)
SHRINK = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
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
        self.c, self.c2 = cumsum0(self.p), cumsum0(self.p * self.p)

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

    def grid(self, layers: np.ndarray | None = None) -> dict:
        """{(H, phase): errors [n_settings]} of every grid setting, by the closed form of the horizon average."""
        L = self.p.shape[1]
        lay = np.arange(L) if layers is None else np.asarray(layers)
        out = {}
        for H in self.horizons:
            o = self.org[H]
            st = self.labels[o - 1][:, lay]  # [n, L']
            y = window_mean(self.c, o + H, H)[:, lay]  # [n, L', E]
            errs = []
            for w, target in itertools.product(WINDOWS, TARGETS):
                n = np.minimum(o, w)[:, None]
                m = window_mean(self.c, o, w)[:, lay]
                var = np.maximum(window_mean(self.c2, o, w)[:, lay] - m * m, 0).mean(-1) * n / np.maximum(n - 1, 1)
                t = np.full_like(m, 1.0 / m.shape[-1]) if target == "uniform" else window_mean(self.c, o, LONG_WINDOW)[:, lay]
                disp = ((m - t) ** 2).mean(-1)
                ratio = np.divide(var / n, disp, out=np.zeros_like(disp), where=disp > 0)
                for k in SHRINK:
                    s = np.clip(1 - k * ratio, 0, 1)[..., None]
                    for hl in HALFLIFE:
                        r = rho_of(hl)
                        g = 1.0 if r == 1.0 else r * (1 - r**H) / ((1 - r) * H)
                        errs.append(100 * np.abs(t + (m - t) * s * g - y).mean(-1))  # [n, L']
            e = np.stack(errs)  # [n_settings, n, L']
            for ph in PHASES:
                sel = st == (ph == "stable")
                if sel.any():
                    out[(H, ph)] = e[:, sel].mean(axis=1)
        return out


SETTINGS = [{"window": w, "target": t, "shrink": k, "rho": rho_of(hl), "halflife": hl}
            for w, t in itertools.product(WINDOWS, TARGETS) for k in SHRINK for hl in HALFLIFE]


def fit(scores: list[dict], sws: list[dict]) -> dict:
    """The setting with the smallest mean over runs of mean over cells of error / SW_Avg(best)."""
    per_run = [np.mean([g[c] / sw[c][0] for c in g], axis=0) for g, sw in zip(scores, sws)]
    i = int(np.argmin(np.mean(per_run, axis=0)))
    return SETTINGS[i]


def params(setting: dict) -> dict:
    return {k: setting[k] for k in ("window", "rho", "shrink", "target")}


def report(run: Run, setting: dict, sw: dict, layers: np.ndarray | None = None, regime: str | None = None) -> dict:
    """{(H, phase): (error, ratio, pairs)} of mean_revert with `setting` (or the shipped `regime` defaults)."""
    spec = ("mean_revert", params(setting) | {"long_window": LONG_WINDOW}) if regime is None else ("mean_revert", {"regime": regime})
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
    return f"w={s['window']}, pull half-life {hl}, shrink={s['shrink']}, target={s['target']}"


def write_defaults(aux: dict, bias: dict, prov: dict) -> None:
    text = (
        '"""Shipped default parameters of `mean_revert`, fit across runs (written by benchmarks/forecast_defaults.py --write)."""\n\n'
        f"MEAN_REVERT = {pprint.pformat({'aux': params(aux), 'bias': params(bias)}, sort_dicts=False, width=110)}\n"
        f"PROVENANCE = {pprint.pformat(prov, sort_dicts=False, width=110)}\n"
    )
    (ROOT / "moeload/predictors/_defaults.py").write_text(text)


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
    rows = []  # (run, H, phase, SW best, SW label, error, ratio, pairs, fit on, setting)

    def add(name: str, res: dict, fit_on: str, setting_label: str) -> None:
        for (H, ph), (e, ratio, n) in sorted(res.items(), key=lambda kv: (kv[0][0], PHASES.index(kv[0][1]))):
            rows.append({"run": name, "H": H, "phase": ph, "sw_best": sw[name][(H, ph)][0], "sw_label": sw[name][(H, ph)][1],
                         "error": e, "ratio": ratio, "pairs": n, "fit_on": fit_on, "setting": setting_label})

    for name in aux:  # held out: fit on the other aux-loss runs
        others = [n for n in aux if n != name]
        s = fit([grid[n] for n in others], [sw[n] for n in others])
        add(name, report(runs[name], s, sw[name]), "held out: " + ", ".join(others), short(s))
    s_aux = fit([grid[n] for n in aux], [sw[n] for n in aux])
    bias_runs = [n for n, r in runs.items() if r.regime == "bias"]
    s_bias = fit([grid[n] for n in bias_runs], [sw[n] for n in bias_runs])
    for name in bias_runs:
        add(name, report(runs[name], s_aux, sw[name]), "held out: aux-loss defaults (all aux runs)", short(s_aux))
        add(name, report(runs[name], s_bias, sw[name]), "in-sample: bias defaults fit on this run", short(s_bias))
        r = runs[name]
        L = r.p.shape[1]
        for fit_l, test_l in ((np.arange(0, L, 2), np.arange(1, L, 2)), (np.arange(1, L, 2), np.arange(0, L, 2))):
            sw_t = r.sw_best(test_l)
            s = fit([r.grid(fit_l)], [r.sw_best(fit_l)])
            res = report(r, s, sw_t, layers=test_l)
            for (H, ph), (e, ratio, n) in sorted(res.items(), key=lambda kv: PHASES.index(kv[0][1])):
                rows.append({"run": f"{name} layers {list(test_l)}", "H": H, "phase": ph, "sw_best": sw_t[(H, ph)][0],
                             "sw_label": sw_t[(H, ph)][1], "error": e, "ratio": ratio, "pairs": n,
                             "fit_on": f"held out: layers {list(fit_l)} of this run", "setting": short(s)})
    for name in aux:  # shipped aux defaults, in-sample on every aux run
        add(name, report(runs[name], s_aux, sw[name]), "in-sample: shipped aux defaults", short(s_aux))
    prov = {
        "aux": f"fit by benchmarks/forecast_defaults.py on {', '.join(aux)} ({short(s_aux)}; pull half-life {s_aux['halflife']})",
        "bias": f"fit by benchmarks/forecast_defaults.py on {', '.join(bias_runs)} only ({short(s_bias)})",
    }
    if args.write:
        write_defaults(s_aux, s_bias, prov)
    print("| run | H | phase | SW_Avg best (on this run) | mean_revert | ratio | pairs | fit on | setting |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['H']} | {r['phase']} | {r['sw_best']:.4f} ({r['sw_label']}) | {r['error']:.4f} | "
              f"**{r['ratio']:.2f}** | {r['pairs']} | {r['fit_on']} | {r['setting']} |")
    print(f"\nshipped: aux = {params(s_aux)}\n         bias = {params(s_bias)}")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "aux": s_aux, "bias": s_bias, "provenance": prov}, indent=1))


if __name__ == "__main__":
    main()
