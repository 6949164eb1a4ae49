"""Check the advisor's cost model against measured GPU time (one GPU, simulated GPUs in turn).

1. Calibrate the expert GEMMs of the trace's shape on this GPU (`moeload.advise.calibrate`).
2. For `--steps` steps of the real trace (the last ones), under each arm (contiguous = `none`,
   an EPLB permutation planned from the `--window` steps before them, EPLB with `--replicas`
   slots), run every simulated GPU's share of each layer's tokens — its slots' real, uneven
   route counts — as one grouped GEMM forward + backward, timed with CUDA events. A step's
   measured compute time is the sum over layers of the slowest simulated GPU.
3. Predict the same with the calibrated model (`Calibration.gemm_time` of each GPU's routes).
Prints and writes (results.json, results.md in --out): median absolute error of predicted compute
time per (step, layer, GPU) and per step, predicted vs measured saving of each arm, and whether
the ranking of arms by predicted saving equals the ranking by measured saving. All-to-all is not
measured (one GPU); the advisor's all-to-all constants stay defaults.

    python benchmarks/advise_gpu.py --trace experiments/traces/gpt3-small-moe-s0.moeload --gpus 4 --out $OUT
    python benchmarks/advise_gpu.py --trace tests-trace --device cpu --tiny --out /tmp/o   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=None, help="slots per layer of the replicated arm (default E + G)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--routes-per-gpu", type=float, default=16384.0,
                    help="scale the trace's counts so a GPU serves this many routes per step on average")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape for CPU smoke tests")
    return ap.parse_args(argv)


def arms(counts_window: np.ndarray, G: int, R: int) -> dict:
    from moeload.placement import plan

    L, E = counts_window.shape[1:]
    w = counts_window.mean(axis=0) + 1e-9
    contiguous = (np.tile(np.arange(E), (L, 1)), np.ones((L, E)))
    perm = plan(w, num_gpus=G, num_replicas=E, policy="eplb")
    rep = plan(w, num_gpus=G, num_replicas=R, policy="eplb")
    return {"none": contiguous, "eplb_permutation": (perm.phy2log, perm.share),
            f"eplb_replicas_{R}": (rep.phy2log, rep.share)}


def main(argv=None) -> int:
    a = parse_args(argv)
    from moeload.advise import resolve_shape
    from moeload.advise.calibrate import calibrate, expert_step, time_fn
    from moeload.advise.cost import ExpertShape
    from moeload.trace import open_trace

    t = open_trace(a.trace)
    S = len(t.steps)
    n_meas = min(a.steps, S // 2)
    win = min(a.window, S - n_meas)
    counts = t.counts(t.steps[S - n_meas - win :]).astype(np.float64)  # [win + n, L, E]
    L, E = counts.shape[1:]
    G = a.gpus
    R = a.replicas or E + G
    shape = ExpertShape(32, 64) if a.tiny else resolve_shape(t.meta)
    meas = counts[win:]
    scale = a.routes_per_gpu * G / meas.sum(axis=-1).mean()
    meas = meas * scale
    print(f"trace {a.trace}: {S} steps, {L} layers x {E} experts; measuring the last {n_meas} steps, plans from "
          f"the {win} before; counts x {scale:.2f} -> {a.routes_per_gpu:.0f} routes per GPU per step; expert "
          f"{shape.hidden}x{shape.ffn_hidden}", flush=True)
    t0 = time.time()
    grid = (16, 64, 256, 1024, 4096, 16384, 65536) if a.tiny else (
        64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
    cals = {}
    for k in sorted({E // G, R // G}):
        cals[k] = calibrate(shape, k, grid=grid, device=a.device, repeats=a.repeats + 2,
                            progress=lambda m: print("  calibrate", m, flush=True))
    print(f"calibrated in {time.time() - t0:.0f} s on {cals[E // G].device}", flush=True)

    from moeload.advise.strategies import gpu_routes

    plans = arms(counts[:win], G, R)
    rows, per_arm = [], {}
    for name, (p2l, share) in plans.items():
        slots = p2l.shape[1] // G
        cal = cals[slots]
        routes = gpu_routes(meas, p2l, share, G)  # [n, L, G]
        per_slot = meas[:, np.arange(L)[:, None], p2l] * share  # [n, L, R]
        measured = np.zeros((n_meas, L, G))
        t1 = time.time()
        for s in range(n_meas):
            for layer in range(L):
                for g in range(G):
                    r = np.rint(per_slot[s, layer, g * slots : (g + 1) * slots]).astype(int).tolist()
                    run, used = expert_step(shape, r, device=a.device)
                    measured[s, layer, g] = time_fn(run, device=a.device, repeats=a.repeats, warmup=1)
            if s % 50 == 0:
                print(f"  {name}: step {s}/{n_meas} ({time.time() - t1:.0f} s)", flush=True)
        from moeload.advise.cost import padded_routes

        predicted = cal.gemm_time(padded_routes(per_slot, G, cal.tile) if cal.tile else routes)
        step_meas = measured.max(axis=-1).sum(axis=-1)
        step_pred = predicted.max(axis=-1).sum(axis=-1)
        per_arm[name] = {"measured_ms": float(step_meas.mean() * 1e3), "predicted_ms": float(step_pred.mean() * 1e3),
                         "kernel": used}
        err_gpu = np.abs(predicted - measured) / measured
        err_step = np.abs(step_pred - step_meas) / step_meas
        rows.append({"arm": name, "median_err_gpu": float(np.median(err_gpu)), "median_err_step": float(np.median(err_step)),
                     "p90_err_step": float(np.percentile(err_step, 90))})
        print(f"{name}: measured {per_arm[name]['measured_ms']:.3f} ms/step, predicted {per_arm[name]['predicted_ms']:.3f}"
              f" ms/step; median |error| per GPU {rows[-1]['median_err_gpu']:.1%}, per step {rows[-1]['median_err_step']:.1%}",
              flush=True)
    base_m, base_p = per_arm["none"]["measured_ms"], per_arm["none"]["predicted_ms"]
    for name, d in per_arm.items():
        d["measured_saving_pct"] = 100 * (1 - d["measured_ms"] / base_m)
        d["predicted_saving_pct"] = 100 * (1 - d["predicted_ms"] / base_p)
    rank_m = sorted(per_arm, key=lambda n: -per_arm[n]["measured_saving_pct"])
    rank_p = sorted(per_arm, key=lambda n: -per_arm[n]["predicted_saving_pct"])
    all_err = float(np.median([r["median_err_step"] for r in rows]))
    out = {"trace": str(a.trace), "gpus": G, "tile": {k: c.tile for k, c in cals.items()},
           "calibration_error": {k: c.rel_error for k, c in cals.items()}, "replicas": R, "steps": n_meas, "scale": scale,
           "routes_per_gpu": a.routes_per_gpu, "shape": [shape.hidden, shape.ffn_hidden], "device": cals[E // G].device,
           "arms": per_arm, "errors": rows, "ranking_measured": rank_m, "ranking_predicted": rank_p,
           "ranking_equal": rank_m == rank_p, "median_err_step": all_err,
           "calibration": {k: c.to_json() for k, c in cals.items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.trace.name.removesuffix(".moeload")
    (a.out / f"advise_gpu_{stem}.json").write_text(json.dumps(out, indent=1))
    lines = [f"| arm | measured ms/step | predicted ms/step | measured saving % | predicted saving % | median err/step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = per_arm[r["arm"]]
        lines.append(f"| {r['arm']} | {d['measured_ms']:.3f} | {d['predicted_ms']:.3f} | {d['measured_saving_pct']:+.1f} "
                     f"| {d['predicted_saving_pct']:+.1f} | {r['median_err_step']:.1%} |")
    lines.append(f"\nranking by measured saving {rank_m}; by predicted {rank_p}; equal: {rank_m == rank_p}")
    (a.out / f"advise_gpu_{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
