"""The figure of a run and its printed summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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



def report(result: dict, modes: list[str], args, cfg, total: int, out_dir: Path, stem: str) -> None:
    """The figure of the last mode and the printed summary."""
    per_mode, hooks = result["modes"], result["hook_timing"]
    s0 = per_mode[modes[-1]]["summary"]
    if s0["n_pairs"] >= 2:
        title = (f"LoadTracer overhead, {cfg.name} on {result['device_name']}, {modes[-1]}, flush_every={args.flush_every}: "
                 f"{s0['overhead_pct']:+.2f} % (95 % CI {s0['overhead_ci95_pct'][0]:+.2f} .. {s0['overhead_ci95_pct'][1]:+.2f})")
        figure(np.asarray(per_mode[modes[-1]]["traced_s"]), np.asarray(per_mode[modes[-1]]["plain_s"]), s0, title,
               out_dir / f"{stem}.png")
    print(f"config {cfg.name}, device {args.device} ({result['device_name']}), torch {torch.__version__}, mode {args.mode} "
          f"(arms in {result['arms_in']}), experts {args.experts}, flush_every {args.flush_every}")
    spent = {k.removesuffix("_s").replace("_", " "): v for k, v in result.items()
             if k.endswith("_s") and k not in ("wall_s", "budget_s", "deadline_s") and isinstance(v, float)}
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in {**spent, "all": result["wall_s"]}.items()))
    for mode in modes:
        s = per_mode[mode]["summary"]
        print(f" {mode}: {s['n_pairs']} step pairs" + (f" (stopped: {result['stopped'][mode]})" if mode in result["stopped"] else ""))
        if s["n_pairs"] < 2:
            continue
        print(f"  without tracer: mean {1e3 * s['plain_mean_s']:.2f} ms, median {1e3 * s['plain_median_s']:.2f} ms")
        print(f"  with tracer:    mean {1e3 * s['traced_mean_s']:.2f} ms, median {1e3 * s['traced_median_s']:.2f} ms")
        print(f"  overhead: {s['overhead_pct']:+.2f} % (95 % CI {s['overhead_ci95_pct'][0]:+.2f} .. "
              f"{s['overhead_ci95_pct'][1]:+.2f} %), medians {s['overhead_median_pct']:+.2f} %")
        if "steady" in s:
            st = s["steady"]
            print(f"  without the {st['pairs_left_out']} pairs in which an arm compiled (steps {st['steps_left_out'][:6]}"
                  f"{' ...' if len(st['steps_left_out']) > 6 else ''}): {st['overhead_pct']:+.2f} % (95 % CI "
                  f"{st['overhead_ci95_pct'][0]:+.2f} .. {st['overhead_ci95_pct'][1]:+.2f} %), medians "
                  f"{st['overhead_median_pct']:+.2f} %, plain median {1e3 * st['plain_median_s']:.2f} ms")
        steps_run = args.warmup + s["n_pairs"]
        print(f"  counts exact: {'yes' if per_mode[mode]['counts_exact'] else 'NO'} "
              f"({steps_run} steps x {len(cfg.moe_layers)} layers: tokens = {result['tokens_per_step']}, "
              f"sum of counts = tokens x top_k {cfg.top_k})")
        if mode == "eager" and hooks is not None:
            print(f"  hook: {hooks['hook_us']:.1f} us per gate forward (router forward {hooks['router_forward_us']:.1f} us) "
                  f"x {len(cfg.moe_layers)} MoE layers = {s['hook_estimate_pct']:.3f} % of a median plain step")
    if result["dynamo"] is not None:
        for name, d in result["dynamo"].items():
            w, e = d["at"]["after_warmup"], d["at"]["end"]
            print(f" dynamo, {name} worker: {w['graphs']} graphs, {w['graph_breaks']} graph breaks, {w['recompiles']} "
                  f"recompiles in the warm-up; {e['graphs'] - w['graphs']} graphs, {e['graph_breaks'] - w['graph_breaks']} "
                  f"graph breaks, {e['recompiles'] - w['recompiles']} recompiles while measured; "
                  f"{e['recompile_limit_hits']} frames hit the recompile limit (run eager from then on)")
            for reason, n in d["graph_break_reasons"].items():
                print(f"    graph break x{n}: {reason}")
            for hit in d["recompile_limit_hits"]:
                print(f"    {hit}")
            for phase, reasons in d["recompile_reasons"].items():
                for reason in reasons:
                    print(f"    recompile ({phase}): {reason}")
    print(f"  wrote {out_dir / stem}.json and .png")
    if result.get("failed"):
        print("!" * 72 + "\nFAILED: counts not exact, or dynamo compiled while measured\n" +
              "\n".join(f"  {f}" for f in result["failed"]) + "\n" + "!" * 72, flush=True)
    if not result["complete"]:
        print("INCOMPLETE: " + "; ".join(f"{m}: {r}" for m, r in result["stopped"].items()), flush=True)
