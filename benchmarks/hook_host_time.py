"""Host time of the tracer's hook alone, called directly on a fixed router output (no router forward in
the timing), next to the two operations it launches (bucketize + index_add_) and the router forward.

    python benchmarks/hook_host_time.py                    # CPU, 1 thread, 4 repeats of 3,000 calls
    python benchmarks/hook_host_time.py --device cuda      # host time per call; the GPU queue is not waited on

Each repeat prints the mean per call; the first repeat includes warm-up (caches, allocator).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from moeload import LoadTracer
from moeload.workloads import build_model, get_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="cpu-demo")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    cfg = get_config(args.config)
    model = build_model(cfg, 0, dev)
    model.train()
    tracer = LoadTracer(model, tempfile.mkdtemp() + "/hook.moeload", flush_every=100_000).start()
    router = next(iter(model.routers().values()))
    x = torch.randn(args.tokens, cfg.d_model, device=dev)
    out = router(x)
    hook = next(iter(router._forward_hooks.values()))
    idx = out.indices.reshape(-1)
    row = torch.zeros(cfg.n_experts + 5, dtype=torch.int64, device=dev)
    bounds = torch.arange(-1, cfg.n_experts, device=dev)
    ones = torch.ones(idx.numel(), dtype=torch.int64, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = args.calls
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            hook(router, (x,), out)
        t1 = time.perf_counter()
        for _ in range(n):
            row.index_add_(0, torch.bucketize(idx, bounds), ones)
        t2 = time.perf_counter()
        with torch.no_grad():
            for _ in range(n):
                router(x)
        t3 = time.perf_counter()
        sync()
        print(f"hook {(t1 - t0) / n * 1e6:.1f} us per call; bucketize + index_add_ alone {(t2 - t1) / n * 1e6:.1f} us; "
              f"router forward {(t3 - t2) / n * 1e6:.1f} us (host time, {args.device})")
    tracer.close()


if __name__ == "__main__":
    main()
