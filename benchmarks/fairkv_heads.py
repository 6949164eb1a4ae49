"""FairKV on real attention: Ada-KV per-head budgets of a trained MoE GPT, heads onto TP ranks.

Trains the embedded workload (`cpu-demo`, with `--heads` attention heads) for a short while on CPU,
takes the attention weights of a few validation sequences, derives Ada-KV budgets per head
(summed over the sequences, as in a decode batch) and prints max / mean rank load for TP 2, 4, 8
under standard TP, FairKV best-effort, Fair-Copying, moeload's balanced policy and the MILP optimum.

    .venv/bin/python benchmarks/fairkv_heads.py --steps 300 --out docs/figures/fairkv_heads.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def trained_budgets(
    steps: int, heads: int, budget: int, sequences: int, seed: int, device: str = "cpu"
) -> np.ndarray:
    """Budgets [L, H] summed over `sequences` validation sequences of a model trained `steps` steps."""
    import torch

    from moeload import workloads
    from moeload.placement import adakv_budgets

    torch.manual_seed(seed)
    cfg = workloads.WorkloadConfig.from_name("cpu-demo", n_heads=heads)
    result = workloads.train(cfg, steps=steps, seed=seed, device=device, progress=False)
    x, _ = next(workloads.batches(cfg, seed + 1, device, split_name="val"))
    total = 0
    for i in range(min(sequences, x.shape[0])):
        maps = workloads.attention_maps(result.model, x[i]).cpu().numpy()
        total = total + adakv_budgets(maps, budget)
    print(f"trained cpu-demo ({heads} heads) {steps} steps in {result.wall_s:.0f} s, "
          f"final LM loss {result.lm_losses[-10:].mean():.3f}")
    return np.asarray(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--budget", type=int, default=32, help="mean KV budget per head (keys of 128)")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/figures/fairkv_heads.png"))
    ap.add_argument("--save-budgets", type=Path, help="write the [L, H] budgets as .npy")
    ap.add_argument("--budgets", type=Path, help="read [L, H] budgets from .npy instead of training")
    args = ap.parse_args()

    from moeload.placement import head_placement_table

    start = time.perf_counter()
    if args.budgets:
        budgets = np.load(args.budgets)
    else:
        budgets = trained_budgets(args.steps, args.heads, args.budget, args.sequences, args.seed)
    if args.save_budgets:
        np.save(args.save_budgets, budgets)
    print("per-head budgets (rows = layers):")
    print(budgets)
    table = head_placement_table(budgets, (2, 4, 8))
    print(table.pivot(index="strategy", columns="tp", values="imbalance_mean").round(3).to_string())
    print(f"total {time.perf_counter() - start:.0f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    pivot = table.pivot(index="tp", columns="strategy", values="imbalance_mean")
    order = [s for s in ("standard", "best_effort", "fair_copying", "balanced", "exact") if s in pivot]
    pivot[order].plot.bar(ax=ax, rot=0)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.95, max(1.05, float(pivot.to_numpy().max()) + 0.05))
    ax.set_xlabel("tensor-parallel size")
    ax.set_ylabel("max / mean rank load (mean over layers)")
    ax.set_title(f"Ada-KV budgets of a trained MoE GPT ({args.heads} heads)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
