"""`calibrate`: time the grouped expert GEMMs of a layer's shape on this machine's GPU.

The experts of one GPU run as the frameworks run them in bf16: tokens dispatched to
`[local_experts, n, hidden]` and two batched GEMMs (`torch.bmm`; forward, then backward, which
costs two GEMMs per matrix). Times are CUDA-event medians over repeats, for a grid of routes per
GPU split evenly over the local experts. torch is imported here, never at package import.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Callable

import numpy as np

from moeload.advise.cost import Calibration, ExpertShape
from moeload.errors import InputError

DEFAULT_GRID = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def time_grouped_gemm(shape: ExpertShape, local_experts: int, routes: int, *, device: str = "cuda",
                      repeats: int = 10, warmup: int = 3) -> tuple[int, float]:
    """(routes timed, median seconds) of forward + backward of `local_experts` experts.

    `routes` is rounded up to a multiple of `local_experts` (even split); the first value says
    what was timed."""
    import torch

    per = max(1, -(-routes // local_experts))
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    x = torch.randn(local_experts, per, shape.hidden, device=device, dtype=dt, requires_grad=True)
    w1 = torch.randn(local_experts, shape.hidden, shape.ffn_hidden * (2 if shape.gated else 1), device=device,
                     dtype=dt, requires_grad=True)
    w2 = torch.randn(local_experts, shape.ffn_hidden, shape.hidden, device=device, dtype=dt, requires_grad=True)

    def once() -> None:
        h = torch.bmm(x, w1)
        if shape.gated:
            a, b = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(a) * b
        else:
            h = torch.nn.functional.gelu(h)
        y = torch.bmm(h, w2)
        y.backward(torch.ones_like(y))

    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            import time

            t0 = time.perf_counter()
            once()
            t = time.perf_counter() - t0
        x.grad = w1.grad = w2.grad = None
        if i >= warmup:
            times.append(t)
    return per * local_experts, statistics.median(times)


def calibrate(shape: ExpertShape, local_experts: int, *, grid: tuple[int, ...] = DEFAULT_GRID, device: str = "cuda",
              repeats: int = 10, progress: Callable[[str], None] | None = None) -> Calibration:
    """Measured `Calibration` for `shape` with `local_experts` experts per GPU on `device`."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("calibrate: no CUDA GPU here; run it on a GPU machine, or pass --device cpu "
                         "to time this CPU (marked as such)")
    if local_experts < 1:
        raise InputError(f"--experts-per-gpu {local_experts}: must be >= 1")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    secs, timed = [], []
    for n in sorted(set(int(g) for g in grid)):
        routes, t = time_grouped_gemm(shape, local_experts, n, device=device, repeats=repeats)
        if timed and routes <= timed[-1]:
            continue
        timed.append(routes)
        secs.append(t)
        if progress is not None:
            progress(f"{routes} routes on {local_experts} experts: {t * 1e3:.3f} ms")
    tokens = (0.0, *map(float, timed))
    seconds = (0.0, *np.maximum.accumulate(np.asarray(secs)).tolist())
    return Calibration(tokens, tuple(seconds), measured=True, device=name, shape=asdict(shape), rel_error=0.10)
