"""Measured vs simulated speedup of placement plans on real GPUs (one process per GPU).

(a) MoE: E experts of one traced layer spread over the ranks; each measured step routes the
    trace's counts of that step (scaled to --tokens-per-step assignments) and every rank runs its
    slots' expert FFN GEMMs for the tokens they receive. Step time = slowest rank (CUDA events).
    Contiguous placement (expert e on rank e // (E / G)) vs `--policy` planned from the mean of the
    --window steps before the measured ones, with --extra-per-gpu replica slots per rank.
(b) Decode attention: per-head KV lengths from Ada-KV budgets of the trained embedded model (or
    --head-budgets FILE.npy, [L, H]); each rank runs one decode step of its heads (SDPA, q length
    1, --batch sequences; a copied head serves its share of the sequences). Standard TP
    (contiguous heads) vs Fair-Copying (one extra head slot per rank, uneven split). With the
    defaults (8 heads, 4 layers, KV 8192, batch 128) the KV tensors of both plans take ~34 GB in
    all, split over the ranks.
Both print the measured speedup next to the simulator's prediction (max rank load ratio) and write
results.json and results.md to --out.

    torchrun --nproc_per_node 4 benchmarks/placement_gpu.py --trace runs/x.moeload --out $OUT
    torchrun --nproc_per_node 2 benchmarks/placement_gpu.py --device cpu --tiny --out /tmp/o ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, help="a .moeload trace directory (counts [S, L, E])")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for CPU smoke tests")
    ap.add_argument("--layer", type=int, default=-1, help="traced layer; -1: most imbalanced under contiguous")
    ap.add_argument("--steps", type=int, default=100, help="measured steps (the last ones of the trace)")
    ap.add_argument("--window", type=int, default=200, help="history steps the plan is made from")
    ap.add_argument("--policy", default="balanced")
    ap.add_argument("--extra-per-gpu", type=int, default=1)
    ap.add_argument("--tokens-per-step", type=int, default=65536, help="routed assignments per step")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2816)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--head-budgets", type=Path, help="[L, H] .npy; default: train the embedded model")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--kv-mean", type=int, default=8192, help="mean KV length per head")
    ap.add_argument("--batch", type=int, default=128, help="decode sequences (big enough that each "
                    "head's kernel is memory-bound, not launch-bound)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--attn-iters", type=int, default=30)
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--skip-attn", action="store_true")
    args = ap.parse_args(argv)
    if args.tiny:
        args.tokens_per_step, args.d_model, args.d_ff = 512, 32, 64
        args.kv_mean, args.batch, args.head_dim, args.train_steps = 64, 4, 16, 5
        args.steps, args.window, args.attn_iters, args.warmup = min(args.steps, 6), min(args.window, 20), 3, 1
    return args


def split_counts(total: np.ndarray, phy2log: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Integer work per slot: `total: [T, E]` ints, `phy2log, share: [R]` -> `[T, R]` ints.

    Each unit's count is divided among its slots by `share`, largest remainders first, so the
    slots of a unit add up exactly to its count.
    """
    exact = total[:, phy2log] * share  # [T, R]
    out = np.floor(exact).astype(np.int64)
    for e in np.unique(phy2log):
        cols = np.flatnonzero(phy2log == e)
        missing = total[:, e] - out[:, cols].sum(1)
        order = np.argsort(-(exact[:, cols] - out[:, cols]), axis=1, kind="stable")
        for t in np.flatnonzero(missing > 0):
            out[t, cols[order[t, : missing[t]]]] += 1
    return out


def rank_max(work: np.ndarray, num_gpus: int) -> np.ndarray:
    """`work: [..., R]` per slot -> `[...]` the busiest rank's work."""
    return work.reshape(work.shape[:-1] + (num_gpus, -1)).sum(-1).max(-1)


class Clock:
    """Wall time of a region on one device: CUDA events, or perf_counter on CPU."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        if self.cuda:
            self.a, self.b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t0) * 1e3


def barrier(dist, device) -> None:
    """Line the ranks up before a timed region."""
    dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def gather_max(torch, dist, times: list[float], device) -> np.ndarray:
    """Per-rank lists of equal length -> [n] max over ranks."""
    t = torch.tensor(times, dtype=torch.float64, device=device)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts).max(0).values.cpu().numpy()


def load_counts(args) -> np.ndarray:
    """Routed counts [S, L, E] from --trace."""
    from moeload import open_trace

    if args.trace is None:
        raise SystemExit("--trace is required for the MoE benchmark (or pass --skip-moe)")
    return open_trace(args.trace).counts().astype(np.float64)


def moe_bench(args, torch, dist, device) -> dict:
    from moeload import placement

    world, rank = dist.get_world_size(), dist.get_rank()
    counts = load_counts(args)
    num_steps, _, num_experts = counts.shape
    steps = min(args.steps, num_steps - 1)
    hist = counts[max(0, num_steps - steps - args.window) : num_steps - steps]
    future = counts[num_steps - steps :]
    layer = args.layer
    if layer < 0:
        contiguous_all = placement.plan(np.ones(counts.shape[1:]), world, num_experts, "contiguous")
        layer = int(np.argmax(contiguous_all.evaluate(future).imbalance.mean(0)))
    weight = hist[:, layer].mean(0)
    opts = {"samples": hist[:, [layer]]} if "samples" in placement.options(args.policy) else {}
    plans = {
        "contiguous": placement.plan(weight, world, num_experts, "contiguous"),
        args.policy: placement.plan(weight, world, num_experts + args.extra_per_gpu * world, args.policy, **opts),
    }
    rows = future[:, layer]
    totals = np.rint(rows / np.maximum(rows.sum(1, keepdims=True), 1) * args.tokens_per_step).astype(np.int64)
    work = {k: split_counts(totals, p.phy2log[0], p.share[0]) for k, p in plans.items()}
    torch.manual_seed(rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = dict(device=device, dtype=dtype)  # generated on the device: no host copies of big tensors
    x = torch.randn(int(max(w.max() for w in work.values())) + 1, args.d_model, **new)
    per_gpu = {k: p.slots_per_gpu for k, p in plans.items()}
    n_weights = max(per_gpu.values())
    w1 = [torch.randn(args.d_model, args.d_ff, **new) * 0.02 for _ in range(n_weights)]
    w2 = [torch.randn(args.d_ff, args.d_model, **new) * 0.02 for _ in range(n_weights)]
    clock = Clock(torch, device)

    def run(step: int, name: str) -> float:
        mine = work[name][step, rank * per_gpu[name] : (rank + 1) * per_gpu[name]]
        barrier(dist, device)
        clock.start()
        for i, n in enumerate(mine):
            if n:
                torch.nn.functional.silu(x[:n] @ w1[i]) @ w2[i]
        return clock.stop_ms()

    for step in range(min(args.warmup, steps)):
        for name in plans:
            run(step, name)
    times = {name: [] for name in plans}
    for step in range(steps):
        for name in plans:  # interleaved, so drift in clocks affects both plans alike
            times[name].append(run(step, name))
    step_ms = {name: gather_max(torch, dist, t, device) for name, t in times.items()}
    base, planned = "contiguous", args.policy
    predicted = rank_max(work[base], world).mean() / rank_max(work[planned], world).mean()
    return {
        "layer": layer, "num_experts": num_experts, "ranks": world, "steps": steps,
        "tokens_per_step": args.tokens_per_step, "d_model": args.d_model, "d_ff": args.d_ff,
        "num_replicas": {k: p.num_replicas for k, p in plans.items()},
        "planned_imbalance": {k: float(p.imbalance[0]) for k, p in plans.items()},
        "realised_imbalance": {k: float(p.evaluate(future[:, layer][:, None]).imbalance.mean())
                               for k, p in plans.items()},
        "step_ms": {k: float(v.mean()) for k, v in step_ms.items()},
        "measured_speedup": float(step_ms[base].mean() / step_ms[planned].mean()),
        "predicted_speedup": float(predicted),
    }


def head_budgets(args, torch, dist, device) -> np.ndarray:
    """[L, H] Ada-KV budgets: from --head-budgets, else rank 0 trains the embedded model."""
    if args.head_budgets is not None:
        return np.load(args.head_budgets)
    shape = torch.zeros(2, dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fairkv_heads import trained_budgets

        budgets = trained_budgets(args.train_steps, 8, 32, 8, 0, device=str(device))
        shape[:] = torch.tensor(budgets.shape)
    dist.broadcast(shape, 0)
    flat = torch.zeros(int(shape.prod()), dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        flat[:] = torch.from_numpy(budgets.reshape(-1)).to(device)
    dist.broadcast(flat, 0)
    return flat.cpu().numpy().reshape(tuple(shape.tolist()))


def attn_bench(args, torch, dist, device) -> dict:
    from moeload import placement

    world, rank = dist.get_world_size(), dist.get_rank()
    budgets = head_budgets(args, torch, dist, device).astype(np.float64)
    num_layers, num_heads = budgets.shape
    kv = np.maximum(np.rint(budgets / budgets.mean() * args.kv_mean), 1).astype(np.int64)  # [L, H]
    plans = {
        "standard_tp": placement.plan(kv, world, num_heads, "contiguous"),
        "fair_copying": placement.plan(kv, world, num_heads + world, "fair_copying"),
    }
    seqs = {k: np.stack([split_counts(np.full((1, num_heads), args.batch), p.phy2log[i], p.share[i])[0]
                         for i in range(num_layers)]) for k, p in plans.items()}  # [L, R] sequences
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(rank)
    new = dict(device=device, dtype=dtype)
    tensors = {}
    for name, p in plans.items():
        slots = p.slots_per_gpu
        per_layer = []
        for layer in range(num_layers):
            mine = []
            for s in range(rank * slots, (rank + 1) * slots):
                n, length = int(seqs[name][layer, s]), int(kv[layer, p.phy2log[layer, s]])
                if n:
                    q = torch.randn(n, 1, 1, args.head_dim, **new)
                    k = torch.randn(n, 1, length, args.head_dim, **new)
                    mine.append((q, k, torch.randn_like(k)))
            per_layer.append(mine)
        tensors[name] = per_layer
    clock = Clock(torch, device)
    times = {name: [] for name in plans}  # [iters * L] per rank
    for it in range(args.warmup + args.attn_iters):
        for name in plans:
            for layer in range(num_layers):
                barrier(dist, device)
                clock.start()
                for q, k, v in tensors[name][layer]:
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                ms = clock.stop_ms()
                if it >= args.warmup:
                    times[name].append(ms)
    step_ms = {k: gather_max(torch, dist, t, device).reshape(args.attn_iters, num_layers).sum(1)
               for k, t in times.items()}
    load = {k: sum(rank_max(seqs[k][i] * kv[i, p.phy2log[i]], world) for i in range(num_layers))
            for k, p in plans.items()}
    return {
        "layers": num_layers, "heads": num_heads, "ranks": world, "batch": args.batch, "kv_mean": args.kv_mean,
        "kv_lengths": kv.tolist(),
        "imbalance": {k: float(p.imbalance.mean()) for k, p in plans.items()},
        "step_ms": {k: float(v.mean()) for k, v in step_ms.items()},
        "measured_speedup": float(step_ms["standard_tp"].mean() / step_ms["fair_copying"].mean()),
        "predicted_speedup": float(load["standard_tp"] / load["fair_copying"]),
    }


def markdown(results: dict) -> str:
    lines = ["| benchmark | baseline | planned | baseline ms | planned ms | measured speedup | predicted speedup |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if not isinstance(r, dict) or "step_ms" not in r:
            continue
        (b, bm), (p, pm) = list(r["step_ms"].items())
        lines.append(f"| {name} | {b} | {p} | {bm:.3f} | {pm:.3f} | {r['measured_speedup']:.3f} | "
                     f"{r['predicted_speedup']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    start = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "world_size": dist.get_world_size()}
    try:
        if not args.skip_moe:
            results["moe"] = moe_bench(args, torch, dist, device)
        if not args.skip_attn:
            results["attention"] = attn_bench(args, torch, dist, device)
        results["wall_s"] = time.perf_counter() - start
        if dist.get_rank() == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
            (args.out / "results.md").write_text(markdown(results))
            print(json.dumps({k: v for k, v in results.items() if k != "attention"}, indent=1))
            print(markdown(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
