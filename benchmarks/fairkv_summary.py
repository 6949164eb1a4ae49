"""Summarise `fairkv_decode.py` runs: where Fair-Copying pays, and why the measured gain is smaller.

Reads the JSON files that `benchmarks/fairkv_decode.py` wrote. For each run and TP size it puts
three speedups over standard TP side by side: the simulator's (time proportional to KV, what
`Placement.imbalance` says), the cost model's (`moeload.placement.heads.DecodeCost`: a fixed cost
per rank and per head copy plus bytes / bandwidth, `head_decode_table`), and the measured one. It
checks, for every TP size where a predictor expects a gain >= 10 %, whether the strategy that
predictor picks is the measured fastest (within 2 % of it), refits `DecodeCost` per kernel from
the per-rank times, and draws measured against predicted speedup.

    python benchmarks/fairkv_summary.py docs/gpu-runs/fairkv/fairkv_*.json --out docs/figures/fairkv_decode_gpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIE = 0.02  # measured speedups within 2 % of the fastest count as fastest (run-to-run noise is ~1-2 %)


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if "rows" not in d or "config" not in d or "kv_lengths" not in d:
            raise SystemExit(f"{p}: not a fairkv_decode.py result (no rows/config/kv_lengths)")
        d["_name"] = Path(p).stem
        runs.append(d)
    return runs


def fit_kernel(runs: list[dict], kernel: str):
    """DecodeCost fitted on every (row, layer, rank) of one kernel (dense: a call per head copy)."""
    from moeload.placement.heads import DecodeCost

    work, slots, secs = [], [], []
    for d in runs:
        for r in d["rows"]:
            if r["kernel"] != kernel or r["rank_ms"] is None:
                continue
            w = np.asarray(r["rank_work"], dtype=float)
            s = np.asarray(r.get("rank_slots", np.full(w.shape, r["slots"] / r["tp"])), dtype=float)
            work.append(w.ravel())
            slots.append(s.ravel() if kernel == "dense" else np.ones(w.size))
            secs.append(np.asarray(r["rank_ms"], dtype=float).ravel() * 1e-3)
    if not work:
        return None
    return DecodeCost.fit(np.concatenate(work), np.concatenate(slots), np.concatenate(secs),
                          head_dim=runs[0]["config"]["head_dim"])


def compare(d: dict, kernel: str, cost) -> list[dict]:
    """Rows of one run and kernel: simulator, cost model and measured speedup per TP and strategy."""
    from moeload.placement.heads import head_decode_table

    c = d["config"]
    model = head_decode_table(np.asarray(d["kv_lengths"]), c["batch"], tuple(c["tp"]), cost=cost,
                              extra_per_gpu=c["extra_per_gpu"],
                              exact_time_limit=c["exact_time_limit"] if c["exact_time_limit"] > 0 else None)
    measured = {(r["tp"], r["strategy"]): r for r in d["rows"] if r["kernel"] == kernel}
    out = []
    for m in model.itertuples():
        r = measured.get((m.tp, m.strategy))
        if r is None or r["measured_speedup"] is None:
            continue
        out.append({"tp": m.tp, "strategy": m.strategy, "sim": m.sim_speedup, "model": m.speedup,
                    "measured": r["measured_speedup"], "step_ms": r["step_ms"], "gb": r["max_rank_kv_gb"]})
    return out


def agreement(rows: list[dict], key: str) -> list[tuple[int, str, bool]]:
    """Per TP where `key` predicts a gain >= 10 %: (tp, its pick, pick measured fastest within TIE)."""
    res = []
    for tp in sorted({r["tp"] for r in rows}):
        rr = [r for r in rows if r["tp"] == tp]
        pick = max(rr, key=lambda r: r[key])
        if pick[key] < 1.10:
            continue
        best = max(r["measured"] for r in rr)
        res.append((tp, pick["strategy"], pick["measured"] >= best * (1 - TIE)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="fairkv_decode.py JSON files")
    ap.add_argument("--kernel", default="dense", help="the kernel whose times are compared (dense, flex, nested)")
    ap.add_argument("--out", default=None, help="figure (png): measured vs predicted speedup")
    args = ap.parse_args()
    from moeload.placement.heads import DecodeCost

    runs = load_runs(args.runs)
    for k in ("dense", "flex", "nested"):
        fit = fit_kernel(runs, k)
        if fit is not None:
            print(f"{k}: fitted t = {fit.fixed_s * 1e6:.1f} us + {fit.per_slot_s * 1e6:.1f} us per call + "
                  f"bytes / {fit.bandwidth / 1e9:.0f} GB/s")
    cost = DecodeCost()
    print(f"cost model used below (moeload's default, fit on two of these runs): {cost}\n")
    points: dict[str, list[tuple[float, float]]] = {"sim": [], "model": []}
    score = {"sim": [0, 0], "model": [0, 0]}
    for d in runs:
        c = d["config"]
        rows = compare(d, args.kernel, cost)
        source = f"budgets {Path(c['budgets']).name}" if c.get("budgets") else f"skew {c['skew']}"
        print(f"{d['_name']}: {source}, batch {c['batch']}, kv-mean {c['kv_mean']}, {len(d['kv_lengths'])} layers, "
              f"{c['q_heads']}/{c['kv_heads']} heads x {c['head_dim']}, kernel {args.kernel}\n")
        print("| TP | strategy | simulator | cost model | measured | step ms | slowest rank GB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['tp']} | {r['strategy']} | {r['sim']:.3f} | {r['model']:.3f} | {r['measured']:.3f} | "
                  f"{r['step_ms']:.3f} | {r['gb']:.2f} |")
            if r["strategy"] != "standard":
                points["sim"].append((r["sim"], r["measured"]))
                points["model"].append((r["model"], r["measured"]))
        for key in ("sim", "model"):
            for tp, pick, ok in agreement(rows, key):
                score[key][0] += ok
                score[key][1] += 1
                print(f"  {key}: TP {tp} picks {pick}: {'measured fastest' if ok else 'NOT the measured fastest'}")
        print()
    for key, (ok, n) in score.items():
        print(f"{key}: its pick is the measured fastest (within {TIE:.0%}) in {ok} of {n} cases with a predicted gain >= 10 %")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.3), sharey=True)
        for ax, key, title in zip(axes, ("sim", "model"), ("simulator\n(time proportional to KV)",
                                                         "cost model\n(per-call cost + bytes / bandwidth)")):
            x, y = zip(*points[key])
            ax.scatter(x, y, s=14, alpha=0.7)
            hi = max(max(x), max(y)) * 1.03
            ax.plot([0.95, hi], [0.95, hi], "k--", lw=0.8, label="measured = predicted")
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xlabel(f"predicted speedup over standard TP, {title}")
            ax.set_title(f"{key}: pick right in {score[key][0]} of {score[key][1]}", fontsize=10)
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"measured speedup (one H200, {args.kernel} SDPA)")
        fig.suptitle("FairKV head plans, decode attention at 64 / 8 heads x 128, TP 2 / 4 / 8", fontsize=11)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
