"""The result of a run: the JSON (`compose`, written by `save`), the progress lines and the exit code."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .schedule import Progress
from .timing import summarize


def save(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def compose(args, cfg, modes: list[str], prog: Progress, done: dict | None, dev_name: str, wall: float,
            error: str | None) -> dict:
    """The result so far: per mode the paired summary, and with `done` (the arms' finish reports) the count
    checks, hook timing and dynamo statistics; "failed" lists count, compile and recompile failures."""
    hooks = done["traced"]["hook_timing"] if done else None
    per_mode, failures = {}, []
    for mode in modes:
        n = prog.pairs(mode)
        traced, plain = (np.asarray(prog.times[mode][a][:n]) for a in ("traced", "plain"))
        s = summarize(traced, plain) if n >= 2 else {"n_pairs": n}
        if mode == "eager" and hooks is not None and n >= 2:
            s["hook_us_per_gate_forward"] = hooks["hook_us"]
            s["hook_estimate_pct"] = float(
                100 * hooks["hook_us"] * 1e-6 * len(cfg.moe_layers) * args.micro_batches / s["plain_median_s"])
        # steps in which either arm compiled: their pairs hold compile time, so the steady state leaves them out
        hot = sorted(j for j in prog.compiled[mode] if j >= args.warmup)
        keep = np.ones(n, bool)
        keep[[j - args.warmup for j in hot if j - args.warmup < n]] = False
        if hot and keep.sum() > 1:
            s["steady"] = {"pairs_left_out": int(n - keep.sum()), "steps_left_out": hot,
                           **summarize(traced[keep], plain[keep])}
        if hot:
            failures.append(f"{mode}: dynamo compiled or recompiled in {len(hot)} measured steps (first: {hot[:5]}); "
                            "the measured steps must all run the graphs compiled in the warm-up")
        check = done["traced"]["checks"][mode] if done else None
        failures += [f"{mode}: {f}" for f in check or []]
        per_mode[mode] = {"summary": s, "counts_exact": None if check is None else not check,
                          "count_check_failures": check, "compiled_steps_measured": hot,
                          "trace_bytes": done["traced"]["trace_bytes"][mode] if done else None,
                          "traced_s": traced.tolist(), "plain_s": plain.tolist()}
    dynamo = {name: d["dynamo"] for name, d in done.items()} if done and "compiled" in modes else None
    for name, d in (dynamo or {}).items():
        w, e = d["at"]["after_warmup"], d["at"]["end"]
        if e["recompiles"] > w["recompiles"]:
            failures.append(f"compiled: {e['recompiles'] - w['recompiles']} recompiles in the {name} worker while measured: "
                            + "; ".join(d["recompile_reasons"]["measured"][:2]))
        failures += [f"compiled: {name} worker: {hit}" for hit in d["recompile_limit_hits"]]
    complete = error is None and not prog.stopped and done is not None
    result = {
        "complete": complete,
        "stopped": dict(prog.stopped),
        "error": error,
        "config": cfg.name,
        "device": args.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "expert_ffn": args.experts,
        "capacity_factor": cfg.capacity_factor,
        "backend": args.backend if "compiled" in modes else None,
        "arms_in": "this process" if args.mode == "eager" else "one worker process per arm",
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "budget_s": args.budget_s,
        "deadline_s": args.deadline_s,
        "flush_every": args.flush_every,
        "micro_batches": args.micro_batches,
        "tokens_per_step": cfg.tokens_per_batch * args.micro_batches,
        "moe_layers": len(cfg.moe_layers),
        "experts": cfg.n_experts,
        **prog.phases,
        "mode_s": dict(prog.spent),
        "wall_s": wall,
        "hook_timing": hooks,
        "dynamo": dynamo,
        "modes": per_mode,
    }
    if args.mode == "eager":  # the keys of earlier runs' files
        m = per_mode["eager"]
        result.update(trace_bytes=m["trace_bytes"], summary=m["summary"], traced_s=m["traced_s"], plain_s=m["plain_s"])
    if failures:
        result["failed"] = failures
    return result


def say_progress(prog: Progress, modes: list[str], args, t_start: float) -> None:
    for mode in modes:
        n = prog.pairs(mode)
        tail = ""
        if n >= 2:
            s = summarize(*(np.asarray(prog.times[mode][a][:n]) for a in ("traced", "plain")))
            lo, hi = s["overhead_ci95_pct"]
            tail = f": {s['overhead_pct']:+.2f} % (95 % CI {lo:+.2f} .. {hi:+.2f})"
        eta = f", ~{prog.spent[mode] / n * (args.steps - n):.0f} s to go" if n and mode not in prog.stopped else ""
        print(f"[{mode}] {n}/{args.steps} pairs in {prog.spent[mode]:.0f} s{eta}{tail}; "
              f"{time.perf_counter() - t_start:.0f} s since start", flush=True)



def exit_code(result: dict) -> int:
    """1: a check failed; 3: nothing failed but a mode stopped before --steps pairs; 0: complete."""
    return 1 if result.get("failed") else 0 if result["complete"] else 3
