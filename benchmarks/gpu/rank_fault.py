"""Dead and slow ranks at a tracer flush over NCCL on 2 GPUs: what happens, and how long it takes.

    python benchmarks/gpu/rank_fault.py --out rank_fault.json                 # 2 GPUs, NCCL
    python benchmarks/gpu/rank_fault.py --out /tmp/rf.json --device cpu \\
        --flush-timeout 2 --pg-timeout 8 --slow 0.5 --late 4                  # CPU smoke run (gloo)

Plain torch only (no DeepSpeed / megatron). The script launches each scenario itself: 2 worker
processes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set here, not by torchrun, so that one rank's
death does not make a launcher kill the other), `init_process_group(timeout=--pg-timeout)`, a small
sync-free MoE model (`--layers` top-k routers, each passing its probabilities), `LoadTracer(...,
flush_every=3, flush_timeout=--flush-timeout)`, `--steps` optimizer steps. Rank 1's fault hits the
flush of steps 3..5:

- ok: no fault (reference timings);
- slow: rank 1 sleeps `--slow` s (< flush timeout) before that flush: the trace must be complete;
- late: rank 1 sleeps `--late` s (> flush timeout): NCCL: rank 0's step() does not wait, the writer
  gives the block up after flush_timeout (extra.lost_steps), later blocks come once rank 1 is back;
  gloo: both ranks stop tracing (extra.tracing_stopped);
- dead: rank 1 exits (os._exit) before that flush; rank 0's loop never reads a device value;
- dead-sync: the same, but rank 0 reads its loss every step (`loss.item()`), as a logging loop does:
  under NCCL it then blocks behind the hung collective until NCCL's watchdog acts (after
  --pg-timeout; with TORCH_NCCL_ASYNC_ERROR_HANDLING=3, the default, it tears the process down).

Each worker rewrites its event log (`<out>.d/<scenario>.rank<r>.json`) after every step, so a process
killed by the watchdog leaves what it saw. The summary (`--out`) holds per scenario: exit codes /
signals, wall time, every step()'s host time, close() time, the tracer's warnings and notes, and the
trace's recorded steps and manifest notes (lost_steps, tracing_stopped, disabled_layers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # moeload from this checkout, installed or not
SCENARIOS = ("ok", "slow", "late", "dead", "dead-sync")
FAULT_STEP = 5  # rank 1's fault comes before the step() that flushes steps 3..5


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON summary path; traces and worker logs go to <out>.d/")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, for a smoke run")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--flush-timeout", type=float, default=8.0, help="LoadTracer(flush_timeout=...) in seconds")
    p.add_argument("--pg-timeout", type=float, default=45.0, help="init_process_group(timeout=...) in seconds")
    p.add_argument("--slow", type=float, default=2.0, help="rank 1's delay in 'slow' (below --flush-timeout)")
    p.add_argument("--late", type=float, default=16.0, help="rank 1's delay in 'late' (above --flush-timeout)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step per rank")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ---- worker --------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from moeload import LoadTracer
    from moeload.tracing import Routing

    scenario, rank = args.worker, int(os.environ["RANK"])
    log_path = Path(f"{args.out}.d") / f"{scenario}.rank{rank}.json"
    t0 = time.time()
    log: dict = {"rank": rank, "scenario": scenario, "events": [], "step_s": [], "step_at": []}

    def event(what: str, **kw) -> None:
        log["events"].append({"t": round(time.time() - t0, 3), "event": what, **kw})
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log))
        tmp.replace(log_path)

    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(2)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.pg_timeout))
    event("init", backend=backend, async_error_handling=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))

    class Router(nn.Module):
        """Linear gate, softmax, top-k; no host sync; hands its probabilities on for the NaN check."""

        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(args.hidden, args.experts, bias=False)
            self.num_experts, self.top_k = args.experts, args.k

        def forward(self, x: torch.Tensor) -> Routing:
            probs = self.gate(x).softmax(-1)
            return Routing(indices=probs.topk(self.top_k, -1).indices, probs=probs)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.ModuleList(nn.Linear(args.hidden, args.hidden) for _ in range(args.layers))
            self.routers = nn.ModuleList(Router() for _ in range(args.layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for proj, router in zip(self.proj, self.routers):
                h = torch.tanh(proj(x))
                r = router(h)
                x = h * router.gate(h).softmax(-1).gather(1, r.indices).sum(-1, keepdim=True)
            return x.pow(2).mean()

    torch.manual_seed(rank)
    model = Net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    trace = Path(f"{args.out}.d") / f"{scenario}.trace"
    tracer = LoadTracer(model, trace, flush_every=3, gate_types=(Router,), flush_timeout=args.flush_timeout)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tracer.start()
        event("started")
        for s in range(args.steps):
            if rank == 1 and s == 3 and scenario.startswith("dead"):
                event("exiting")
                os._exit(0)
            loss = model(torch.randn(args.tokens, args.hidden, device=device, generator=gen))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scenario == "dead-sync" or s == 0:
                event("loss", step=s, loss=float(loss.item()))  # a host read: waits for the device
            if rank == 1 and s == FAULT_STEP and scenario in ("slow", "late"):
                time.sleep(args.slow if scenario == "slow" else args.late)
            ts = time.time()
            tracer.step()
            log["step_s"].append(round(time.time() - ts, 4))
            log["step_at"].append(round(time.time() - t0, 3))
            caught += [str(x.message) for x in w if str(x.message).startswith("moeload")]
            w.clear()
            event("step", step=s, last_flushed=tracer.last_flushed_step)
        ts = time.time()
        tracer.close()
        caught += [str(x.message) for x in w if str(x.message).startswith("moeload")]
    log.update(close_s=round(time.time() - ts, 3), warnings=caught, errors=tracer.errors,
               tracing_stopped=tracer.tracing_stopped, flushes=tracer.flushes, collectives=tracer.collectives,
               last_flushed=tracer.last_flushed_step)
    event("closed")
    if device.type == "cuda":
        ts = time.time()
        torch.cuda.synchronize()  # the device queue: does it drain?
        event("synchronized", wait_s=round(time.time() - ts, 3))
    dist.destroy_process_group()
    event("destroyed")


# ---- launcher ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenario(args: argparse.Namespace, scenario: str) -> dict:
    import shutil

    from moeload import open_trace

    d = Path(f"{args.out}.d")
    shutil.rmtree(d / f"{scenario}.trace", ignore_errors=True)
    for r in range(2):
        (d / f"{scenario}.rank{r}.json").unlink(missing_ok=True)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    hard = args.pg_timeout + args.flush_timeout + args.late + 60  # 5 scenarios stay under 10 min
    t0 = time.time()
    procs = []
    for r in range(2):
        cmd = [sys.executable, __file__, "--worker", scenario, *sys.argv[1:]]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    ranks = []
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, hard - (time.time() - t0)))
            killed = False
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            killed = True
        rc = p.returncode
        log_path = d / f"{scenario}.rank{r}.json"
        ranks.append({
            "returncode": rc, "signal": signal.Signals(-rc).name if rc is not None and rc < 0 else None,
            "killed_by_launcher_after_s": round(hard, 1) if killed else None,
            "exited_after_s": round(time.time() - t0, 2),
            "log": json.loads(log_path.read_text()) if log_path.exists() else None,
            "output_tail": out[-1500:] if (rc != 0 or killed) else "",
        })
    summary: dict = {"scenario": scenario, "wall_s": round(time.time() - t0, 2), "ranks": ranks}
    try:
        t = open_trace(d / f"{scenario}.trace")
        ex = t.meta.get("extra", {})
        summary["trace"] = {"steps": t.steps.tolist(), "gaps": t.gaps(),
                            **{k: ex[k] for k in ("lost_steps", "tracing_stopped", "disabled_layers") if k in ex}}
    except Exception as e:  # what the reader says is part of the result
        summary["trace"] = {"error": f"{type(e).__name__}: {e}"}
    return summary


def verdict(s: dict) -> str:
    r0 = s["ranks"][0]["log"] or {}
    steps = s["trace"].get("steps")
    worst = max(r0.get("step_s") or [0])
    return (f"{s['scenario']:>9}: wall {s['wall_s']:.1f} s, exit {[r['returncode'] for r in s['ranks']]}, "
            f"rank0 slowest step() {worst:.3f} s, close {r0.get('close_s')} s, "
            f"trace steps {steps if steps is None else f'{len(steps)} ({steps[:1]}..{steps[-1:]})'}, "
            f"lost {[(e['first'], e['last']) for e in s['trace'].get('lost_steps', [])]}, "
            f"stopped {s['trace'].get('tracing_stopped', {}).get('step')}")


def main() -> None:
    args = parse()
    if args.worker is not None:
        worker(args)
        return
    chosen = [x for x in args.scenarios.split(",") if x]
    bad = [x for x in chosen if x not in SCENARIOS]
    if bad:
        sys.exit(f"--scenarios: unknown {bad}; choose from {SCENARIOS}")
    if not args.slow < args.flush_timeout < args.late:
        sys.exit(f"need --slow < --flush-timeout < --late, got {args.slow}, {args.flush_timeout}, {args.late}")
    Path(f"{args.out}.d").mkdir(parents=True, exist_ok=True)
    import torch

    res = {"device": args.device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "flush_timeout": args.flush_timeout, "pg_timeout": args.pg_timeout, "slow": args.slow, "late": args.late,
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), "scenarios": []}
    for sc in chosen:
        s = run_scenario(args, sc)
        res["scenarios"].append(s)
        print(verdict(s), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
