"""The long runs of experiments/train_long.py (issue 16): one H200, the learning-rate schedule
completing inside the run, 32,768 tokens per step. Phases (the package's default window rule),
shallow vs deep, SW_Avg / ARIMA(5,1,5) / cross-run LSTM forecasts at the longest horizons the runs
allow, and expert bias vs aux loss on the small shape (the short DeepSpeed aux runs against the
shorter bias runs; matched: the 10,000-step aux and bias runs of train_long.py); the matching
section of results.md.

Used by make_results.py; reuses analysis.py's runs, fluctuation and backtests and report.py's tables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import analysis as A
import figures as F
import numpy as np
import pandas as pd
import report as R

from moeload import evaluation, states
from moeload.plots import rolling_fluctuation


@dataclass
class LongSetup:
    """One long-run setup: how it is evaluated (`setup`), which of the paper's models it is
    compared with (`paper`, a key of analysis.PAPER_ERRORS / PAPER_STABLE), and what it is (`what`)."""

    setup: A.Setup
    paper: str
    what: str
    paper_note: str = ""  # str.format template: {seeds}/{Seeds}, {steps}, {train_loss}, {val_loss} (see _paper_note)
    lstm_train: tuple[tuple[str, int], ...] = ()  # (setup, seed) traces the LSTM trains on when there is one seed


_HORIZON_NOTE = ("The paper's H = 2,000 does not fit: an H-step forecast needs an origin at step >= 1 with H "
                 "steps after it, and this setup's longest run has {longest} steps. H = 1,000 is the longest paper "
                 "horizon that fits "
                 "(origins only up to S − 1,000: steps 100–{last1000}); 250 and 500 have origins in both phases.")

_HORIZON_NOTE_10K = ("H = 1,000 and 2,000 as in the paper, plus 250 and 500; an H-step forecast needs H steps after its "
                     "origin, so H = 2,000 uses only origins up to S − 2,000 (steps 100–{last2000}). Origins every 100 "
                     "steps (not 50 as for the shorter runs) keep the script's run time bounded: ARIMA costs about 0.5 s "
                     "per origin on the 96 series.")

_EVAL_10K: dict[str, Any] = dict(  # the 10,000-step runs' evaluation (aux and its matched bias twin)
    horizons=(250, 500, 1000, 2000), headline=(1000, 2000), origin_spans=((100, 10**9, 100),),
    sw_windows=(10, 25, 50, 100, 200, 500, 1000), arima={"order": (5, 1, 5), "engine": "batched", "max_history": 1000},
    lstm={"block": 20, "lookback": 16}, note=_HORIZON_NOTE_10K)

LONG_SETUPS = {
    "gpt3-small-moe-aux": LongSetup(
        A.Setup("gpt3-small-moe-aux", **_EVAL_10K),
        paper="gpt3-small-moe",
        what="12 layers, 6 MoE × 16 experts, top-2; Switch aux loss (coefficient 0.01)",
        paper_note="Same model shape and balancing (aux loss) as the paper's 125M, {steps} steps with the schedule "
                   "completing; still different: sequence 512 (paper 2,048), 32,768 tokens per step, one GPU (no "
                   "expert parallelism), a byte-level corpus the model memorises (train LM loss {train_loss}, "
                   "validation {val_loss}), {seeds}, and the paper's error formula is unknown, so only the order of "
                   "the predictors and the size of the errors compare.",
        lstm_train=(("gpt3-small-moe", 0), ("gpt3-small-moe", 1))),
    "gpt3-small-moe-bias10k": LongSetup(
        A.Setup("gpt3-small-moe-bias10k", **_EVAL_10K),
        paper="gpt3-small-moe",
        what="12 layers, 6 MoE × 16 experts, top-2; expert-bias balancing (DeepSeek-V3, u = 1e-3, no aux loss)",
        paper_note="The paper's 125M model is balanced by DeepSpeed's aux loss; this setup uses expert bias "
                   "(DeepSeek-V3's aux-loss-free balancing, u = 1e-3) and no aux loss, so it compares with the paper "
                   "across balancing methods as well as error formulas. Otherwise as `gpt3-small-moe-aux` (its "
                   "matched twin: same trainer, schedule and tokens per step): same model shape as the paper's 125M, "
                   "{steps} steps with the schedule completing; sequence 512 (paper 2,048), 32,768 tokens per step, "
                   "one GPU (no expert parallelism), a byte-level corpus the model memorises (train LM loss "
                   "{train_loss}, validation {val_loss}), {seeds}; the paper's error formula is unknown, so only the "
                   "order of the predictors and the size of the errors compare.",
        lstm_train=(("gpt3-small-moe-bias", 0), ("gpt3-small-moe-bias", 1))),
    "gpt3-small-moe-bias": LongSetup(
        A.Setup("gpt3-small-moe-bias", horizons=(250, 500, 1000), headline=(500, 1000),
                origin_spans=((100, 10**9, 50),), sw_windows=(10, 25, 50, 100, 200, 500),
                arima={"order": (5, 1, 5), "engine": "batched", "max_history": 1000},
                lstm={"block": 20, "lookback": 16}, note=_HORIZON_NOTE),
        paper="gpt3-small-moe",
        what="12 layers, 6 MoE × 16 experts, top-2; expert-bias balancing (DeepSeek-V3, u = 1e-3, no aux loss)",
        paper_note="The paper's 125M model is balanced by DeepSpeed's aux loss; these runs use expert bias and no aux "
                   "loss, so the comparison spans balancing methods as well as error formulas, sequence length, batch "
                   "and training length."),
    "gpt3-medium-moe-aux": LongSetup(
        A.Setup("gpt3-medium-moe-aux", horizons=(250, 500, 1000), headline=(500, 1000),
                origin_spans=((100, 500, 50), (500, 10**9, 100)), sw_windows=(10, 25, 50, 100, 200, 500),
                arima={"order": (5, 1, 5), "engine": "batched", "max_history": 1000}, note=_HORIZON_NOTE),
        paper="gpt3-medium-moe",
        what="24 layers, 12 MoE × 128 experts, top-2, expert FFN 512; Switch aux loss (coefficient 0.01)",
        paper_note="{Seeds} of {steps} steps, expert FFN 512 wide (the paper's 4 × hidden does not fit), sequence "
                   "512; the paper's error formula is unknown, so only the order of the predictors compares."),
}
PREDICTORS = ("arima", "lstm")  # besides SW_Avg, as in the paper


def available(traces: Path) -> list[str]:
    """Long setups whose seed-0 trace is in `traces`."""
    return [n for n in LONG_SETUPS if (traces / f"{n}-s0.moeload").exists()]


def run_long(name: str, traces: Path, out: Path, log: Any, figures: bool = True,
             setup: A.Setup | None = None) -> dict[str, Any]:
    """Phases, fluctuation, backtests and figures of every seed of one long setup found in `traces`
    (`setup`: the setup's evaluation settings with overrides; default LONG_SETUPS[name].setup).

    With two seeds, SW_Avg's window is chosen on the other seed and the LSTM trained on it (as for
    the short runs); with one, the window is chosen on the run itself and the LSTM is trained on the
    setup's `lstm_train` traces where they are all present (else there is no LSTM).
    """
    ls = LONG_SETUPS[name]
    setup = setup or ls.setup
    seeds = [s for s in (0, 1) if (traces / f"{name}-s{s}.moeload").exists()]
    runs = {s: A.load_run(traces, name, s) for s in seeds}
    for r in runs.values():
        for n in r.notes:
            log(f"  note: {n}")
    ph = {s: states.detect(r.counts, steps=r.steps) for s, r in runs.items()}
    log("  phases: " + "; ".join(f"s{s} {p.boundaries.tolist()} model {p.model_verdict}" for s, p in ph.items()))
    fl = {s: A.fluctuation_table(r) for s, r in runs.items()}
    train_names = [f"{n}-s{k}" for n, k in ls.lstm_train]
    lstm_runs = ([A.load_run(traces, n, k) for n, k in ls.lstm_train]
                 if len(seeds) == 1 and ls.lstm_train and all((traces / f"{t}.moeload").exists() for t in train_names)
                 else [])
    if len(seeds) == 1 and ls.lstm_train and not lstm_runs:
        log(f"  note: LSTM not run: its training traces {', '.join(train_names)} are not all in {traces}")
    rows, choice, summ, cross, lstm_on = {}, {}, {}, {}, {}
    for s in seeds:
        other = 1 - s if (1 - s) in runs else s
        cross[s] = other != s
        lstm_on[s] = [f"{name}-s{other}"] if cross[s] else [f"{r.setup}-s{r.seed}" for r in lstm_runs]
        lstm_steps = {f"{r.setup}-s{r.seed}": len(r.steps) for r in (lstm_runs or [runs[other]])}
        if lstm_runs:
            log(f"  {name} s{s}: LSTM trained on {', '.join(lstm_on[s])} ({' + '.join(f'{len(r.steps):,}' for r in lstm_runs)} steps)")
        rows[s], choice[s] = A.evaluate(runs[s], runs[other], setup, ph[s].labels, ph[other].labels, log,
                                        only=PREDICTORS if lstm_on[s] else ("arima",),
                                        lstm_train=tuple(r.p for r in lstm_runs) or None)
        summ[s] = evaluation.summarize(rows[s])
    figs: list[str] = []
    if figures:
        t0 = time.perf_counter()
        for s, r in runs.items():
            figs.append(F.fluctuation_grid(r, out / f"{name}-s{s}-fluctuation.png").name)
            figs.append(F.heatmaps(r, out / f"{name}-s{s}-heatmaps.png").name)
        if all(cross.values()):
            how = "SW_Avg window chosen on and LSTM trained on the other seed"
        else:
            trained = next(iter(lstm_on.values()))
            how = "SW_Avg window chosen on the run itself; " + (f"LSTM trained on {', '.join(trained)}" if trained
                                                                else "no LSTM")
        figs.append(F.error_over_time(rows, {s: int(p.model_boundary) for s, p in ph.items()}, setup.headline,
                                      out / f"{name}-error-over-time.png", name,
                                      title=f"{name}: forecast error at each origin\n({how})").name)
        log(f"  figures {time.perf_counter() - t0:.1f}s")
    return {"long": ls, "setup": setup, "runs": runs, "phases": ph, "fluct": fl, "rows": rows, "choice": choice,
            "summary": summ, "cross": cross, "lstm_on": lstm_on, "lstm_steps": lstm_steps, "figures": figs}


TL_AUX = "aux loss (train_long)"


def bias_vs_aux(traces: Path, window: int = 100) -> pd.DataFrame | None:
    """Small shape, aux loss (gpt3-small-moe-s*) vs expert bias (gpt3-small-moe-bias-s*), on the
    steps all four runs have (the first C): early = steps window - 1 .. min(500, C // 2) - 1, late =
    the last 500 of the C (the second half where C < 1,000); train_long.py's aux runs
    (gpt3-small-moe-aux-s*, balancing TL_AUX) are added as further rows where present, without
    shortening C. One row per run (see _compare_rows). None when a trace is missing."""
    names = [("gpt3-small-moe", s, "aux loss") for s in (0, 1)] + [("gpt3-small-moe-bias", s, "expert bias") for s in (0, 1)]
    if not all((traces / f"{n}-s{s}.moeload").exists() for n, s, _ in names):
        return None
    names += [("gpt3-small-moe-aux", s, TL_AUX) for s in (0, 1) if (traces / f"gpt3-small-moe-aux-s{s}.moeload").exists()]
    runs = [(A.load_run(traces, n, s), n, s, bal) for n, s, bal in names]
    C = min(len(r.steps) for r, _, _, bal in runs if bal != TL_AUX)
    return _compare_rows(runs, C, window)


MATCHED = (("gpt3-small-moe-aux", "aux loss"), ("gpt3-small-moe-bias10k", "expert bias"))


def matched_10k(traces: Path, window: int = 100) -> pd.DataFrame | None:
    """The matched comparison: train_long.py's small aux runs (gpt3-small-moe-aux-s*) vs its small
    expert-bias runs of the same length and schedule (gpt3-small-moe-bias10k-s*), on all the steps they
    share (C = the shortest run's length): early = steps window - 1 .. min(500, C // 2) - 1, late = the
    last 500 of the C. Rows as in bias_vs_aux (_compare_rows); attrs add "seeds" (balancing -> seeds
    present). None unless both setups have at least one seed."""
    names = [(n, s, bal) for n, bal in MATCHED for s in (0, 1) if (traces / f"{n}-s{s}.moeload").exists()]
    if {bal for _, _, bal in names} != {bal for _, bal in MATCHED}:
        return None
    runs = [(A.load_run(traces, n, s), n, s, bal) for n, s, bal in names]
    d = _compare_rows(runs, min(len(r.steps) for r, *_ in runs), window)
    d.attrs["seeds"] = {bal: [s for _, s, b in names if b == bal] for _, bal in MATCHED}
    return d


def _compare_rows(runs: list[tuple[A.Run, str, int, str]], C: int, window: int) -> pd.DataFrame:
    """One row per (run, setup, seed, balancing) over the first C steps: steps, tokens/step, warmup,
    default-rule boundaries and verdict (on the whole run), mean over layers of the window-`window`
    range (pp) early (steps window - 1 .. min(500, C // 2) - 1, also per layer) and late (the last 500
    of the C; the second half where C < 1,000), Spearman rho of the early range with depth, and
    max/mean (hottest expert's share × E, mean over the late steps) per layer. attrs: early, late
    (step ranges), window, C."""
    start, early_end = window - 1, min(500, C // 2)
    late = (C - 500, C) if C >= 1000 else (C // 2, C)
    rows = []
    for run, n, s, bal in runs:
        res = states.detect(run.counts, steps=run.steps)
        rng = 100 * rolling_fluctuation(run.p, window, "range", experts=run.experts)  # [S, L] pp
        early = np.nanmean(rng[start:early_end], axis=0)  # [L]
        mx = np.nanmean(run.p[late[0]:late[1]].max(axis=2), axis=0) * run.p.shape[2]  # [L]
        rows.append({"run": f"{n}-s{s}", "balancing": bal, "steps": len(run.steps),
                     "tokens_per_step": int(run.summary.get("tokens_per_step", 0)),
                     "warmup": run.summary.get("args", {}).get("warmup"),
                     "boundaries": res.boundaries.tolist(), "model_verdict": res.model_verdict,
                     "range_early": early.tolist(), "range_early_mean": float(early.mean()),
                     "range_late_mean": float(np.nanmean(rng[late[0]:late[1]])),
                     "rho_depth": R.depth_rho({0: early})[0], "max_over_mean": mx.tolist()})
    d = pd.DataFrame(rows)
    d.attrs = {"early": f"{start}–{early_end - 1}", "late": f"{late[0]}–{late[1] - 1}", "window": window, "C": C}
    return d


# ---------------------------------------------------------------- report


def _cell(b: int) -> str:
    return f"{b:,}" if b >= 0 else "not stable yet"


def corpus_train_tokens(val_fraction: float = 0.05) -> tuple[int, str]:
    """(tokens in the training split of the byte corpus train_long.py reads, which interpreter's
    stdlib it was read from) -- this machine's; the GPU host's interpreter is in each manifest."""
    import platform

    from moeload.workloads.corpus import load_corpus, split

    return len(split(load_corpus(), val_fraction)[0]), f"Python {platform.python_version()}"


def _runs_table(long: dict[str, Any]) -> list[str]:
    train, py = corpus_train_tokens()
    rows, hosts = [], set()
    for name, r in long.items():
        for s, run in r["runs"].items():
            j = run.summary
            tok = len(run.steps) * int(j.get("tokens_per_step", 0))
            hosts.add(str(writer_python(run)))
            rows.append([f"`{name}-s{s}`", r["long"].what, f"{len(run.steps):,}",
                         f"{j.get('tokens_per_step', 0):,}", R._f(j.get("steps_per_s")),
                         f"{np.mean(j['lm_loss_first20']):.3g} → {np.mean(j['lm_loss_last20']):.3g}"
                         if j.get("lm_loss_first20") else "–", R._f(j.get("val_lm_loss")),
                         f"{tok / 1e6:,.1f}M = {tok / train:.1f}", f"{j.get('gpu', '?')} × 1"])
    out = R._table(["trace", "shape, balancing", "steps", "tokens/step", "steps/s", "LM loss mean first → last 20 steps",
                    "val LM loss", "tokens trained = passes over the train split", "GPU"], rows)
    return out + [
        f"Passes: tokens trained / the {train:,} bytes (= tokens) of the corpus's training split "
        f"(`moeload.workloads.corpus.split(load_corpus(), 0.05)`, the standard library of {py} on the machine that "
        f"ran this script; the GPU host ran Python {', '.join(sorted(hosts))}, whose standard library differs a little). "
        "Batches are random 512-byte windows, so a pass is an expected count, not an ordered epoch. Where the train LM "
        "loss falls far below the validation loss the model is memorising the training split; its routers then see "
        "the same text again and again, the gradient reaching them shrinks with the loss, and a stable routing can be "
        "the sign of a model that has stopped learning anything new rather than of converged routing on fresh data.",
        ""]


def writer_python(run: A.Run) -> str:
    """The Python version the trace's writer recorded (manifest versions.python), or '?'."""
    import json

    try:
        return str(json.loads((run.path / "manifest.json").read_text()).get("versions", {}).get("python", "?"))
    except (OSError, ValueError):
        return "?"


def boundary_rho(r: dict[str, Any]) -> dict[int, float]:
    """Seed -> Spearman correlation of each layer's stable-from step with depth ("not stable yet"
    counted as the run's length, i.e. later than any boundary)."""
    return R.depth_rho({s: np.where(res.boundaries >= 0, res.boundaries, len(r["runs"][s].steps)).astype(float)
                        for s, res in r["phases"].items()})


def _rho(v: float) -> str:
    return f"{v:+.2f}" if np.isfinite(v) else "undefined (equal in every layer)"


def _phase_table(name: str, r: dict[str, Any]) -> list[str]:
    L = next(iter(r["runs"].values())).p.shape[1]
    rows = [[str(s), *[_cell(int(b)) for b in res.boundaries], _cell(int(res.model_boundary))]
            for s, res in r["phases"].items()]
    steps = " / ".join(f"{len(run.steps):,}" for run in r["runs"].values())
    q = next(iter(r["phases"].values())).params
    out = [f"Paper's stable point ({r['long'].paper}): {A.PAPER_STABLE[r['long'].paper]}. Ours: first step of each "
           f"layer's final stable phase with the package's default rule (`moeload.states.detect()`: window "
           f"{q['window']}, {q['stat']}, reference '{q['reference']}', c = {q['factor']}, a final stable phase counts "
           f"only once confirmed for {q['confirm']} steps, else \"not stable yet\"), out of {steps} steps.", ""]
    out += R._table(["seed", *[f"L{i}" for i in range(L)], "model"], rows)
    rho = boundary_rho(r)
    return out + [f"Spearman ρ of the stable-from step with depth (layer 0 = shallowest; \"not stable yet\" counted as the "
                  f"run's length): {' / '.join(_rho(v) for v in rho.values())} (seed "
                  f"{' / '.join(str(s) for s in rho)}; positive = deeper layers settle later).", ""]


def _forecast_table(name: str, r: dict[str, Any]) -> list[str]:
    setup: A.Setup = r["setup"]
    summ = r["summary"]
    S = {s: len(run.steps) for s, run in r["runs"].items()}
    org = {s: r["rows"][s].attrs["origins"] for s in summ}
    used = {s: {h: int(summ[s][(summ[s]["predictor"] == "sw_avg") & (summ[s]["horizon"] == h)
                                & (summ[s]["phase"] == "all")]["n_origins"].sum()) for h in setup.horizons} for s in summ}
    last = max(S.values()) - 1000
    last2 = max(S.values()) - 2000
    how = []
    grid = ", then ".join(f"every {e} from step {lo}" + (f" to {hi}" if hi < 10**9 else "") for lo, hi, e in setup.origin_spans)
    def _train_desc(names: list[str]) -> str:
        steps = " / ".join(f"{r['lstm_steps'][n]:,}" for n in names)
        what = ("the short DeepSpeed-MoE runs of `train_ds.py`, 2 GPUs, 8,192 tokens per step, LR near its peak"
                if all(n.startswith("gpt3-small-moe-s") for n in names) else
                "runs of `train_long.py` (the same trainer), each with its own schedule completing within it"
                if all(n.rsplit("-s", 1)[0] in LONG_SETUPS for n in names) else "other runs")
        return f"{what}; {steps} steps"

    for s in summ:
        src = f"chosen on seed {1 - s}" if r["cross"][s] else "chosen on this run itself (no second seed; in the baseline's favour)"
        win = ", ".join(f"H{h}/{ph[0]} {w}" for (h, ph), w in sorted(r["choice"][s].items()) if ph != "all")
        lstm = (f"LSTM ({setup.lstm}) trained on seed {1 - s}'s whole run" if r["cross"][s] else
                f"LSTM ({setup.lstm}; hidden 32, 20 epochs) trained on the whole of "
                f"{' and '.join(f'`{t}`' for t in r['lstm_on'][s])} (other runs of the same shape and balancing: "
                f"{_train_desc(r['lstm_on'][s])}), tested on this run" if r["lstm_on"][s] else
                "LSTM: not possible (one seed; the paper trains it on another run)")
        how.append(f"tested on seed {s} ({S[s]:,} steps; origins {grid}; "
                   + "; ".join(f"H {h:,}: {used[s][h]}" for h in setup.horizons)
                   + f"): SW_Avg window {src} from {list(setup.sw_windows)}: {win}; {lstm}")
    sparse = ("; the grid thins to every 100 steps after step 500 to keep ARIMA (batched, one fit per series "
              "and origin) within the script's time budget at 128 experts × 12 layers; H = 1,000 keeps every "
              "50-step origin it can have" if len(setup.origin_spans) > 1 else "")
    out = [f"Rolling origin (`evaluation.backtest`, incremental, as for the short runs), horizons "
           f"{', '.join(f'{h:,}' for h in setup.horizons)}. " + setup.note.format(last1000=f"{last:,}", last2000=f"{last2:,}", longest=f"{max(S.values()):,}"),
           "ARIMA " f"{setup.arima['order']} engine `{setup.arima['engine']}`, max_history {setup.arima['max_history']}, "
           f"at every origin, like the others ({', '.join(str(len(o)) for o in org.values())} origins{sparse}). Phase of a row = "
           "default-rule label of its layer at step o − 1 (a layer that is \"not stable yet\" can still have "
           "stable-labelled stretches).", ""]
    out += [f"- {h}" for h in how] + [""]
    out.append("**havg_mae_pp (pp of share) per test seed; ratio = havg_mae_pp / SW_Avg's, all phases**")
    out.append("")
    rows = []
    for s, d in summ.items():
        k = d.set_index(["predictor", "horizon", "phase"])
        for n in ("sw_avg", *PREDICTORS):
            for h in setup.horizons:
                if (n, h, "all") not in k.index:
                    continue
                cells = [R._f(k["havg_mae_pp"].get((n, h, ph), np.nan)) for ph in ("stable", "transient", "all")]
                x = k.loc[(n, h, "all")]
                rows.append([str(s), n, f"{h:,}", *cells, R._f(x["mae_pp"]), R._f(100 * x["mre"]),
                             R._f(x["havg_mae_pp_vs_sw_avg"]), str(int(x["n_origins"]))])
    out += R._table(["test seed", "predictor", "H", "stable", "transient", "all", "mae_pp (all)", "mre % (all)",
                     "ratio (all)", "origins"], rows)
    m = R._mean_seeds(summ).set_index(["predictor", "horizon", "phase"])
    seeds_text = "mean of the two test seeds" if len(summ) > 1 else "one seed"
    out += R._paper(r["long"].paper, setup, m, seeds_text)
    return out + ([_paper_note(r), ""] if r["long"].paper_note else [])


def _paper_note(r: dict[str, Any]) -> str:
    """The setup's paper_note with the seed count, steps and losses of the runs present filled in."""
    runs = list(r["runs"].values())
    n = len(runs)
    seeds = {1: "one seed", 2: "two seeds"}.get(n, f"{n} seeds")
    steps = sorted({len(run.steps) for run in runs})
    per = f" (seed {' / '.join(str(run.seed) for run in runs)})" if n > 1 else ""
    train = " / ".join(f"{np.mean(run.summary['lm_loss_last20']):.2g}" if run.summary.get("lm_loss_last20") else "?"
                       for run in runs)
    val = " / ".join(R._f(run.summary.get("val_lm_loss")) for run in runs)
    return r["long"].paper_note.format(seeds=seeds, Seeds=seeds[0].upper() + seeds[1:],
                                       steps=" / ".join(f"{len(run.steps):,}" for run in runs) if len(steps) > 1
                                       else f"{steps[0]:,}", train_loss=train + per, val_loss=val + per)


def _cmp_table(d: pd.DataFrame) -> list[str]:
    """The table of a bias_vs_aux / matched_10k frame: one row per run."""
    rows = [[f"`{x.run}`", x.balancing, f"{x.steps:,}", f"{x.tokens_per_step:,}",
             " ".join(_cell(b) for b in x.boundaries), x.model_verdict,
             " ".join(f"{v:.2f}" for v in x.range_early), R._f(x.range_early_mean), f"{x.rho_depth:+.2f}",
             R._f(x.range_late_mean), f"{min(x.max_over_mean):.2f}–{max(x.max_over_mean):.2f}"]
            for x in d.itertuples(index=False)]
    return R._table(["run", "balancing", "steps", "tokens/step", "stable from, per layer", "whole model",
                     "early range per layer", "early mean", "ρ depth", "late mean", "max/mean late"], rows)


def _span(x: pd.Series | list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(x), max(x)
    return fmt.format(lo) if np.isclose(lo, hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def _mm(g: pd.DataFrame) -> str:
    """Range over runs and layers of max/mean late."""
    return f"{min(min(v) for v in g['max_over_mean']):.2f}–{max(max(v) for v in g['max_over_mean']):.2f}"


def _bias_vs_aux(d: pd.DataFrame | None, sw: dict[str, float], matched: pd.DataFrame | None = None) -> list[str]:
    if d is None:
        return ["Not computed: one of gpt3-small-moe-s{0,1} / gpt3-small-moe-bias-s{0,1} is missing.", ""]
    a = d.attrs
    out = [f"Same model shape (6 MoE × 16 experts, top-2), compared on the steps all four runs have: range w = "
           f"{a['window']} (pp, mean over experts) over steps {a['early']} (early; per layer shallow → deep, and the "
           f"mean) and {a['late']} (late, mean over layers); ρ = Spearman of early range with depth; max/mean = hottest "
           f"expert's share × 16, mean over steps {a['late']}, range over layers.", ""]
    out += _cmp_table(d)
    aux, bias = d[d["balancing"] == "aux loss"], d[d["balancing"] == "expert bias"]
    ratio = bias["range_early_mean"].mean() / aux["range_early_mean"].mean()
    ratio_late = bias["range_late_mean"].mean() / aux["range_late_mean"].mean()

    span = _span
    mm = {k: (min(min(v) for v in g["max_over_mean"]), max(max(v) for v in g["max_over_mean"]))
          for k, g in (("aux", aux), ("bias", bias))}
    out.append(
        f"Under expert-bias balancing the early routing fluctuates {ratio:.2f}× as much as under the aux loss (mean "
        f"early range {span(bias['range_early_mean'])} vs {span(aux['range_early_mean'])} pp) and {ratio_late:.2f}× "
        f"over steps {a['late']} ({span(bias['range_late_mean'])} vs {span(aux['range_late_mean'])} pp); deeper layers "
        f"fluctuate more in both (ρ {span(bias['rho_depth'], '{:+.2f}')} bias, {span(aux['rho_depth'], '{:+.2f}')} aux). "
        f"Whole-model verdicts: bias {', '.join(bias['model_verdict'])}; aux {', '.join(aux['model_verdict'])}. "
        f"The hottest expert carries {mm['bias'][0]:.2f}–{mm['bias'][1]:.2f}× its fair share late in the bias runs and "
        f"{mm['aux'][0]:.2f}–{mm['aux'][1]:.2f}× in the aux runs. "
        + (f"The bias-balanced loads are also harder to forecast: SW_Avg at H = 1,000 (all phases, mean of the test "
           f"seeds) errs {sw['bias']:.3g} pp (havg_mae_pp) against {sw['aux']:.3g} pp on the aux runs. " if sw else "")
        + f"This is not a controlled comparison: the runs differ "
        f"in more than the balancing. The aux runs are the short DeepSpeed runs (2 GPUs, ep_size 2, "
        f"{span(aux['tokens_per_step'], '{:,}')} tokens/step, fp32, capacity factor 1.0, "
        f"{' / '.join(f'{x:,}' for x in aux['steps'])} steps of a cosine planned for 20,000, so the LR stayed near its "
        f"peak); the bias runs come from train_long.py (one GPU, {span(bias['tokens_per_step'], '{:,}')} tokens/step, "
        f"bf16, capacity factor 1.25, {' / '.join(f'{x:,}' for x in bias['steps'])} steps with the schedule "
        f"completing). At the same step a bias run has seen "
        f"{bias['tokens_per_step'].mean() / aux['tokens_per_step'].mean():.2g}× the tokens and "
        f"is much further through its LR schedule, and the bias s1 run is shorter, so the rule's 'late' reference "
        f"and the 300-step confirmation have less run to work with. ")
    tl = d[d["balancing"] == TL_AUX]
    if len(tl):
        out[-1] += (
            f"The aux runs of train_long.py ({', '.join(f'`{x}`' for x in tl['run'])}, the last rows) share the bias runs' "
            f"trainer, tokens per step, bf16 and capacity factor, so they are the closer match: against them the bias "
            f"runs fluctuate {bias['range_early_mean'].mean() / tl['range_early_mean'].mean():.2f}× as much early "
            f"({span(tl['range_early_mean'])} pp aux) and {bias['range_late_mean'].mean() / tl['range_late_mean'].mean():.2f}× "
            f"over steps {a['late']} ({span(tl['range_late_mean'])} pp aux; ρ depth {span(tl['rho_depth'], '{:+.2f}')}, "
            f"max/mean {min(min(v) for v in tl['max_over_mean']):.2f}–{max(max(v) for v in tl['max_over_mean']):.2f}). "
            f"Still not matched: the aux run's schedule spans {' / '.join(f'{x:,}' for x in tl['steps'])} steps "
            f"(warmup {' / '.join(f'{int(x):,}' for x in tl['warmup'])}), so over these steps its LR is still warming "
            f"up or near its peak, while the bias runs' warmup ended at step "
            f"{' / '.join(f'{int(x):,}' for x in bias['warmup'])} and their LR decays to 10 % by step "
            f"{' / '.join(f'{x:,}' for x in bias['steps'])}. "
            + (f"The 10,000-step bias run{'s' if len(mb) > 1 else ''} of the same schedule "
               f"({', '.join(f'`{x}`' for x in mb['run'])}) {'are' if len(mb) > 1 else 'is'} compared with these aux "
               f"runs in the next subsection."
               if matched is not None and len(mb := matched[matched["balancing"] == "expert bias"]) else
               "The matched 10,000-step bias runs (× 2 seeds) are still to run."))
    else:
        out[-1] += "A matched aux run of train_long.py (small aux, 10,000 steps × 2 seeds) is still to run."
    return out + [""]


def _matched(d: pd.DataFrame | None, long: dict[str, Any]) -> list[str]:
    """The subsection "Expert bias vs aux loss, matched" from matched_10k's frame and the long results."""
    (aux_name, aux_bal), (bias_name, bias_bal) = MATCHED
    if d is None:
        return [f"Not computed: needs at least one seed each of `{aux_name}` and `{bias_name}`.", ""]
    a = d.attrs
    aux, bias = d[d["balancing"] == aux_bal], d[d["balancing"] == bias_bal]
    n_aux, n_bias = len(aux), len(bias)
    last = "the last 500 steps" if a["C"] >= 1000 else "the second half"  # as _compare_rows picks late
    out = [f"`{aux_name}-s*` ({n_aux} seed{'s' if n_aux > 1 else ''}) against `{bias_name}-s*` ({n_bias} "
           f"seed{'s' if n_bias > 1 else ''}): the same trainer (`train_long.py`), model shape (6 MoE × 16 experts, "
           f"top-2), corpus, tokens per step, bf16 and capacity factor; only the balancing differs. Compared over all "
           f"{a['C']:,} steps they share: range w = {a['window']} (pp, mean over experts) over steps {a['early']} "
           f"(early; per layer shallow → deep, and the mean) and {a['late']} (late = {last}, mean over "
           f"layers); ρ = Spearman of early range with depth; max/mean = hottest expert's share × 16, mean over steps "
           f"{a['late']}, range over layers. Stable-from steps and verdicts are the default rule on each whole run.", ""]
    out += _cmp_table(d)
    same = {k: sorted({int(v) for v in d[k] if v is not None}) for k in ("steps", "warmup", "tokens_per_step")}
    diff = [k for k, v in same.items() if len(v) > 1]
    sched = (f"Schedules match: {same['steps'][0]:,} steps, warmup {same['warmup'][0]:,}, "
             f"{same['tokens_per_step'][0]:,} tokens/step in every run. " if not diff else
             "The runs still differ in " + ", ".join(f"{k} ({' / '.join(f'{v:,}' for v in same[k])})" for k in diff)
             + ". ")
    verdict = {bal: "; ".join(f"`{x.run}` {x.model_verdict}" for x in g.itertuples()) for bal, g in
               ((aux_bal, aux), (bias_bal, bias))}
    sw = {n: _sw_1000(long.get(n)) for n in (aux_name, bias_name)}
    sw_txt = ""
    if None not in sw.values():
        how = {n: ("window chosen on the other seed" if all(long[n]["cross"].values()) else
                   "window chosen on the run itself, in the baseline's favour") for n in sw}
        sw_txt = (f"SW_Avg at H = 1,000 (havg_mae_pp, all phases, mean over each setup's test seeds; from the long-run sections "
                  f"above) errs {sw[bias_name]:.3g} pp on the bias run{'s' if n_bias > 1 else ''} ({how[bias_name]}) "
                  f"against {sw[aux_name]:.3g} pp on the aux runs ({how[aux_name]}), {sw[bias_name] / sw[aux_name]:.2f}×. ")
    elif any(v is not None for v in sw.values()):
        sw_txt = "SW_Avg at H = 1,000: " + "; ".join(f"`{n}` {v:.3g} pp" for n, v in sw.items() if v is not None) + \
                 " (the other setup's long results were not computed in this run of the script). "
    lstm = long.get(bias_name, {}).get("lstm_on", {})
    trained = sorted({t for v in lstm.values() for t in v})
    one_side = "bias" if n_bias < n_aux else "aux" if n_aux < n_bias else None
    seeds_txt = ("Both sides have the same number of seeds. " if one_side is None else
                 f"Still unmatched: the seed count ({n_aux} aux, {n_bias} bias), so the {one_side} side's spread over "
                 f"seeds is unknown" + (", and its forecasts are not tested like the other side's: SW_Avg's window is "
                                        "chosen on the run itself"
                                        + (f" and the LSTM trained on {', '.join(f'`{t}`' for t in trained)}" if trained
                                           else " and there is no LSTM") + ", not on another seed of the setup"
                                        if one_side == "bias" and n_bias < 2 and bias_name in long else "") + ". ")
    out.append(
        f"With everything but the balancing matched, expert bias fluctuates "
        f"{bias['range_early_mean'].mean() / aux['range_early_mean'].mean():.2f}× as much as the aux loss early "
        f"(mean early range {_span(bias['range_early_mean'])} vs {_span(aux['range_early_mean'])} pp) and "
        f"{bias['range_late_mean'].mean() / aux['range_late_mean'].mean():.2f}× over {last} "
        f"({_span(bias['range_late_mean'])} vs {_span(aux['range_late_mean'])} pp); ρ of the early range with depth "
        f"{_span(bias['rho_depth'], '{:+.2f}')} bias, {_span(aux['rho_depth'], '{:+.2f}')} aux. The hottest expert "
        f"carries {_mm(bias)}× its fair share late under expert bias and {_mm(aux)}× under the aux loss. "
        f"Whole-model verdicts: bias {verdict[bias_bal]}; aux {verdict[aux_bal]}. " + sw_txt + sched + seeds_txt
        + "Both sides train on, and memorise, the same byte corpus (runs table above), which matching cannot remove.")
    return out + [""]


def _sw_1000(r: dict[str, Any] | None) -> float | None:
    """SW_Avg's havg_mae_pp at H = 1,000, all phases, mean over test seeds (None if not computed)."""
    if r is None:
        return None
    m = R._mean_seeds(r["summary"]).set_index(["predictor", "horizon", "phase"])
    return float(m.loc[("sw_avg", 1000, "all"), "havg_mae_pp"]) if ("sw_avg", 1000, "all") in m.index else None


def claims(name: str, r: dict[str, Any]) -> list[str]:
    """Bullets: the paper's claims (stable point, shallow vs deep, forecast order) next to this setup's numbers."""
    L = next(iter(r["runs"].values())).p.shape[1]
    seeds = list(r["phases"])
    ph = [f"seed {s}: {res.model_verdict} (layers {', '.join(_cell(int(b)) for b in res.boundaries)}) of "
          f"{len(r['runs'][s].steps):,}" for s, res in r["phases"].items()]
    early = {s: d[d["window"] == 100]["range_early"].to_numpy() for s, d in r["fluct"].items()}
    rho_e, rho_b = R.depth_rho(early), boundary_rho(r)
    model = {"gpt3-small-moe": "GPT-3 Small 125M MoE", "gpt3-medium-moe": "GPT-3 Medium 350M MoE"}[r["long"].paper]
    out = [f"**The paper's claims on {name}** (compared with the paper's {model}):", "",
           f"- Stable phase — paper {A.PAPER_STABLE[r['long'].paper]}; ours (default rule, whole model): "
           + "; ".join(ph) + " steps.",
           f"- Shallow vs deep — paper: shallow layers fluctuate more. Ours: Spearman ρ of the early range (w = 100) "
           f"with depth {' / '.join(_rho(rho_e[s]) for s in seeds)}, of the stable-from step with depth "
           f"{' / '.join(_rho(rho_b[s]) for s in seeds)} (seed {' / '.join(str(s) for s in seeds)}; layer 0 "
           f"early range {' / '.join(f'{early[s][0]:.3g}' for s in seeds)} pp vs layer {L - 1} "
           f"{' / '.join(f'{early[s][-1]:.3g}' for s in seeds)} pp; a negative ρ of the early range agrees with the paper, "
           f"a negative ρ of the stable-from step means the shallow layers settle later)."]
    m = R._mean_seeds(r["summary"]).set_index(["predictor", "horizon", "phase"])
    paper = A.PAPER_ERRORS.get(r["long"].paper, {})
    for h in r["setup"].headline:
        got = sorted((float(m.loc[(n, h, "all"), "havg_mae_pp"]), n) for n in ("sw_avg", *PREDICTORS)
                     if (n, h, "all") in m.index)
        if not got:
            continue
        p = paper.get(h)
        ptxt = (" < ".join(f"{n} {v} %" for n, v in p.items()) if p else "no number in the paper at this horizon")
        sw = dict((n, v) for v, n in got)["sw_avg"]
        out.append(f"- Forecasts at H = {h:,} — paper: {ptxt}. Ours (havg_mae_pp, all phases, "
                   f"{'mean of the test seeds' if len(seeds) > 1 else 'one test run'}): "
                   + " < ".join(f"{n} {v:.3g} pp" + ("" if n == "sw_avg" else f" ({v / sw:.2f}× SW_Avg)")
                                for v, n in got) + ".")
    return out + [""]


ISSUE_LENGTH = {"gpt3-small-moe": 10_000, "gpt3-medium-moe": 3_000}  # issue 16: steps asked for, per paper model


def _length_status(long: dict[str, Any]) -> str:
    """Which runs have issue 16's length, and which setups with the length lack a second seed."""
    full = {name: [s for s, run in r["runs"].items() if len(run.steps) >= ISSUE_LENGTH[r["long"].paper]]
            for name, r in long.items()}
    have = [f"`{n}-s{s}`" for n, ss in full.items() for s in ss]
    short = [f"`{n}-s{s}`" for n, r in long.items() for s in r["runs"] if s not in full[n]]
    one = [f"`{n}` has one seed so far" for n, ss in full.items() if len(ss) == 1]
    return ((f"runs with the length: {', '.join(have)}" if have else "no run has the length yet")
            + (f" ({'; '.join(one)})" if one else "")
            + (f"; shorter: {', '.join(short)}, so the results on those are provisional." if short else "."))


def section(long: dict[str, Any], cmp: pd.DataFrame | None, short: dict[str, Any],
            matched: pd.DataFrame | None = None) -> list[str]:
    """The "Long runs" section of results.md (markdown lines); `short`: make_results' results of the
    short runs (for SW_Avg's error on the small aux runs); `matched`: matched_10k's frame."""
    md = ["## Long runs (schedule completed in the run, 32k tokens/step)", "",
          "Traces made by `experiments/train_long.py` on one NVIDIA H200 (provenance, commands and what remains: "
          "`experiments/README.md`, each trace's `.moeload.json` and `.log`): warmup plus a cosine to 10 % of peak "
          "that ends exactly at the last step, 64 × 512 = 32,768 tokens per step, bf16, batched expert GEMMs, "
          "capacity factor 1.25. Issue 16 asks for small ≥ 10,000 steps and medium ≥ 3,000, two seeds each: "
          + _length_status(long), ""]
    md += _runs_table(long)
    for name, r in long.items():
        L, E = next(iter(r["runs"].values())).p.shape[1:]
        md += [f"### {name} ({L} MoE layers × {E} experts)", ""] + claims(name, r)
        md += ["#### Stable phase (default rule)", ""]
        md += _phase_table(name, r)
        md += ["#### Fluctuation early vs late, shallow vs deep", ""]
        md += R._fluct(r)
        md += ["#### Forecast errors", ""]
        md += _forecast_table(name, r)
        md += ["#### Figures", ""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    sw = {"aux": _sw_1000(short.get("gpt3-small-moe")), "bias": _sw_1000(long.get("gpt3-small-moe-bias"))}
    md += ["### Aux-loss-free (expert bias) vs aux loss, small shape", ""]
    md += _bias_vs_aux(cmp, sw if None not in sw.values() else {}, matched)
    md += ["### Expert bias vs aux loss, matched: train_long, 10,000 steps", ""]
    md += _matched(matched, long)
    return md


def to_json(long: dict[str, Any], cmp: pd.DataFrame | None, matched: pd.DataFrame | None = None) -> dict[str, Any]:
    """The "long_runs" entry of results.json."""
    js: dict[str, Any] = {name: {
        "runs": {s: {"steps_used": len(run.steps), "summary": {k: v for k, v in run.summary.items()
                                                               if not isinstance(v, list)}, "notes": run.notes}
                 for s, run in r["runs"].items()},
        "phases": {s: {"boundaries": res.boundaries.tolist(), "model_boundary": int(res.model_boundary),
                       "verdicts": res.verdicts, "model_verdict": res.model_verdict, "params": res.params}
                   for s, res in r["phases"].items()},
        "fluctuation": {s: d.to_dict(orient="records") for s, d in r["fluct"].items()},
        "setup": dict(r["setup"].__dict__),
        "sw_avg_windows": {s: {f"{h}/{ph}": w for (h, ph), w in c.items()} for s, c in r["choice"].items()},
        "cross_run": r["cross"],
        "lstm_trained_on": r["lstm_on"],
        "boundary_rho_depth": {s: v if np.isfinite(v) else None for s, v in boundary_rho(r).items()},
        "summary": {s: d.to_dict(orient="records") for s, d in r["summary"].items()},
        "figures": r["figures"],
    } for name, r in long.items()}
    js["bias_vs_aux"] = None if cmp is None else {"attrs": cmp.attrs, "rows": cmp.to_dict(orient="records")}
    js["matched_10k"] = None if matched is None else {"attrs": matched.attrs, "rows": matched.to_dict(orient="records")}
    return js
