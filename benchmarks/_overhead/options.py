"""The command line of benchmarks/tracer_overhead.py: `parse` (also run by each worker process)."""

from __future__ import annotations

import argparse

DESCRIPTION = "Step time of the embedded MoE workload with and without LoadTracer, measured in the same run."


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="workload config (default: cpu-demo on cpu, gpt3-small-moe on cuda)")
    ap.add_argument("--mode", default=None, choices=["eager", "compiled", "both"], help="default: eager")
    ap.add_argument("--compile", action="store_true", help="same as --mode compiled")
    ap.add_argument("--steps", type=int, default=60, help="measured steps per arm (and mode)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per arm first (they compile)")
    ap.add_argument("--block", type=int, default=1, help="steps of one arm before switching to the other")
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--hook-rounds", type=int, default=30, help="rounds of the per-gate-forward hook timing (eager)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", default="auto", choices=["auto", "loop", "grouped"],
                    help="MoE FFN: the workload's per-expert loop, or train_long's GroupedMoE (static shapes); "
                         "auto: grouped where a mode compiles, else loop")
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="router capacity factor (default: the config's; for grouped experts without one, 1.25)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: same dynamo, quick, for tests)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="seconds of measured steps per mode; a mode over it stops (0: no limit)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="seconds since the start after which every mode stops measuring (0: none); then the "
                         "tracers close and counts are checked (allow ~30 s before a hard limit)")
    ap.add_argument("--save-every", type=float, default=30.0, help="seconds between progress lines and partial JSON saves")
    ap.add_argument("--out", default="docs/figures/")
    args = ap.parse_args(argv)
    if args.compile and args.mode not in (None, "compiled"):
        ap.error(f"--compile with --mode {args.mode}: give one of them")
    args.mode = "compiled" if args.compile else (args.mode or "eager")
    if args.experts == "auto":
        args.experts = "loop" if args.mode == "eager" else "grouped"
    bad = [f"{k} {v}" for k, v in (("--steps", args.steps), ("--block", args.block), ("--save-every", args.save_every))
           if v <= 0] + [f"{k} {v}" for k, v in (("--warmup", args.warmup), ("--budget-s", args.budget_s),
                                                                        ("--deadline-s", args.deadline_s)) if v < 0]
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        bad.append(f"--capacity-factor {args.capacity_factor}")
    if bad:
        ap.error(f"{', '.join(bad)}: out of range (steps, block, save-every > 0; warmup, budget-s, deadline-s >= 0; "
                 "capacity factor > 0)")
    return args
