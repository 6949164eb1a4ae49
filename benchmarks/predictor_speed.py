"""Fit + forecast time of the predictors at 12 x 128 and 58 x 256 (DeepSeek-V3 scale) experts.

ARIMA(5,1,5): the batched engine is timed on all L*E series; the statsmodels loop (the reference,
one series at a time) is timed on a random subsample of --sm-series series and extrapolated
linearly to all L*E series (stated as such in the table). Both run single-threaded BLAS, as the
predictor does. The same subsample gives the agreement of the two engines: |difference of the
H-step horizon-average forecast| and max |difference| over the H steps, in units of the series'
step-to-step noise sd(p_t - p_{t-1}). All numbers come from one run on this machine and are CPU
seconds of this process (time.process_time), so that other jobs on a shared machine do not inflate them.

  .venv/bin/python benchmarks/predictor_speed.py [--steps 2000 --horizon 1000 --sm-series 8]

Writes docs/figures/predictor_speed.md and docs/figures/predictor_speed.png and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _predictor_synth import synthetic_proportions  # noqa: E402

from moeload import predictors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALES = [(12, 128), (58, 256)]
OTHERS = ["sw_avg", "ema", "kalman", "damped_trend", "state_aware", "ridge", "lstm"]


def timed(name: str, p: np.ndarray, horizon: int, **hyper) -> tuple[float, np.ndarray]:
    t0 = time.process_time()
    f = predictors.get(name, **hyper).fit(p).predict(horizon)
    return time.process_time() - t0, f


def statsmodels_subsample(p: np.ndarray, horizon: int, n: int, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds per series of the statsmodels engine, its raw forecasts [n, H] and the flat indices [n]."""
    from threadpoolctl import threadpool_limits

    from moeload.predictors.arima import statsmodels_fit

    L, E = p.shape[1:]
    rng = np.random.default_rng(seed)
    idx = rng.choice(L * E, size=min(n, L * E), replace=False)
    flat = p.reshape(p.shape[0], -1)
    out = np.empty((idx.size, horizon))
    t0 = time.process_time()
    with threadpool_limits(limits=1):
        for j, i in enumerate(idx):
            scale = np.diff(flat[:, i]).std()  # as the predictor does
            out[j] = np.asarray(statsmodels_fit(flat[:, i] / scale, (5, 1, 5)).forecast(horizon)) * scale
    return (time.process_time() - t0) / idx.size, out, idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--horizon", type=int, default=1000)
    ap.add_argument("--sm-series", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import scipy.signal  # noqa: F401  (import cost is not fit time)
    import torch  # noqa: F401

    rows, agree, times = [], [], {}
    for L, E in SCALES:
        p = synthetic_proportions(args.steps, L, E, seed=args.seed)
        from moeload.predictors.arima import Arima

        t0 = time.process_time()
        batched = Arima().fit(p)
        raw_b = batched._predict(args.horizon).reshape(args.horizon, -1).T  # [n, H] before projection
        tb = time.process_time() - t0
        per, raw_s, idx = statsmodels_subsample(p, args.horizon, args.sm_series, args.seed)
        sd = np.diff(p.reshape(p.shape[0], -1)[:, idx], axis=0).std(axis=0)
        d_avg = np.abs(raw_b[idx].mean(1) - raw_s.mean(1)) / sd
        d_max = np.abs(raw_b[idx] - raw_s).max(1) / sd
        agree.append((L, E, d_avg, d_max))
        n = L * E
        rows.append((L, E, n, tb, per, per * n, per * n / tb))
        times[(L, E)] = {"arima (batched)": tb, "arima (statsmodels, extrapolated)": per * n}
        for name in OTHERS:
            times[(L, E)][name] = timed(name, p, args.horizon)[0]
        print(f"{L}x{E} done", flush=True)

    lines = [f"ARIMA(5,1,5) fit + {args.horizon}-step forecast on {args.steps} steps of history "
             f"(synthetic proportions, single-threaded BLAS, CPU seconds, one run):", "",
             "| layers x experts | series | batched (s) | statsmodels per series (s) | statsmodels all series (s, extrapolated from "
             f"{args.sm_series}) | speed-up |", "|---|---|---|---|---|---|"]
    for L, E, n, tb, per, tot, ratio in rows:
        lines.append(f"| {L} x {E} | {n} | {tb:.1f} | {per:.2f} | {tot:.0f} | {ratio:.0f}x |")
    lines += ["", "Agreement batched vs statsmodels on the subsample, in units of sd(p_t - p_{t-1}) of each series:", "",
              "| layers x experts | horizon-average: median / max | per-step max over H: median / max |", "|---|---|---|"]
    for L, E, d_avg, d_max in agree:
        lines.append(f"| {L} x {E} | {np.median(d_avg):.3f} / {d_avg.max():.3f} | {np.median(d_max):.3f} / {d_max.max():.3f} |")
    lines += ["", "All predictors, fit + forecast (CPU s, default hyperparameters):", "",
              "| predictor | " + " | ".join(f"{L} x {E}" for L, E in SCALES) + " |", "|---|" + "---|" * len(SCALES)]
    for name in times[SCALES[0]]:
        lines.append(f"| {name} | " + " | ".join(f"{times[s][name]:.2f}" for s in SCALES) + " |")
    table = "\n".join(lines)
    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor_speed.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times[SCALES[0]])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(names))
    for k, s in enumerate(SCALES):
        ax.bar(x + (k - 0.5) * 0.4, [times[s][n] for n in names], width=0.4, label=f"{s[0]} x {s[1]}")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("fit + forecast (s)")
    ax.set_title(f"{args.steps}-step history, {args.horizon}-step forecast (statsmodels extrapolated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "predictor_speed.png", dpi=120)


if __name__ == "__main__":
    main()
