"""Host time of the tracer's hook alone, called directly on a fixed router output (no router forward in
the timing), with what it does per call: the aten operations it dispatches (kernels, and views, which
launch nothing) and the Python function calls, next to its kernels run alone and the router forward.

    python benchmarks/hook_host_time.py                    # CPU, 1 thread, 4 repeats of 3,000 calls
    python benchmarks/hook_host_time.py --device cuda      # host time per call; the GPU queue is not waited on
    python benchmarks/hook_host_time.py --gate deepspeed   # a DeepSpeed TopKGate (k=2, drop_tokens) instead
    python benchmarks/hook_host_time.py --gate generic     # the workload's router read by gates="*.router"

Each repeat prints the mean per call; the next line gives the medians over the repeats after the first
(the first includes warm-up: caches, allocator). The last line is the hook inside real router forwards
on fresh inputs (traced minus untraced, paired per repeat): on CPU its kernels compute there, on data
that is not in cache, so it is the CPU figure closest to training; on CUDA it waits for the GPU queue. "Python + views" is the hook's time less its kernels
timed alone: the host work that is not a kernel launch. Counts are of a steady-state call (a later
micro-batch of a step; the first forward of each gate in a step also checks the router probabilities for
NaN, three more kernels, counted on the "first forward" line).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeload import LoadTracer
from moeload.workloads import build_model, get_config

VIEWS = {
    "view", "_unsafe_view", "slice", "select", "reshape", "alias", "as_strided", "narrow", "expand", "t",
    "transpose", "unsqueeze", "squeeze", "detach", "lift_fresh", "_reshape_alias", "flatten",
}  # fmt: skip


class OpCount(TorchDispatchMode):
    """The aten operations dispatched inside the mode: `kernels` (launch work on the device) and `views`."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[str] = []
        self.views: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        (self.views if name.rstrip("_") in VIEWS else self.kernels).append(name)
        return func(*args, **(kwargs or {}))


def python_calls(fn: Callable[[], Any]) -> int:
    """Python-level function calls (Python and C functions called from Python) made by one fn()."""
    n = 0

    def prof(frame, event, arg):
        nonlocal n
        n += event in ("call", "c_call")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n - 2  # fn itself and sys.setprofile


def workload_gate(args, dev: torch.device) -> tuple[nn.Module, nn.Module, tuple, Any, Callable[[], None]]:
    """(model, router, inputs, output, kernels): the embedded workload's first router and one forward of it
    (traced by its own adapter, or by the generic one with --gate generic); kernels() runs what the hook
    launches for it on its own: index_add_ of its ids (in [0, E) by construction, GateSpec.ids_in_range),
    or bucketize + index_add_ (generic: ids binned first)."""
    cfg = get_config(args.config)
    model = build_model(cfg, 0, dev)
    router = next(iter(model.routers().values()))
    x = torch.randn(args.tokens, cfg.d_model, device=dev)
    out = router(x)
    idx = out.indices.reshape(-1)
    row = torch.zeros(cfg.n_experts + 5, dtype=torch.int64, device=dev)
    bounds = torch.arange(-1, cfg.n_experts, device=dev)
    ones = torch.ones(idx.numel(), dtype=torch.int64, device=dev)
    if args.gate == "generic":
        return model, router, (x,), out, lambda: row.index_add_(0, torch.bucketize(idx, bounds), ones)
    experts = row[1 : cfg.n_experts + 1]
    return model, router, (x,), out, lambda: experts.index_add_(0, idx, ones)


def deepspeed_gate(args, dev: torch.device) -> tuple[nn.Module, nn.Module, tuple, Any, Callable[[], None]]:
    """The same for a DeepSpeed `MoE` layer's TopKGate (16 experts, k=2, drop_tokens, capacity 1.0); the
    kernels: both rows (routed exp_counts, kept min(exp_counts, C)) added through one [2, E] view,
    minimum against the cached caps + add_."""
    from deepspeed.moe.layer import MoE

    E, H = 16, 256
    model = MoE(H, nn.Linear(H, H), num_experts=E, k=2, capacity_factor=1.0, drop_tokens=True).to(dev)
    gate = model.deepspeed_moe.gate
    seen: list[tuple] = []
    h = gate.register_forward_hook(lambda m, a, o: seen.append((a, o)))
    model(torch.randn(1, args.tokens, H, device=dev))
    h.remove()
    inputs, out = seen[0]
    c = out[-1]
    rows = torch.zeros(2, E + 5, dtype=torch.int64, device=dev)
    pair = rows[:, 1 : E + 1]
    caps = torch.tensor([[torch.iinfo(torch.int64).max], [int(out[1])]], dtype=torch.int64, device=dev)

    def kernels() -> None:
        pair.add_(torch.minimum(c, caps))

    return model, gate, inputs, out, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gate", choices=("workload", "generic", "deepspeed"), default="workload")
    ap.add_argument("--config", default="cpu-demo", help="workload config (--gate workload)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=r"moeload: .* no forward seen")  # only one gate is called
    if args.calls < 1 or args.repeats < 1 or args.tokens < 1:
        sys.exit("hook_host_time: --calls, --repeats and --tokens must be >= 1")
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    make = deepspeed_gate if args.gate == "deepspeed" else workload_gate
    model, gate, inputs, out, kernels = make(args, dev)
    model.train()
    gates = {"gates": "*.router"} if args.gate == "generic" else {}  # the generic adapter parses its output
    tracer = LoadTracer(model, tempfile.mkdtemp() + "/hook.moeload", flush_every=100_000, **gates).start()
    hook = next(iter(gate._forward_hooks.values()))

    def call() -> None:
        hook(gate, inputs, out)

    with torch.no_grad():
        call()  # warm-up: the tracer's device constants are made at the first call
        tracer.step()  # a fresh step: its first forward checks for NaN
        with OpCount() as first:
            call()
        with OpCount() as later:
            call()
        py = python_calls(call)
        noop_fn = nn.Identity()
        probe = torch.zeros(1, device=dev)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            noop_fn(probe)
        t_bare = time.perf_counter() - t0
        handle = noop_fn.register_forward_hook(lambda m, a, o: None)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            noop_fn(probe)
        t_dispatch = (time.perf_counter() - t0 - t_bare) / args.calls * 1e6
        handle.remove()
    print(
        f"per gate forward ({args.gate}, {args.device}): {len(later.kernels)} kernels {later.kernels}, "
        f"{len(later.views)} views {later.views}, {py} Python-level calls; first forward of a step: "
        f"{len(first.kernels)} kernels {first.kernels}"
    )
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = args.calls
    rows: list[tuple[float, float, float]] = []
    with torch.no_grad():
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            t1 = time.perf_counter()
            for _ in range(n):
                kernels()
            t2 = time.perf_counter()
            for _ in range(n):
                gate(*inputs)
            t3 = time.perf_counter()
            sync()
            hook_us, k_us, fwd_us = (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, (t3 - t2) / n * 1e6
            rows.append((hook_us, k_us, fwd_us))
            print(
                f"hook {hook_us:.1f} us per call; its kernels alone {k_us:.1f} us; Python + views "
                f"{hook_us - k_us:.1f} us; router forward {fwd_us:.1f} us (host time, {args.device})"
            )
    in_forward = None
    if args.gate != "deepspeed":  # the hook after real forwards on fresh inputs, interleaved with the router untraced
        xs = [torch.randn_like(inputs[0]) for _ in range(16)]
        hooks = dict(gate._forward_hooks)
        pairs = []
        with torch.no_grad():
            for _ in range(args.repeats):
                times = []
                for attach in (False, True):
                    gate._forward_hooks.clear()
                    if attach:
                        gate._forward_hooks.update(hooks)
                    sync()
                    t0 = time.perf_counter()
                    for i in range(n):
                        gate(xs[i % len(xs)])
                    sync()
                    times.append((time.perf_counter() - t0) / n * 1e6)
                pairs.append(times[1] - times[0])
        in_forward = statistics.median(pairs[1:] or pairs)
    tracer.close()
    steady = rows[1:] or rows
    med = [statistics.median(r[i] for r in steady) for i in range(3)]
    print(
        f"median of repeats 2..{len(rows)}: hook {med[0]:.1f} us per gate forward = kernels {med[1]:.1f} us + "
        f"Python + views {med[0] - med[1]:.1f} us; nn.Module's own cost of calling a forward hook "
        f"{t_dispatch:.1f} us; router forward {med[2]:.1f} us"
    )
    if in_forward is not None:
        print(
            f"router forward on 16 fresh inputs, traced minus untraced (median of paired repeats 2..{len(pairs)}, "
            f"GPU queue waited on): {in_forward:+.1f} us per gate forward"
        )


if __name__ == "__main__":
    main()
