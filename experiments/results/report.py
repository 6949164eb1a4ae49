"""results.md and results.json from the computed results of make_results.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import analysis as A
import numpy as np
import pandas as pd

from moeload import evaluation
from moeload.evaluation import METRICS


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:.{nd}g}" if isinstance(v, (float, np.floating)) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _runs(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in results.items():
        for seed, run in r["runs"].items():
            s = run.summary
            ov = s.get("overhead", {})
            blocks = " ".join(f"{t:.0f}/{u:.0f}" for t, u in zip(ov.get("traced_ms", []), ov.get("untraced_ms", [])))
            rows.append([name, str(seed), f"{len(run.steps):,}",
                         _f(s.get("steps_per_s")), _f(s.get("train_s"), 4), f"{_f(s.get('loss_first'))} → {_f(s.get('loss_last'))}",
                         f"{s.get('gpu', '?')} × {s.get('world_size', '?')}",
                         (f"{ov['overhead_pct']:+.2f} % ({blocks})" if blocks else "not measured")])
    return _table(["setup", "seed", "steps used", "steps/s", "train s", "LM loss first → last", "GPUs (EP)",
                   "tracer overhead (traced/untraced ms per step, ABBA blocks of 50)"], rows)


def _phases(name: str, r: dict[str, Any]) -> list[str]:
    L = r["runs"][0].p.shape[1]
    rows = []
    for seed, ph in r["phases"].items():
        for method, res in ph.items():
            rows.append([str(seed), method + (" (default)" if method == "window" else ""),
                         *[f"{b:,}" if b >= 0 else "none" for b in res.boundaries],
                         f"{res.model_boundary:,}" if res.model_boundary >= 0 else "none"])
    out = [f"Paper's stable point: {A.PAPER_STABLE[name]}. Ours: first step of each layer's final stable phase "
           f"(window rule w = 100, range, reference 'late', c = 1.5; PELT as a cross-check), out of "
           f"{len(r['runs'][0].steps):,} / {len(r['runs'][1].steps):,} steps.", ""]
    return out + _table(["seed", "rule", *[f"L{i}" for i in range(L)], "model"], rows)


def _fluct(r: dict[str, Any], w: int = 100) -> list[str]:
    rows, early = [], {}
    for seed, d in r["fluct"].items():
        d = d[d["window"] == w]
        early[seed] = d["range_early"].to_numpy()
        for x in d.itertuples(index=False):
            rows.append([str(seed), str(x.layer), _f(x.range_early), _f(x.range_late), _f(x.range_early / x.range_late),
                         _f(x.range_trend), _f(x.var_early), _f(x.var_late), _f(x.var_early / x.var_late)])
    seeds = sorted(early)
    d0 = r["fluct"][seeds[0]]
    d0 = d0[d0["window"] == w].iloc[0]
    out = [f"Rolling window w = {w}; mean over experts of each expert's range (pp of share) and variance "
           f"(pp², ddof = 1); early = steps {d0['early_steps']}, late = steps {d0['late_steps']} (seed {seeds[0]}; first / last 20 % "
           "of the assessable steps; late trend = range over the last 10 % / the 10 % before: < 1 means still falling). "
           "Other windows (10, 200) are in results.json.", ""]
    out += _table(["seed", "layer", "range early", "range late", "early / late", "late trend", "var early", "var late",
                   "early / late"], rows)
    L = len(early[seeds[0]])
    rho = depth_rho(early)
    first = " / ".join(f"{early[s][0]:.3g}" for s in seeds)
    last = " / ".join(f"{early[s][-1]:.3g}" for s in seeds)
    out.append(f"Shallow vs deep (early range): layer 0 {first} pp vs layer {L - 1} {last} pp (seed "
               f"{' / '.join(str(s) for s in seeds)}); Spearman correlation of early range with depth "
               f"{' / '.join(f'{rho[s]:+.2f}' for s in seeds)} (negative = shallow layers fluctuate more, as in the paper).")
    return out + [""]


def depth_rho(per_layer: dict[int, np.ndarray]) -> dict[int, float]:
    """Seed -> Spearman correlation of a per-layer measure ([L], shallow to deep) with layer depth."""
    return {s: float(pd.Series(v).corr(pd.Series(np.arange(len(v))), method="spearman")) for s, v in per_layer.items()}


def _mean_seeds(summ: dict[int, pd.DataFrame]) -> pd.DataFrame:
    d = pd.concat([s.assign(seed=k) for k, s in summ.items()])
    cols = [*METRICS, "havg_mae_pp_vs_sw_avg", "n_origins"]
    return d.groupby(["predictor", "horizon", "phase"])[cols].mean().reset_index()


def _order(names: list[str]) -> list[str]:
    first = ["sw_avg", "last", "ema", "arima", "lstm"]
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def _forecast(name: str, r: dict[str, Any]) -> list[str]:
    setup: A.Setup = r["setup"]
    summ = r["summary"]
    org = {s: r["rows"][s].attrs["origins"] for s in summ}
    used = {s: {int(h): int(summ[s][(summ[s]["predictor"] == "sw_avg") & (summ[s]["horizon"] == h)
                                    & (summ[s]["phase"] == "all")]["n_origins"].iloc[0]) for h in setup.horizons} for s in summ}
    out = [f"Rolling origin (`evaluation.backtest`, incremental), horizons {', '.join(f'{h:,}' for h in setup.horizons)}; "
           f"origins: step indices {org[0][0]}..{org[0][-1]} ({len(org[0])} / {len(org[1])} for seed 0 / 1; per horizon "
           f"used: " + "; ".join(f"H {h:,}: {used[0][h]} / {used[1][h]}" for h in setup.horizons) + "). " + setup.note,
           f"Phase of a row = window-rule label of its layer at step o − 1. SW_Avg: window chosen per horizon and "
           f"phase on the OTHER seed from {list(setup.sw_windows)} (lowest havg_mae_pp); chosen windows "
           + "; ".join(f"tested on s{s}: " + ", ".join(f"H{h}/{ph[0]} {w}" for (h, ph), w in sorted(c.items()) if ph != "all")
                       for s, c in r["choice"].items())
           + f". LSTM ({setup.lstm}) trained on the other seed's whole run, tested on this one. ARIMA "
           f"{setup.arima.get('order')} engine `{setup.arima.get('engine')}` (batched CSS; statsmodels is the reference "
           f"engine), max_history {setup.arima.get('max_history', 'all')}. blend: weights from `learn_blend` on the other "
           f"seed per horizon, by phase. kalman is refitted at every origin (its `update` keeps the gains estimated at "
           f"the first origin); the others are fitted once and updated. Other hyperparameters: registry defaults.", ""]
    names = _order(sorted(set(summ[0]["predictor"])))
    key = {s: d.set_index(["predictor", "horizon", "phase"]) for s, d in summ.items()}
    out.append("**havg_mae_pp (headline metric), tested on seed 0 / seed 1** (percentage points of share; lower is better)")
    out.append("")
    hdr = ["predictor"] + [f"H {h:,} {ph}" for h in setup.horizons for ph in ("stable", "transient", "all")]
    rows = []
    for n in names:
        cells = []
        for h in setup.horizons:
            for ph in ("stable", "transient", "all"):
                v = [key[s]["havg_mae_pp"].get((n, h, ph), np.nan) for s in (0, 1)]
                cells.append(f"{_f(v[0])} / {_f(v[1])}")
        rows.append([n, *cells])
    out += _table(hdr, rows)
    m = _mean_seeds(summ).set_index(["predictor", "horizon", "phase"])
    for h in setup.headline:
        out.append(f"**All metrics at H = {h:,}, mean of the two test seeds** (ratio = havg_mae_pp / SW_Avg's)")
        out.append("")
        rows = []
        for ph in ("stable", "transient", "all"):
            for n in names:
                if (n, h, ph) in m.index:
                    x = m.loc[(n, h, ph)]
                    rows.append([n, ph, *[_f(x[k]) for k in METRICS], _f(x["havg_mae_pp_vs_sw_avg"]), _f(x["n_origins"])])
        out += _table(["predictor", "phase", *METRICS, "ratio", "origins"], rows)
    out += _paper(name, setup, m)
    out.append("<details><summary>Full per-seed tables (evaluation.format_table)</summary>")
    out.append("")
    for s in (0, 1):
        out += [f"Tested on seed {s}:", "", "```", evaluation.format_table(summ[s]), "```", ""]
    out += ["</details>", ""]
    return out


def _paper(name: str, setup: A.Setup, m: pd.DataFrame, seeds_text: str = "mean of the two test seeds") -> list[str]:
    rows = []
    for h, d in A.PAPER_ERRORS.get(name, {}).items():
        ours = h if h in setup.horizons else max(setup.horizons)
        for pred, v in d.items():
            x = m.loc[(pred, ours, "all")] if (pred, ours, "all") in m.index else None
            rows.append([pred, f"{h:,}", v + " %", f"{ours:,}",
                         *([_f(x["havg_mae_pp"]), _f(x["mae_pp"]), _f(100 * x["mre"])] if x is not None else ["–"] * 3)])
    if not rows:
        return []
    out = ["**Next to the paper** (the paper gives no error formula; ours are defined in docs/metrics.md: "
           "havg_mae_pp and mae_pp in percentage points of share, mre as a percentage; all phases, " + seeds_text
           + ("" if all(h in setup.horizons for h in A.PAPER_ERRORS[name]) else
                           f"; our runs are too short for the paper's horizon, so our longest horizon {max(setup.horizons)} is shown")
           + ")", ""]
    return out + _table(["predictor", "paper horizon", "paper error", "our horizon", "havg_mae_pp", "mae_pp", "mre %"], rows)


def _headline(results: dict[str, Any]) -> list[str]:
    out = ["Question (forecasts issue): does any predictor beat SW_Avg at its best window (chosen on the other seed) "
           "by ≥ 20 % on havg_mae_pp (ratio ≤ 0.80) at both headline horizons, in both phases, on both test seeds? "
           "Cells: ratio to SW_Avg per horizon / phase / test seed; `worst` = the largest.", ""]
    for name, r in results.items():
        h = r["headline"]
        cols = [c for c in h.columns if c not in ("worst", "beats")]
        out.append(f"**{name}** (headline horizons {', '.join(f'{x:,}' for x in r['setup'].headline)})")
        out.append("")
        hdr = ["predictor", *cols, "worst", "beats by ≥ 20 %"]
        rows = [[p, *[_f(row[c]) for c in cols], _f(row["worst"]), "yes" if row["beats"] else "no"]
                for p, row in h.iterrows()]
        out += _table(hdr, rows)
        winners = list(h.index[h["beats"]])
        best = h.index[0]
        out.append(f"Answer for {name}: " + (f"yes: {', '.join(winners)}." if winners else
                   f"no. Closest: {best} (worst-cell ratio {h['worst'].iloc[0]:.3g}).") + "")
        out.append("")
    return out


def write_report(results: dict[str, Any], out_dir: Path, seconds: float) -> tuple[dict[str, Any], str]:
    """(results.json content, results.md text)."""
    md = ["# Paper reproduction: expert load, phases and forecasts on real MoE training traces (DeepSpeed-MoE runs and one-GPU train_long.py runs)", "",
          f"Generated by `.venv/bin/python experiments/results/make_results.py` in {seconds:.0f} s from "
          "`experiments/traces/` (do not edit by hand). Paper: \"Prediction Is All MoE Needs\" (arXiv 2404.16914). "
          "Setups, scaling and GPU commands: `experiments/README.md`; metric and rule definitions: `docs/metrics.md`.", "",
          "## Runs", ""]
    md += _runs(results)
    for r in results.values():
        for run in r["runs"].values():
            md += [f"- {n}" for n in run.notes]
    md.append("")
    for name, r in results.items():
        L, E = r["runs"][0].p.shape[1:]
        md += [f"## {name} ({L} MoE layers × {E} experts)", "", "### Phase boundaries", ""]
        md += _phases(name, r)
        md += ["### Fluctuation early vs late, shallow vs deep", ""]
        md += _fluct(r)
        md += ["### Forecast errors", ""]
        md += _forecast(name, r)
        md += ["### Figures", ""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    md += ["## Headline check", ""] + _headline(results)
    js = {name: {
        "runs": {s: {"steps_used": len(run.steps), "summary": run.summary, "notes": run.notes} for s, run in r["runs"].items()},
        "phases": {s: {m: {"boundaries": res.boundaries.tolist(), "model_boundary": int(res.model_boundary),
                           "params": res.params} for m, res in ph.items()} for s, ph in r["phases"].items()},
        "fluctuation": {s: d.to_dict(orient="records") for s, d in r["fluct"].items()},
        "setup": {k: v for k, v in r["setup"].__dict__.items()},
        "sw_avg_windows": {s: {f"{h}/{ph}": w for (h, ph), w in c.items()} for s, c in r["choice"].items()},
        "summary": {s: d.to_dict(orient="records") for s, d in r["summary"].items()},
        "headline": r["headline"].reset_index().to_dict(orient="records"),
        "figures": r["figures"],
    } for name, r in results.items()}
    return js, "\n".join(md) + "\n"
