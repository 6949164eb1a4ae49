"""Regenerate the paper-reproduction table and figures from the committed GPU traces.

    .venv/bin/python experiments/results/make_results.py

Reads experiments/traces/<setup>-s{0,1}.moeload (+ .json), writes experiments/results/results.md,
results.json, backtest_rows.csv.gz and the PNG figures. Per setup and seed: phase boundaries
(moeload.states window rule, docs/metrics.md defaults; PELT as a cross-check), fluctuation early vs
late per layer, rolling-origin backtests of every registered predictor (SW_Avg window chosen on the
other seed, LSTM trained on the other seed), the headline check, and the paper's numbers. Then the
long runs of train_long.py (long_runs.py, the setups of LONG_SETUPS whose traces are present, one or two
seeds each: gpt3-small-moe-aux-s{0,1} and gpt3-small-moe-bias10k-s{0,1} of 10,000 steps,
gpt3-small-moe-bias-s{0,1}, gpt3-medium-moe-aux-s0): default-rule phases, shallow vs deep, SW_Avg /
ARIMA / LSTM at the longest horizons that fit (H = 1,000 and 2,000 for the 10,000-step runs; with two
seeds SW_Avg's window is chosen on and the LSTM trained on the other seed, with one seed the window is
chosen on the run itself and the LSTM trained on the setup's lstm_train runs), expert bias vs aux loss
(the short DeepSpeed aux runs against the shorter bias runs, and the matched train_long comparison of
the 10,000-step aux and bias runs over the steps they share), and their figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import analysis as A  # noqa: E402
import figures as F  # noqa: E402
import long_runs as LR  # noqa: E402
from report import write_report  # noqa: E402

from moeload import evaluation  # noqa: E402
from moeload.errors import MoeloadError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=Path, default=ROOT / "experiments" / "traces")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    ap.add_argument("--setup", action="append", choices=sorted([*A.SETUPS, *LR.LONG_SETUPS]),
                    help="default: all setups with traces (short runs and long runs)")
    ap.add_argument("--horizons", help="comma-separated horizons overriding the setup's (e.g. for a quick check); "
                                       "the two longest become the headline horizons")
    ap.add_argument("--origin-every", type=int, help="one origin grid: every N steps from 50 (overrides the setup's)")
    ap.add_argument("--sw-windows", help="comma-separated SW_Avg windows overriding the setup's")
    ap.add_argument("--no-figures", action="store_true")
    return ap.parse_args(argv)


def configure(name: str, a: argparse.Namespace) -> A.Setup:
    """The setup's settings (short or long run) with command-line overrides (said in the setup's note)."""
    s = A.SETUPS[name] if name in A.SETUPS else LR.LONG_SETUPS[name].setup
    if a.horizons:
        hs = tuple(sorted(int(h) for h in a.horizons.split(",")))
        s = A.Setup(**{**s.__dict__, "horizons": hs, "headline": (hs[-2], hs[-1]) if len(hs) > 1 else (hs[0], hs[0]),
                       "note": f"horizons overridden on the command line: {hs}"})
    if a.origin_every:
        s = A.Setup(**{**s.__dict__, "origin_spans": ((50, 10**9, a.origin_every),)})
    if a.sw_windows:
        s = A.Setup(**{**s.__dict__, "sw_windows": tuple(int(w) for w in a.sw_windows.split(","))})
    return s


def run_setup(setup: A.Setup, a: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Everything for one setup: runs, phases, fluctuation, backtests, summaries, headline, figures."""
    runs = {seed: A.load_run(a.traces, setup.name, seed) for seed in (0, 1)}
    for r in runs.values():
        for n in r.notes:
            log(f"  note: {n}")
    ph = {seed: A.phases(r) for seed, r in runs.items()}
    fl = {seed: A.fluctuation_table(r) for seed, r in runs.items()}
    log("  phases: " + "; ".join(f"s{s} window boundaries {p['window'].boundaries.tolist()}" for s, p in ph.items()))
    rows, choice, summ = {}, {}, {}
    for seed in (0, 1):
        other = 1 - seed
        rows[seed], choice[seed] = A.evaluate(runs[seed], runs[other], setup, ph[seed]["window"].labels,
                                              ph[other]["window"].labels, log)
        summ[seed] = evaluation.summarize(rows[seed])
    head = A.headline(summ, setup)
    figs: list[str] = []
    if not a.no_figures:
        t0 = time.perf_counter()
        out = a.out
        for seed, r in runs.items():
            figs.append(F.fluctuation_grid(r, out / f"{setup.name}-s{seed}-fluctuation.png").name)
        figs.append(F.heatmaps(runs[0], out / f"{setup.name}-s0-heatmaps.png").name)
        figs.append(F.gpu_loads(runs[0], out / f"{setup.name}-s0-gpu-load.png").name)
        figs.append(F.error_over_time(rows, F.boundary_markers(ph), setup.headline,
                                      out / f"{setup.name}-error-over-time.png", setup.name).name)
        figs.append(F.error_bars(rows[1], out / f"{setup.name}-s1-errors.png", setup.name, 1).name)
        log(f"  figures {time.perf_counter() - t0:.1f}s")
    return {"setup": setup, "runs": runs, "phases": ph, "fluct": fl, "rows": rows, "choice": choice,
            "summary": summ, "headline": head, "figures": figs}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f}s] {msg}", flush=True)

    found = [n for n in A.SETUPS if (a.traces / f"{n}-s0.moeload").exists()] + LR.available(a.traces)
    names = [n for n in a.setup if n in A.SETUPS] if a.setup else [n for n in found if n in A.SETUPS]
    long_names = [n for n in (a.setup or found) if n in LR.LONG_SETUPS and n in found]
    for n in sorted((set(a.setup or []) & set(LR.LONG_SETUPS)) - set(found)):
        log(f"{n}: no {n}-s0.moeload in {a.traces}; skipped")
    if not names:
        print(f"error: no traces <setup>-s0.moeload of the short runs ({', '.join(A.SETUPS)}) in {a.traces}",
              file=sys.stderr)
        return 2
    results, long = {}, {}
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    for name in names:
        log(f"{name}")
        try:
            results[name] = run_setup(configure(name, a), a, log)
        except MoeloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for name in long_names:
        log(f"{name} (long run)")
        try:
            long[name] = LR.run_long(name, a.traces, a.out, log, figures=not a.no_figures,
                                     setup=configure(name, a))
        except MoeloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    cmp = LR.bias_vs_aux(a.traces) if long else None
    matched = LR.matched_10k(a.traces) if long else None
    all_rows = pd.concat([r["rows"][s].assign(setup=n, test_seed=s) for n, r in {**results, **long}.items()
                          for s in r["rows"]], ignore_index=True)
    all_rows.to_csv(a.out / "backtest_rows.csv.gz", index=False, float_format="%.6g")
    js, md = write_report(results, a.out, time.perf_counter() - t_all)
    if long:
        js["long_runs"] = LR.to_json(long, cmp, matched)
        md += "\n".join(LR.section(long, cmp, results, matched)) + "\n"
    (a.out / "results.json").write_text(json.dumps(js, indent=1, default=_jsonable))
    (a.out / "results.md").write_text(md)
    log(f"wrote {a.out / 'results.md'}, results.json, backtest_rows.csv.gz and "
        f"{sum(len(r['figures']) for r in {**results, **long}.values())} figures")
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
