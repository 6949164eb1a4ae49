"""Backtest of the predictors against SW_Avg at its best window: tune on one run, report on another.

Protocol (the forecasts issue). Error = havg_mae_pp of moeload.evaluation (100 x MAE over experts of
the mean share over the next H steps), per layer, averaged over (origin, layer) pairs of a phase.
Origins every --every steps from --min-history on, where origin + H <= steps. Phase of a pair =
moeload.states window label of that layer at the step before the origin (evaluation.backtest's
default). For each direction A -> B of --traces: every family's configuration (a small grid; for
`blend` the weights, learned by ridge on origins of A) is chosen per horizon on A (smallest
worst-phase error ratio to SW_Avg's best window on A, since the target must hold in both phases)
and reported on B. SW_Avg gets its best window and sliding mode per (horizon, phase) cell chosen
on B itself, i.e. in its favour. Per-step errors (mae_pp) are reported but nothing is tuned on them.

  .venv/bin/python benchmarks/predictor_accuracy.py --traces experiments/traces/gpt3-small-moe-s0.moeload,experiments/traces/gpt3-small-moe-s1.moeload
  .venv/bin/python benchmarks/predictor_accuracy.py --traces synthetic:0,synthetic:1          # synthetic runs
  options: --horizons 1000,2000 --every 125 --min-history 250 --families ... --json OUT --figure PNG
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _predictor_synth import synthetic_proportions  # noqa: E402

from moeload.evaluation import backtest  # noqa: E402
from moeload.predictors.blend import learn_blend  # noqa: E402

SW = [{"window": w, "slide": s} for w, s in itertools.product((25, 50, 100, 200, 400, 800, 1600, 3200), (True, False))]
SA_TREND = ("state_aware", {"threshold": 6.0, "trend": True, "trend_reach": 2000})
GRID = {
    "ema": [{"halflife": h} for h in (25, 50, 100, 200)],
    "kalman": [{"pool": "layer", "block": b} for b in (1, 25, 50)],
    "damped_trend": [{"alpha": a, "beta": b, "phi": 0.999} for a, b in itertools.product((0.005, 0.01, 0.03), (0.0003, 0.001))],
    "state_aware": [{"threshold": t, "trend": tr, "trend_reach": 2000} for t, tr in itertools.product((4.0, 6.0), (False, True))],
    "ridge": [{"train_window": w} for w in (None, 1000)],
    "combo": [{"members": (("ridge", {"train_window": 2000}), SA_TREND), "weights": (w, 1 - w)} for w in (0.5, 0.75)],
    "blend": [{"uniform_term": u, "by_phase": b} for u, b in itertools.product((False, True), (False, True))],  # weights learned on the tuning run
    "arima": [{"max_history": 2000}],
    "lstm": [{}],
}
DEFAULT_FAMILIES = "ema,kalman,damped_trend,state_aware,ridge,combo,blend"


def load(spec: str) -> np.ndarray:
    """Proportions [T, L, E] of a trace path or `synthetic:SEED[:DRIFT]`."""
    if spec.startswith("synthetic:"):
        parts = spec.split(":")
        return synthetic_proportions(12000, 4, 16, seed=int(parts[1]), drift=float(parts[2]) if len(parts) > 2 else 0.4)
    from moeload import open_trace

    return open_trace(spec).proportions()


def cells(p: np.ndarray, spec, H: int, org: np.ndarray) -> dict[str, tuple[float, float, int]]:
    """{phase: (mean havg_mae_pp, mean mae_pp, n pairs)} of one predictor spec at horizon H."""
    o = org[org + H <= p.shape[0]]
    df = backtest(p, [spec], horizons=[H], origins=o)
    return {ph: (float(g["havg_mae_pp"].mean()), float(g["mae_pp"].mean()), len(g)) for ph, g in df.groupby("phase")}


def peek(p: np.ndarray, H: int, org: np.ndarray, k: int = 100) -> dict:
    """Bounds, not predictors: forecasts that see k steps past the origin (mean of p[o - k : o + k] and of
    p[o : o + k]). What they miss is drift that happens later inside the horizon. Keys "peek_centred", "peek_next"."""
    from moeload import states

    lab = states.detect(p).labels  # [S, L], phase at step o - 1 as in evaluation.backtest
    out = {}
    for name, lo, hi in (("peek_centred", -k, k), ("peek_next", 0, k)):
        acc: dict[str, list] = {}
        for o in org:
            err = 100 * np.nanmean(np.abs(np.nanmean(p[o + lo : o + hi], 0) - np.nanmean(p[o : o + H], 0)), axis=1)  # [L]
            for li, st in enumerate(lab[o - 1]):
                acc.setdefault("stable" if st else "transient", []).append(err[li])
        out[name] = {"spec": f"{name} k={k}", **{ph: (float(np.mean(v)), float("nan"), len(v)) for ph, v in acc.items()}}
    # a reference, not a bound: every expert of a layer at 1 / E_l (perfect balance), which needs no history
    acc = {}
    n_exist = np.maximum((~np.isnan(p)).any(axis=0).sum(axis=1), 1)  # [L]
    for o in org:
        exists = (~np.isnan(p[o : o + H])).any(axis=0)  # [L, E]
        err = 100 * np.nanmean(np.where(exists, np.abs(1.0 / n_exist[:, None] - np.nanmean(p[o : o + H], 0)), np.nan), axis=1)
        for li, st in enumerate(lab[o - 1]):
            acc.setdefault("stable" if st else "transient", []).append(err[li])
    out["uniform"] = {"spec": "uniform", **{ph: (float(np.mean(v)), float("nan"), len(v)) for ph, v in acc.items()}}
    return out


def diagnose(p: np.ndarray, label: str, block: int = 100) -> str:
    """How predictable the drift is: rms change of `block`-step means over lags, the rms a
    change would have if steps were independent, and corr(past change, future change)."""
    n = p.shape[0] // block
    b = np.nanmean(p[: n * block].reshape(n, block, *p.shape[1:]), axis=1)  # [n, L, E]
    lags = [k for k in (1, 2, 5, 10, 20) if k < n]
    rms = [1e4 * float(np.sqrt(np.nanmean((b[k:] - b[:-k]) ** 2))) for k in lags]
    white = 1e4 * float(np.sqrt(2 * np.nanmean(np.nanvar(np.diff(p, axis=0), axis=0) / 2) / block))
    # past b[t-1] - b[t-3], future b[t+1] - b[t]: no block shared, so block noise cannot correlate them
    past = (b[2:-2] - b[:-4]).ravel() if n > 4 else np.zeros(0)
    fut = (b[4:] - b[3:-1]).ravel() if n > 4 else np.zeros(0)
    ok = np.isfinite(past) & np.isfinite(fut)
    corr = float(np.corrcoef(past[ok], fut[ok])[0, 1]) if ok.sum() > 2 else float("nan")
    return (f"{label}: rms change of {block}-step means x1e4 at lags {[k * block for k in lags]}: "
            f"{', '.join(f'{v:.1f}' for v in rms)} (independent steps would give {white:.1f} at every lag); "
            f"corr(b[t-1] - b[t-3], b[t+1] - b[t]) of those means b = {corr:+.2f}")


def configs(fam: str, tune: np.ndarray, H: int, args) -> list[tuple[str, dict]]:
    if fam != "blend":
        return [(fam, h) for h in GRID[fam]]
    return [("blend", learn_blend(tune, H, **h, min_history=100, stride=25)) for h in GRID[fam]]


def direction(tune: np.ndarray, report: np.ndarray, args, fams: list[str]) -> dict:
    """Results of tuning on `tune` and reporting on `report`: {H: {"sw": ..., name: ...}}."""
    out = {}
    for H in args.horizons:
        org = np.arange(args.min_history, max(tune.shape[0], report.shape[0]), args.every)
        sw_t = {c: min(v) for c, v in _collect(tune, [("sw_avg", s) for s in SW], H, org).items()}
        sw_r = _collect(report, [("sw_avg", s) for s in SW], H, org)
        res = {"sw": {ph: min(v) for ph, v in sw_r.items()}}
        res.update(peek(report, H, org[org + H <= report.shape[0]], k=min(100, max(1, H // 4))))
        for fam in fams:
            t0 = time.time()
            cand = configs(fam, tune, H, args)
            scored = []
            for spec in cand:
                e = cells(tune, spec, H, org)
                scored.append((max(e[ph][0] / sw_t[ph][0] for ph in e), spec))
            spec = min(scored, key=lambda s: s[0])[1]
            e = cells(report, spec, H, org)
            res[fam] = {"spec": _short(spec), **{ph: v for ph, v in e.items()}}
            print(f"  H={H} {fam:13s} {_short(spec)} ({time.time() - t0:.0f}s)", flush=True)
        out[H] = res
    return out


def _collect(p, specs, H, org) -> dict[str, list]:
    """{phase: [(havg, mae, n, spec-label), ...]} for several specs."""
    acc: dict[str, list] = {}
    for spec in specs:
        for ph, v in cells(p, spec, H, org).items():
            acc.setdefault(ph, []).append((*v, _short(spec)))
    return acc


def _short(spec) -> str:
    name, h = spec
    if name == "blend":
        fmt = lambda c: "[" + ", ".join(f"{v:.2f}" for v in c) + "]"  # noqa: E731
        extra = f", coef_transient={fmt(h['coef_transient'])}" if "coef_transient" in h else ""
        return f"blend(uniform_term={h['uniform_term']}, coef={fmt(h['coef'])}{extra})"
    if name == "sw_avg":
        return f"w={h['window']}{'' if h['slide'] else ' flat'}"
    if name == "combo":
        return f"combo(weights={h['weights']})"
    return name + "(" + ", ".join(f"{k}={v}" for k, v in h.items()) + ")"


def table(results: dict, fams: list[str], labels: list[str]) -> str:
    """Markdown: one column per (direction, horizon, phase); cell = havg_mae_pp (change vs best SW_Avg)."""
    cols = [(d, H, ph) for d in results for H in results[d] for ph in ("transient", "stable") if ph in results[d][H]["sw"]]
    head = "| predictor | " + " | ".join(f"{d} H={H} {ph}" for d, H, ph in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    lines.append("| SW_Avg, best window on the report run | " + " | ".join(
        f"{results[d][H]['sw'][ph][0]:.3f} ({results[d][H]['sw'][ph][3]})" for d, H, ph in cols) + " |")
    for fam in [*fams, "uniform", "peek_centred", "peek_next"]:
        row = []
        for d, H, ph in cols:
            e, b = results[d][H][fam].get(ph), results[d][H]["sw"][ph]
            row.append("-" if e is None else f"{e[0]:.3f} ({100 * (1 - e[0] / b[0]):+.1f}%)")
        bound = {"peek_centred": " (bound: mean of p[o-k : o+k], k = min(100, H/4), sees the future)",
                 "peek_next": " (bound: mean of p[o : o+k], sees the future)",
                 "uniform": " (reference: 1/E for every expert)"}
        lines.append(f"| {fam + bound.get(fam, '')} | " + " | ".join(row) + " |")
    lines.append("| pairs (origin x layer) | " + " | ".join(str(results[d][H]["sw"][ph][2]) for d, H, ph in cols) + " |")
    return "\n".join(lines)


def figure(results: dict, fams: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(d, H, ph) for d in results for H in results[d] for ph in ("transient", "stable") if ph in results[d][H]["sw"]]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cols) + 3), 4.5))
    x = np.arange(len(cols))
    names = [*fams, "uniform", "peek_centred", "peek_next"]
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab10")
    for i, fam in enumerate(names):
        v = [100 * (1 - results[d][H][fam][ph][0] / results[d][H]["sw"][ph][0]) if ph in results[d][H][fam] else np.nan
             for d, H, ph in cols]
        bound = fam.startswith("peek")
        color = "0.75" if bound else ("k" if fam == "uniform" else colors(i % 10))
        ax.bar(x - 0.4 + width * (i + 0.5), np.clip(v, -60, None), width, color=color,
               hatch="//" if fam == "peek_next" else None, edgecolor="0.4" if bound else None,
               label=fam + (" (bound: sees k = min(100, H/4) future steps)" if bound else
                            " (reference: 1/E)" if fam == "uniform" else ""))
    ax.axhline(20, color="k", ls="--", lw=1, label="target +20 %")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{d}\nH={H}\n{ph}" for d, H, ph in cols], fontsize=8)
    ax.set_ylabel("havg_mae_pp reduction vs best SW_Avg (%)\n(bars clipped at -60 %)")
    ax.set_title("Forecast error vs SW_Avg at its best window (tuned on one run, reported on the other)")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", default="synthetic:0,synthetic:1", help="two runs A,B: tune A report B, then B -> A")
    ap.add_argument("--one-way", action="store_true", help="only A -> B")
    ap.add_argument("--horizons", default="1000,2000")
    ap.add_argument("--every", type=int, default=125)
    ap.add_argument("--min-history", type=int, default=250)
    ap.add_argument("--families", default=DEFAULT_FAMILIES)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--figure", default=None, help="write a bar chart (PNG) here")
    args = ap.parse_args()
    args.horizons = [int(h) for h in args.horizons.split(",")]
    fams = args.families.split(",")
    specs = args.traces.split(",")
    runs = [load(s) for s in specs]
    labels = [Path(s).name.removesuffix(".moeload") for s in specs]
    common = 0  # strip the common prefix of the run names ("gpt3-small-moe-s0" -> "s0")
    while common < min(map(len, labels)) - 1 and len({x[common] for x in labels}) == 1:
        common += 1
    common = labels[0][:common].rfind("-") + 1
    labels = [x[common:] for x in labels]
    for r, lab in zip(runs, labels):
        print(diagnose(r, lab), flush=True)
    pairs = [(0, 1)] if args.one_way else [(0, 1), (1, 0)]
    results = {}
    for a, b in pairs:
        name = f"{labels[a]}->{labels[b]}"
        print(f"{name}: tune {runs[a].shape}, report {runs[b].shape}", flush=True)
        results[name] = direction(runs[a], runs[b], args, fams)
    print("\nhavg_mae_pp (percentage points, lower is better); (x%) = error reduction vs SW_Avg at its best window"
          " (window, chosen on the report run per cell)\n")
    print(table(results, fams, labels))
    print("\nper-step mae_pp (not tuned for):")
    for d in results:
        for H in results[d]:
            print(f"  {d} H={H}: " + "; ".join(
                f"{k} " + "/".join(f"{results[d][H][k][ph][1]:.3f}" for ph in ("transient", "stable") if ph in results[d][H][k])
                for k in ["sw", *fams]) + "  (transient/stable)")
    print("\nchosen configurations:")
    for d in results:
        for H in results[d]:
            print(f"  {d} H={H}: " + "; ".join(f"{k}: {results[d][H][k]['spec']}" for k in fams))
    if args.json:
        Path(args.json).write_text(json.dumps({d: {str(H): v for H, v in r.items()} for d, r in results.items()}, indent=1))
    if args.figure:
        figure(results, fams, args.figure)


if __name__ == "__main__":
    main()
