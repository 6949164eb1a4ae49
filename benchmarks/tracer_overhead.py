"""Step time of the embedded MoE workload with and without LoadTracer, measured in the same run.

Two identical models (same seed, same batches, same optimizer) are stepped alternately in blocks of
``--block`` steps, in ABBA order: one has a LoadTracer attached, the other has none. Every step is timed on its own
(``torch.cuda.synchronize`` before and after on CUDA, for both arms alike), so machine noise hits
both arms equally and the overhead is a mean of paired differences:

    overhead % = mean(t_traced - t_plain) / mean(t_plain) * 100, with a 95 % t-interval.

The tracer's flushes (every ``--flush-every`` steps) fall inside the timed steps. Writes
``tracer_overhead_<config>_<device>.json`` and ``.png`` to ``--out``.

    python benchmarks/tracer_overhead.py --device cpu --config cpu-demo --steps 60
    python benchmarks/tracer_overhead.py --device cuda --config gpt3-small-moe --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def build(cfg, device: torch.device, steps: int, seed: int):
    from moeload.workloads import build_model
    from moeload.workloads.train import make_optimizer

    model = build_model(cfg, seed, device)
    model.train()
    opt, sched = make_optimizer(model, cfg, steps)
    return model, opt, sched


def make_step(cfg, model, opt, sched, device: torch.device, micro: int):
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()

    def step(batch_list) -> None:
        for x, y in batch_list:
            with amp:
                out = model(x, y)
            (out.loss / micro).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def hook_cost(hooked, bare, x: torch.Tensor, device: torch.device, rounds: int = 30, calls: int = 50) -> dict:
    """Per-forward cost of the tracer's hook: the same router forward with and without it, interleaved.

    hooked, bare: routers with identical weights, `hooked` under a running LoadTracer; x: [T, H].
    """
    per = {"hooked": [], "bare": []}
    with torch.no_grad():
        for r in range(rounds):
            for name, mod in [("hooked", hooked), ("bare", bare)][:: 1 if r % 2 == 0 else -1]:
                dt = timed(lambda: [mod(x) for _ in range(calls)], device)
                per[name].append(dt / calls)
    h, b = np.median(per["hooked"]), np.median(per["bare"])
    return {"router_forward_us": float(1e6 * b), "hook_us": float(1e6 * (h - b)), "rounds": rounds, "calls": calls}


def summarize(traced: np.ndarray, plain: np.ndarray) -> dict:
    """traced, plain: [n] paired step times (s) -> means, medians, overhead % with a 95 % t-interval."""
    from scipy import stats

    d = traced - plain
    n = len(d)
    base = plain.mean()
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "n_pairs": n,
        "traced_mean_s": float(traced.mean()),
        "plain_mean_s": float(base),
        "traced_median_s": float(np.median(traced)),
        "plain_median_s": float(np.median(plain)),
        "overhead_pct": float(100 * d.mean() / base),
        "overhead_ci95_pct": [float(100 * (d.mean() - half) / base), float(100 * (d.mean() + half) / base)],
        "overhead_median_pct": float(100 * (np.median(traced) - np.median(plain)) / np.median(plain)),
    }


def figure(traced: np.ndarray, plain: np.ndarray, summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(1e3 * plain, ".", ms=3, label="without tracer")
    a.plot(1e3 * traced, ".", ms=3, label="with tracer")
    a.set_xlabel("measured step (pairs in order)")
    a.set_ylabel("step time (ms)")
    a.legend()
    d = 100 * (traced - plain) / plain.mean()
    b.hist(d, bins=min(40, max(5, len(d) // 4)), color="gray")
    b.axvline(summary["overhead_pct"], color="k", label=f"mean {summary['overhead_pct']:+.2f} %")
    lo, hi = summary["overhead_ci95_pct"]
    b.axvspan(lo, hi, color="C1", alpha=0.3, label=f"95 % CI [{lo:+.2f}, {hi:+.2f}] %")
    b.set_xlabel("paired difference (% of mean plain step)")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="workload config (default: cpu-demo on cpu, gpt3-small-moe on cuda)")
    ap.add_argument("--steps", type=int, default=60, help="measured steps per arm")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per arm first")
    ap.add_argument("--block", type=int, default=1, help="steps of one arm before switching to the other")
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/figures/")
    args = ap.parse_args(argv)

    from moeload import LoadTracer, open_trace
    from moeload.workloads import batches, get_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cfg = get_config(args.config or ("cpu-demo" if device.type == "cpu" else "gpt3-small-moe"))
    total = args.warmup + args.steps
    data = batches(cfg, args.seed, device)
    # the same batches for both arms, made before timing so data loading is not measured
    steps_data = [[next(data) for _ in range(args.micro_batches)] for _ in range(total)]
    traced_model, *rest_t = build(cfg, device, total, args.seed)
    plain_model, *rest_p = build(cfg, device, total, args.seed)
    step_t = make_step(cfg, traced_model, *rest_t, device, args.micro_batches)
    step_p = make_step(cfg, plain_model, *rest_p, device, args.micro_batches)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    times = {"traced": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "bench.moeload"
        tracer = LoadTracer(traced_model, trace_path, flush_every=args.flush_every).start()

        def traced_step(b):
            step_t(b)
            tracer.step()

        arms = [("traced", traced_step), ("plain", step_p)]
        t_start = time.perf_counter()
        for r, start in enumerate(range(0, total, args.block)):
            for name, fn in arms if r % 2 == 0 else arms[::-1]:  # ABBA: neither arm always runs first
                for j in range(start, min(start + args.block, total)):
                    dt = timed(lambda: fn(steps_data[j]), device)
                    if j >= args.warmup:
                        times[name].append(dt)
        wall = time.perf_counter() - t_start
        tracer.close()
        t = open_trace(trace_path)
        assert len(t.steps) == total and not tracer.errors, tracer.errors
        trace_bytes = t.size_bytes

    # the hook's cost per gate forward, measured apart from the noise of whole steps
    probe = LoadTracer(plain_model, sink=lambda block: None, flush_every=10**6).start()
    with torch.no_grad():
        x = plain_model.blocks[cfg.moe_layers[0]].ln2(plain_model.embed(steps_data[0][0][0])).reshape(-1, cfg.d_model)
    hooks = hook_cost(plain_model.routers()[probe.layers[0]], traced_model.routers()[probe.layers[0]], x, device)
    probe.close()

    traced, plain = np.asarray(times["traced"]), np.asarray(times["plain"])
    summary = summarize(traced, plain)
    summary["hook_us_per_gate_forward"] = hooks["hook_us"]
    summary["hook_estimate_pct"] = float(
        100 * hooks["hook_us"] * 1e-6 * len(cfg.moe_layers) * args.micro_batches / summary["plain_median_s"]
    )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {
        "config": cfg.name,
        "device": args.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "flush_every": args.flush_every,
        "micro_batches": args.micro_batches,
        "tokens_per_step": cfg.tokens_per_batch * args.micro_batches,
        "moe_layers": len(cfg.moe_layers),
        "experts": cfg.n_experts,
        "trace_bytes": trace_bytes,
        "wall_s": wall,
        "summary": summary,
        "hook_timing": hooks,
        "traced_s": traced.tolist(),
        "plain_s": plain.tolist(),
    }
    stem = f"tracer_overhead_{cfg.name}_{args.device}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"LoadTracer overhead, {cfg.name} on {dev_name}, flush_every={args.flush_every}: "
             f"{summary['overhead_pct']:+.2f} % (95 % CI {summary['overhead_ci95_pct'][0]:+.2f} .. {summary['overhead_ci95_pct'][1]:+.2f})")
    figure(traced, plain, summary, title, out_dir / f"{stem}.png")
    s = summary
    print(f"config {cfg.name}, device {args.device} ({dev_name}), {s['n_pairs']} step pairs, flush_every {args.flush_every}")
    print(f"  without tracer: mean {1e3 * s['plain_mean_s']:.2f} ms, median {1e3 * s['plain_median_s']:.2f} ms")
    print(f"  with tracer:    mean {1e3 * s['traced_mean_s']:.2f} ms, median {1e3 * s['traced_median_s']:.2f} ms")
    print(f"  overhead: {s['overhead_pct']:+.2f} % (95 % CI {s['overhead_ci95_pct'][0]:+.2f} .. {s['overhead_ci95_pct'][1]:+.2f} %), "
          f"medians {s['overhead_median_pct']:+.2f} %")
    print(f"  hook: {hooks['hook_us']:.1f} us per gate forward (router forward {hooks['router_forward_us']:.1f} us) "
          f"x {len(cfg.moe_layers)} MoE layers = {s['hook_estimate_pct']:.3f} % of a median plain step")
    print(f"  wrote {out_dir / stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
