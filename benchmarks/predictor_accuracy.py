"""Private backtest of the predictors against SW_Avg at its best window (tune on one trace, report on another).

Error that counts: MAE over (layer, expert) of the horizon-average proportion (mean load share over
the next H steps) for H in --horizons, averaged over rolling origins inside each phase. Phases:
synthetic traces -> transient = origins before 3 * tau steps; real traces -> moeload.states.detect
boundaries when that module exists, else the first --transient-frac of the trace.
Each family's configuration is chosen on the --tune trace (smallest worst-cell error ratio to the best
SW_Avg over the phase x horizon cells, since the target must hold in every cell) and reported on the --report trace, where SW_Avg gets its best
window per cell (chosen on the report trace itself, i.e. in its favour).

  .venv/bin/python benchmarks/predictor_accuracy.py                     # synthetic seeds 0 (tune) / 1 (report)
  .venv/bin/python benchmarks/predictor_accuracy.py --tune A.moeload --report B.moeload
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _predictor_synth import synthetic_proportions  # noqa: E402

from moeload import predictors  # noqa: E402

SW_WINDOWS = (10, 30, 100, 300, 1000, 3000, 10000)
SA_TREND = ("state_aware", {"threshold": 6.0, "trend": True, "trend_reach": 2000})
GRID = {
    "ema": [{"halflife": h} for h in (50, 150, 500)],
    "kalman": [{"pool": pl} for pl in ("series", "layer")],
    "damped_trend": [{"alpha": a, "beta": b, "phi": 0.999} for a, b in itertools.product((0.003, 0.01, 0.03), (0.0003, 0.001))],
    "state_aware": [{"threshold": t, "trend": tr, "trend_reach": 2000} for t, tr in itertools.product((4.0, 6.0), (False, True))],
    "ridge": [{"train_window": w} for w in (None, 2000, 3000)],
    "combo": [{"members": (("ridge", {"train_window": 2000}), SA_TREND), "weights": (w, 1 - w)} for w in (0.5, 0.75)],
    "arima": [{"max_history": 2000}],
    "lstm": [{}],
}


def load(spec: str) -> tuple[np.ndarray, int, str]:
    """(proportions [T, L, E], first stable step, label)."""
    if spec.startswith("synthetic:"):
        parts = spec.split(":")
        drift = float(parts[2]) if len(parts) > 2 else 0.4
        return synthetic_proportions(12000, 4, 16, seed=int(parts[1]), drift=drift), 4500, spec
    from moeload import open_trace

    p = open_trace(spec).proportions()
    try:
        from moeload import states

        b = states.detect(p).boundaries
        boundary = int(np.median(b[b >= 0])) if (b >= 0).any() else p.shape[0] // 4
    except Exception:  # noqa: BLE001 - states may not exist yet
        boundary = int(p.shape[0] * 0.25)
    return p, boundary, spec


def origins(T: int, boundary: int, H: int, n: int) -> dict[str, np.ndarray]:
    lo = 200
    out = {}
    out["transient"] = np.unique(np.linspace(lo, max(lo, boundary - 1), n).astype(int))
    out["stable"] = np.unique(np.linspace(boundary, T - H, n).astype(int))
    return {k: v[v + H <= T] for k, v in out.items()}


def errors(p: np.ndarray, boundary: int, name: str, hyper: dict, horizons, n_origins: int) -> dict:
    """{(phase, H): (horizon-average MAE, per-step MAE)} averaged over origins."""
    res = {}
    for H in horizons:
        for phase, ts in origins(p.shape[0], boundary, H, n_origins).items():
            ha, ps = [], []
            for t in ts:
                f = predictors.get(name, **hyper).fit(p[:t]).predict(H)
                truth = p[t : t + H]  # steps without tokens (NaN rows) are left out of the truth
                ha.append(np.nanmean(np.abs(f.mean(0) - np.nanmean(truth, axis=0))))
                ps.append(np.nanmean(np.abs(f - truth)))
            res[(phase, H)] = (float(np.mean(ha)), float(np.mean(ps)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", default="synthetic:0")
    ap.add_argument("--report", default="synthetic:1")
    ap.add_argument("--horizons", default="1000,2000")
    ap.add_argument("--origins", type=int, default=6)
    ap.add_argument("--families", default=",".join(GRID))
    args = ap.parse_args()
    horizons = [int(h) for h in args.horizons.split(",")]
    fams = args.families.split(",")
    tune, report = load(args.tune), load(args.report)
    print(f"tune {tune[2]} {tune[0].shape} boundary {tune[1]}; report {report[2]} {report[0].shape} boundary {report[1]}")

    def sw_best(tr):
        per = {w: errors(tr[0], tr[1], "sw_avg", {"window": w}, horizons, args.origins) for w in SW_WINDOWS}
        cells = per[SW_WINDOWS[0]].keys()
        return {c: min((per[w][c][0], w, per[w][c][1]) for w in SW_WINDOWS) for c in cells}

    sw_tune, sw_rep = sw_best(tune), sw_best(report)
    cells = sorted(sw_rep)
    print("SW_Avg best (report):", {f"{c[0]}@{c[1]}": (round(v[0] * 1e4, 2), v[1]) for c, v in sw_rep.items()})
    rows = []
    for fam in fams:
        t0 = time.time()
        scored = []
        for hyper in GRID[fam]:
            e = errors(tune[0], tune[1], fam, hyper, horizons, args.origins)
            scored.append((max(e[c][0] / sw_tune[c][0] for c in cells), hyper))  # worst cell: the target is every cell
        best = min(scored, key=lambda s: s[0])[1]
        e = errors(report[0], report[1], fam, best, horizons, args.origins)
        rows.append((fam, best, e))
        print(f"{fam:13s} {best} ({time.time() - t0:.0f}s)", flush=True)
    print("\n| predictor (tuned on %s) | " % tune[2] + " | ".join(f"{c[0]} H={c[1]}" for c in cells) + " |")
    print("|---|" + "---|" * len(cells))
    print("| sw_avg best window | " + " | ".join(f"{sw_rep[c][0] * 1e4:.2f} (w={sw_rep[c][1]})" for c in cells) + " |")
    for fam, best, e in rows:
        print(f"| {fam} | " + " | ".join(f"{e[c][0] * 1e4:.2f} ({100 * (1 - e[c][0] / sw_rep[c][0]):+.0f}%)" for c in cells) + " |")
    print("\nhorizon-average MAE x1e4 (lower is better); (+x%) = error reduction vs best SW_Avg on the report trace")
    print("per-step MAE x1e4: sw_best " + ", ".join(f"{sw_rep[c][2] * 1e4:.1f}" for c in cells) + "; " +
          "; ".join(f"{fam} " + ", ".join(f"{e[c][1] * 1e4:.1f}" for c in cells) for fam, _, e in rows))


if __name__ == "__main__":
    main()
