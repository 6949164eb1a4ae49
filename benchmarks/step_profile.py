"""Where a traced training step spends the time the tracer adds: one plain and one traced model (same seed,
same batches) stepped alternately, the last steps under `torch.profiler` (host and, on CUDA, device time per
op; four blocks in the order plain, traced, traced, plain, since one block per arm after the other read a drift
as the tracer's cost: on an H200 the second block's every op took ~40 % more host time) and `cProfile` (host
time per moeload function), reported as traced minus plain per step.

    python3 benchmarks/step_profile.py --device cuda --steps 40 --profile-steps 10 --out $OUT
    python3 benchmarks/step_profile.py --device cuda --compile --out $OUT          # the compiled twin
    python benchmarks/step_profile.py --device cpu --config tiny --steps 6 --profile-steps 2 --out /tmp/sp

Written for the H200 overhead runs of docs/performance.md, whose traced step took 2.7 ms (eager) and 3.8 ms
(compiled) more than the plain one while the hook measured inside training explained 0.96 ms: this says where
the rest goes. Both models live in this process (unlike `tracer_overhead.py --mode both`, which spawns one
worker per arm), so a difference between the two harnesses is itself a finding. The workload, its grouped
experts and capacity are `tracer_overhead.py`'s (`benchmarks/_overhead/workload.py`).

Output: OUT/step_profile_<config>_<device>[_compiled].json (per-step wall time of both arms; the top ops by
traced-minus-plain self host time, with counts and device time; moeload functions by host time) and the same
tables printed. Numbers are per profiled step.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _overhead, run as a script or loaded from its path

import torch  # noqa: E402
from _overhead.timing import timed  # noqa: E402
from _overhead.workload import build, make_step, setup  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="workload config (default: cpu-demo on cpu, gpt3-small-moe on cuda)")
    ap.add_argument("--experts", default="grouped", choices=["loop", "grouped"])
    ap.add_argument("--capacity-factor", type=float, default=None, help="default: the config's, 1.25 for grouped")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (tracer attached first)")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=40, help="steps per arm before profiling (warm-up, alternating)")
    ap.add_argument("--profile-steps", type=int, default=10,
                    help="steps per arm under torch.profiler, in two blocks (ABBA order); cProfile re-runs half")
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--out", default="/tmp/step_profile")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.profile_steps < 1 or a.top < 1:
        ap.error("--steps, --profile-steps and --top must be >= 1")
    a.mode = "compiled" if a.compile else "eager"
    return a


def _ops(prof, steps: int, cuda: bool) -> dict[str, dict]:
    """Op name -> {"count", "self_cpu_us", "self_device_us"} per step."""
    out = {}
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        out[e.key] = {"count": e.count / steps, "self_cpu_us": e.self_cpu_time_total / steps,
                      "self_device_us": (dev or 0.0) / steps if cuda else 0.0}
    return out


def _sum_ops(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """The per-step op tables of an arm's profiled blocks (each already divided by the arm's steps) added up."""
    out: dict[str, dict] = {}
    for part in parts:
        for k, v in part.items():
            acc = out.setdefault(k, {"count": 0.0, "self_cpu_us": 0.0, "self_device_us": 0.0})
            for f in acc:
                acc[f] += v[f]
    return out


def _moeload_functions(stats: pstats.Stats, steps: int, top: int) -> list[dict]:
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/moeload/tracing/" in file or "/moeload/trace/" in file:  # the tracer's code, not the workload's
            rows.append({"function": f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})", "calls": nc / steps,
                         "self_us": 1e6 * tt / steps, "cumulative_us": 1e6 * ct / steps})
    return sorted(rows, key=lambda r: -r["cumulative_us"])[:top]


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    from moeload import LoadTracer
    from moeload.workloads import batches

    cfg, device = setup(argparse.Namespace(threads=a.threads, device=a.device, config=a.config,
                                           capacity_factor=a.capacity_factor, experts=a.experts))
    cuda = device.type == "cuda"
    total = a.steps + 2 * max(1, a.profile_steps // 2)
    data = batches(cfg, a.seed, device)
    steps_data = [[next(data)] for _ in range(total)]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    arms, tracer = {}, None
    for name in ("plain", "traced"):
        model, opt, sched = build(cfg, device, total, a.seed, a.experts)
        if name == "traced":
            tracer = LoadTracer(model, out_dir / "step_profile_trace.moeload", flush_every=a.flush_every).start()
        fwd = torch.compile(model, backend=a.backend) if a.compile else model
        arms[name] = make_step(cfg, fwd, opt, sched, device, 1)
    assert tracer is not None

    def one(name: str, j: int) -> None:
        arms[name](steps_data[j])
        if name == "traced":
            tracer.step()

    t0 = time.perf_counter()
    wall: dict[str, list[float]] = {"plain": [], "traced": []}
    for j in range(a.steps):  # warm-up (compiles), alternating, timed for the record
        for name in (("plain", "traced") if j % 2 == 0 else ("traced", "plain")):
            wall[name].append(timed(lambda n=name, j=j: one(n, j), device))
        if j % 10 == 9:
            print(f"[{a.mode}] warm-up step {j + 1}/{a.steps}, {time.perf_counter() - t0:.0f} s", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities):  # the profiler's own first-use cost, paid by neither arm
        one("plain", a.steps - 1)
    # ABBA: plain, traced, traced, plain blocks, each under its own profiler, so that a drift over the profiled
    # steps (the profiler's own growing cost, clocks) weighs on both arms alike; an arm's ops are the sum of its
    # two blocks. The two blocks of one arm run the same batches as the other arm's blocks at that position.
    half = max(1, a.profile_steps // 2)
    ops_blocks: dict[str, list[dict[str, dict]]] = {"plain": [], "traced": []}
    blocks: list[dict] = []
    for b, name in enumerate(("plain", "traced", "traced", "plain")):
        idx = list(range(a.steps + (b // 2) * half, a.steps + (b // 2 + 1) * half))
        with torch.profiler.profile(activities=activities) as prof:
            t = time.perf_counter()
            for j in idx:
                one(name, j)
            if cuda:
                torch.cuda.synchronize(device)
            blocks.append({"arm": name, "s_per_step": (time.perf_counter() - t) / len(idx), "steps": len(idx)})
        ops_blocks[name].append(_ops(prof, 2 * len(idx), cuda))
    ops = {n: _sum_ops(v) for n, v in ops_blocks.items()}
    prof_wall = {n: statistics.fmean(x["s_per_step"] for x in blocks if x["arm"] == n) for n in ops}
    funcs = {}
    for name in ("plain", "traced"):
        pr = cProfile.Profile()
        pr.enable()
        for j in range(a.steps, a.steps + half):  # host time per moeload function (steps re-run: training state moves on)
            one(name, j)
        if cuda:
            torch.cuda.synchronize(device)
        pr.disable()
        funcs[name] = _moeload_functions(pstats.Stats(pr), half, a.top)
    tracer.close()
    names = set(ops["plain"]) | set(ops["traced"])
    zero = {"count": 0.0, "self_cpu_us": 0.0, "self_device_us": 0.0}
    diff = []
    for k in names:
        p, t = ops["plain"].get(k, zero), ops["traced"].get(k, zero)
        diff.append({"op": k, "count_plain": p["count"], "count_traced": t["count"],
                     "self_cpu_us_plain": p["self_cpu_us"], "self_cpu_us_traced": t["self_cpu_us"],
                     "self_cpu_us_diff": t["self_cpu_us"] - p["self_cpu_us"],
                     "self_device_us_diff": t["self_device_us"] - p["self_device_us"]})
    diff.sort(key=lambda r: -abs(r["self_cpu_us_diff"]))
    med = {k: statistics.median(v[len(v) // 2:]) for k, v in wall.items()}  # the warm-up's second half
    result = {
        "config": cfg.name, "device": a.device, "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "mode": a.mode, "experts": a.experts, "capacity_factor": cfg.capacity_factor,
        "steps": a.steps, "profile_steps": a.profile_steps, "flush_every": a.flush_every,
        "warmup_median_s_second_half": med, "profiled_s_per_step": prof_wall, "profiled_blocks": blocks,
        "self_cpu_us_per_step_total": {n: sum(r["self_cpu_us"] for r in ops[n].values()) for n in ops},
        "ops_by_traced_minus_plain_self_cpu": diff[: a.top], "moeload_functions_traced": funcs["traced"],
        "tracer_errors": list(tracer.errors),
    }
    stem = f"step_profile_{cfg.name}_{a.device}" + ("_compiled" if a.compile else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print(f"{cfg.name} {a.mode} on {result['device_name']}: median step (warm-up, second half) plain "
          f"{1e3 * med['plain']:.2f} ms, traced {1e3 * med['traced']:.2f} ms; profiled steps plain "
          f"{1e3 * prof_wall['plain']:.2f} ms, traced {1e3 * prof_wall['traced']:.2f} ms (profiler on; blocks "
          + ", ".join(f"{x['arm']} {1e3 * x['s_per_step']:.2f}" for x in blocks) + " ms: the two plain blocks' "
          f"difference, {1e3 * (blocks[3]['s_per_step'] - blocks[0]['s_per_step']):+.2f} ms, is the drift)")
    print("| op | calls/step plain | traced | self host µs/step plain | traced | traced − plain | device µs traced − plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in diff[: a.top]:
        print(f"| {r['op']} | {r['count_plain']:.1f} | {r['count_traced']:.1f} | {r['self_cpu_us_plain']:.1f} | "
              f"{r['self_cpu_us_traced']:.1f} | {r['self_cpu_us_diff']:+.1f} | {r['self_device_us_diff']:+.1f} |")
    print("| moeload.tracing / moeload.trace function (traced arm) | calls/step | self µs/step | cumulative µs/step |")
    print("| --- | --- | --- | --- |")
    for r in funcs["traced"]:
        print(f"| {r['function']} | {r['calls']:.1f} | {r['self_us']:.1f} | {r['cumulative_us']:.1f} |")
    print(f"wrote {out_dir / stem}.json")
    return result


if __name__ == "__main__":
    main()
