"""Computations behind the paper-reproduction table: runs, phases, fluctuation, backtests.

Used by make_results.py (which writes the table and figures); everything here works on the
committed traces through the public moeload API.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moeload import evaluation, open_trace, predictors, states
from moeload.plots import rolling_fluctuation
from moeload.predictors.base import validate_proportions
from moeload.predictors.lstm import LSTMPredictor

# The paper's (arXiv 2404.16914) reported forecast errors, percent; it gives no formula for them.
PAPER_ERRORS = {
    "gpt3-small-moe": {1000: {"sw_avg": "≈0.25", "arima": "≈0.5", "lstm": "<1"}},
    "gpt3-medium-moe": {1000: {"sw_avg": "≈1.3", "arima": "≈1.4"}, 2000: {"sw_avg": "≈1.7–1.8"}},
}
PAPER_STABLE = {"gpt3-small-moe": "≈5,000 iterations", "gpt3-medium-moe": "no number given for this model"}


@dataclass
class Setup:
    """How one experiment setup is evaluated.

    horizons: forecast horizons (steps); headline: the two horizons of the headline check (the
    longest that fit the trace); origin_spans: (start, stop, every) origin grids, unioned;
    sw_windows: SW_Avg windows to choose from (on the other seed); arima/lstm: hyperparameters.
    """

    name: str
    horizons: tuple[int, ...]
    headline: tuple[int, int]
    origin_spans: tuple[tuple[int, int, int], ...]
    sw_windows: tuple[int, ...]
    arima: dict[str, Any] = field(default_factory=dict)
    lstm: dict[str, Any] = field(default_factory=dict)
    note: str = ""


SETUPS = {
    "gpt3-small-moe": Setup(
        "gpt3-small-moe", horizons=(250, 500, 1000, 2000), headline=(1000, 2000),
        origin_spans=((100, 1000, 50), (1000, 10**9, 250)), sw_windows=(10, 25, 50, 100, 200, 500, 1000),
        arima={"order": (5, 1, 5), "engine": "batched", "max_history": 1000}, lstm={"block": 20, "lookback": 16},
        note="H = 1,000 and 2,000 as in the paper, plus 250 and 500; H = 2,000 uses only origins <= S - 2,000."),
    "gpt3-medium-moe": Setup(
        "gpt3-medium-moe", horizons=(50, 100, 200), headline=(100, 200),
        origin_spans=((100, 10**9, 50),), sw_windows=(10, 25, 50, 100, 200),
        arima={"order": (5, 1, 5), "engine": "batched"}, lstm={"block": 5, "lookback": 16},
        note="600-step runs: the paper's 1,000 / 2,000-step horizons do not fit; 100 and 200 are the longest "
             "with origins in both phases (plus 50). LSTM blocks of 5 steps (20 would leave 30 blocks per run)."),
}


class CrossRunLSTM(LSTMPredictor):
    """The paper's protocol: the LSTM is trained on another run (`train_runs`, [T, L, E] arrays) and
    forecasts the run it is fitted to from that run's own history; `update` keeps the weights."""

    def __init__(self, *, train_runs: tuple = (), block: int = 20, lookback: int = 16, hidden: int = 32,
                 epochs: int = 20, lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(block=block, lookback=lookback, hidden=hidden, epochs=epochs, lr=lr,
                         batch_size=batch_size, seed=seed)
        self.train_runs = train_runs

    def _fit_runs(self, runs: list[np.ndarray]) -> None:
        super()._fit_runs([validate_proportions(r, "train_runs")[0] for r in self.train_runs])


@dataclass
class Run:
    """One traced run, cut to the steps of the run its JSON summary describes.

    counts: [S, L, E] routed counts; p: [S, L, E] proportions; steps: [S]; gpu_map: [L, E]
    expert -> GPU (expert-parallel rank) recorded in the trace; gpu_loads: [S, L, G].
    """

    setup: str
    seed: int
    path: Path
    summary: dict[str, Any]
    counts: np.ndarray
    p: np.ndarray
    steps: np.ndarray
    gpu_map: np.ndarray
    gpu_loads: np.ndarray
    experts: list[int]
    notes: list[str]


def load_run(traces: Path, setup: str, seed: int) -> Run:
    """Read `<traces>/<setup>-s<seed>.moeload` and its `.json` summary; keep the steps the summary counts.

    A trace directory can hold parts of an earlier, killed attempt (the reader keeps, per step, the
    part with the highest sequence number, so steps past the last run's end come from the older run);
    steps beyond the summary's `steps` are therefore dropped, and the note says so.
    """
    path = traces / f"{setup}-s{seed}.moeload"
    t = open_trace(path)
    js = Path(str(path) + ".json")
    summary = json.loads(js.read_text()) if js.exists() else {}
    notes = []
    n = int(summary.get("steps", len(t.steps)))
    sel = t.steps[t.steps < n]
    if len(sel) < len(t.steps):
        sessions = len(t.meta.get("sessions", []))
        notes.append(f"{path.name}: trace holds steps {t.steps[0]}..{t.steps[-1]} from {sessions} writer sessions; "
                     f"its JSON summary counts {n} steps, so steps >= {n} (left by an earlier attempt) are dropped")
    if not js.exists():
        notes.append(f"{path.name}: no JSON summary; all {len(t.steps)} steps used")
    rng = (int(sel[0]), int(sel[-1]) + 1)
    counts = t.counts(steps=rng)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / counts.sum(-1, keepdims=True)
    E = counts.shape[2]
    gmap = np.full((len(t.layers), E), -1, dtype=np.int64)
    for li, row in enumerate(t.manifest.rank_map()):
        gmap[li, : len(row)] = row
    return Run(setup, seed, path, summary, counts, p, np.asarray(sel, dtype=np.int64), gmap,
               t.gpu_loads(steps=rng), list(t.experts_per_layer), notes)


def phases(run: Run) -> dict[str, states.StateResult]:
    """Window rule (docs/metrics.md defaults) and PELT as a cross-check, on the run's counts."""
    return {"window": states.detect(run.counts, steps=run.steps),
            "pelt": states.detect(run.counts, method="pelt", steps=run.steps)}


def fluctuation_table(run: Run, windows: tuple[int, ...] = (10, 100, 200), frac: float = 0.2) -> pd.DataFrame:
    """Per layer and window: mean over experts of the rolling range and variance of each expert's
    share (pp and pp²; the window rule's statistic, `plots.rolling_fluctuation`: sample variance,
    ddof = 1), averaged over the first `frac` of assessable steps (early) and the last `frac` of
    the run (late); `range_trend` = mean range over the last frac / 2 of the run divided by that
    over the frac / 2 before (1 = flat at the end; < 1 = still falling). Returns rows layer,
    window, range_early, range_late, range_trend, var_early, var_late, early_steps, late_steps."""
    S, L, _ = run.p.shape
    rows = []
    for w in windows:
        rng = 100 * rolling_fluctuation(run.p, w, "range", experts=run.experts)  # [S, L], pp
        var = 1e4 * rolling_fluctuation(run.p, w, "var", experts=run.experts)  # [S, L], pp²
        n = max(1, int(frac * S))
        early, late = slice(w - 1, w - 1 + n), slice(S - n, S)
        last, before = slice(S - n // 2, S), slice(S - n, S - n // 2)
        for li in range(L):
            rows.append({"layer": li, "window": w,
                         "range_early": float(np.nanmean(rng[early, li])), "range_late": float(np.nanmean(rng[late, li])),
                         "range_trend": float(np.nanmean(rng[last, li]) / np.nanmean(rng[before, li])),
                         "var_early": float(np.nanmean(var[early, li])), "var_late": float(np.nanmean(var[late, li])),
                         "early_steps": f"{run.steps[w - 1]}-{run.steps[min(S, w - 1 + n) - 1]}",
                         "late_steps": f"{run.steps[S - n]}-{run.steps[-1]}"})
    return pd.DataFrame(rows)


def origins(setup: Setup, S: int) -> np.ndarray:
    """Origin indices from the setup's grids that leave room for the shortest horizon."""
    o = np.unique(np.concatenate([np.arange(a, min(b, S), e) for a, b, e in setup.origin_spans]))
    return o[(o >= 1) & (o + min(setup.horizons) <= S)]


def sw_grid(run: Run, setup: Setup, labels: np.ndarray, org: np.ndarray) -> pd.DataFrame:
    """Backtest SW_Avg at every window of the setup. Rows as `evaluation.backtest`, plus `window`."""
    specs = [("sw_avg", {"window": w}) for w in setup.sw_windows]
    df = evaluation.backtest(run.p, specs, setup.horizons, origins=org, phases=labels, gpu_map=run.gpu_map)
    df["window"] = df["predictor"].str.extract(r"window=(\d+)")[0].astype(int)
    return df


def best_windows(grid: pd.DataFrame) -> dict[tuple[int, str], int]:
    """(horizon, phase) -> window with the lowest mean havg_mae_pp (phase "all" included)."""
    g = pd.concat([grid, grid.assign(phase="all")]).groupby(["horizon", "phase", "window"])["havg_mae_pp"].mean()
    return {(int(h), str(ph)): int(s.droplevel([0, 1]).idxmin()) for (h, ph), s in g.groupby(level=[0, 1])}


def sw_avg_rows(grid: pd.DataFrame, choice: dict[tuple[int, str], int]) -> pd.DataFrame:
    """Rows of `grid` at the window chosen for their (horizon, phase), relabelled "sw_avg" (the
    horizon's "all" choice where the run the window was chosen on had no rows of that phase)."""
    key = [choice.get((int(h), str(ph)), choice[(int(h), "all")]) for h, ph in zip(grid["horizon"], grid["phase"])]
    out = grid[grid["window"].to_numpy() == np.asarray(key)].drop(columns="window").copy()
    out["predictor"] = "sw_avg"
    return out


# update() continues with state fitted at the first origin instead of re-estimating it (kalman keeps
# its gains, estimated on the first 100 transient steps): refit at every origin instead.
REFIT_EACH_ORIGIN = {"kalman"}


def predictor_jobs(setup: Setup, other: Run, only: tuple[str, ...] | None = None,
                   lstm_train: tuple[np.ndarray, ...] | None = None) -> list[tuple[str, Any, tuple[int, ...], bool]]:
    """(label, spec, horizons, incremental) for every registered predictor (or those in `only`)
    except sw_avg (done by `sw_grid`). Predictors learned on other runs get the other seed: lstm
    (CrossRunLSTM; trained on `lstm_train`, [T, L, E] proportions of other runs, where given) and
    blend (weights from `learn_blend` on the other seed, one job per horizon, split by phase)."""
    jobs: list[tuple[str, Any, tuple[int, ...], bool]] = []
    for name in predictors.available():
        if name == "sw_avg" or (only is not None and name not in only):
            continue
        if name == "arima":
            jobs.append((name, ("arima", dict(setup.arima)), setup.horizons, True))
        elif name == "lstm":
            jobs.append((name, CrossRunLSTM(train_runs=lstm_train or (other.p,), **setup.lstm), setup.horizons, True))
        elif name == "blend":
            from moeload.predictors.blend import learn_blend

            for h in setup.horizons:
                jobs.append((name, ("blend", learn_blend([other.p], h, by_phase=True)), (h,), True))
        else:
            jobs.append((name, name, setup.horizons, name not in REFIT_EACH_ORIGIN))
    return jobs


def evaluate(run: Run, other: Run, setup: Setup, labels: np.ndarray, other_labels: np.ndarray,
             log: Any = print, only: tuple[str, ...] | None = None,
             lstm_train: tuple[np.ndarray, ...] | None = None) -> tuple[pd.DataFrame, dict[tuple[int, str], int]]:
    """Backtest every predictor (or SW_Avg and those in `only`) on `run`; SW_Avg's window, the
    LSTM's weights and blend's weights come from `other` (which may be `run` itself where there is
    no other run; then `lstm_train`, [T, L, E] proportions of other runs, trains the LSTM).
    labels, other_labels: [S, L] stable labels of the two runs (phase of a row = label at o - 1).
    Returns (rows of `evaluation.backtest` for all predictors, chosen SW_Avg windows).
    """
    org = origins(setup, run.p.shape[0])
    t0 = time.perf_counter()
    choice = best_windows(sw_grid(other, setup, other_labels, origins(setup, other.p.shape[0])))
    grid = sw_grid(run, setup, labels, org)
    parts = [sw_avg_rows(grid, choice)]
    log(f"  {run.setup} s{run.seed}: {len(org)} origins; sw_avg grid {time.perf_counter() - t0:.1f}s")
    times: dict[str, float] = {}
    for label, spec, hs, incremental in predictor_jobs(setup, other, only, lstm_train):
        t1 = time.perf_counter()
        df = evaluation.backtest(run.p, [spec], hs, origins=org, phases=labels, gpu_map=run.gpu_map,
                                 incremental=incremental)
        df["predictor"] = label
        parts.append(df)
        times[label] = times.get(label, 0.0) + time.perf_counter() - t1
    log(f"  {run.setup} s{run.seed}: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    out = pd.concat(parts, ignore_index=True)
    out.attrs = {"origins": org.tolist()}
    return out, choice


def headline(summaries: dict[int, pd.DataFrame], setup: Setup, margin: float = 0.8) -> pd.DataFrame:
    """Ratio havg_mae_pp / SW_Avg's (best window chosen on the other seed) per predictor (index) and
    cell "H<horizon> <phase> s<seed>" for the headline horizons, phases stable and transient and each
    test seed; `worst` = the largest ratio, `beats` = every cell present and <= margin."""
    rows = []
    for seed, s in summaries.items():
        for r in s.itertuples(index=False):
            if r.horizon in setup.headline and r.phase in ("stable", "transient") and r.predictor != "sw_avg":
                rows.append({"predictor": r.predictor, "cell": f"H{int(r.horizon)} {r.phase} s{seed}",
                             "order": (int(r.horizon), r.phase, seed), "ratio": float(r.havg_mae_pp_vs_sw_avg)})
    d = pd.DataFrame(rows).sort_values("order")
    wide = d.pivot(index="predictor", columns="cell", values="ratio")[list(dict.fromkeys(d["cell"]))]
    need = len(setup.headline) * 2 * len(summaries)
    cells = wide.notna().sum(axis=1)
    wide["worst"] = wide.max(axis=1)
    wide["beats"] = (wide["worst"] <= margin) & (cells == need)
    return wide.sort_values("worst")
