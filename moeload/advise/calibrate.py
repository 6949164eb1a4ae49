"""`calibrate`: time the grouped expert GEMMs of a layer's shape on this machine's GPU.

The experts of one GPU run as the frameworks run them in bf16: one grouped GEMM per matrix
(`torch._grouped_mm`, as torchtitan and megatron-core's grouped-GEMM path do) where it runs, else
batched GEMMs over experts padded to the largest group (`torch.bmm`, as capacity-based dispatch
does); forward, then backward. Times are CUDA-event medians over repeats, for a grid of routes per
GPU split evenly over the local experts. torch is imported here, never at package import.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from moeload.advise.cost import Calibration, ExpertShape
from moeload.errors import InputError

TILES = (0, 16, 64, 128, 256)
"""Padding tiles `calibrate` tries (rows per expert group; 0: the GEMM time depends on total routes)."""
DEFAULT_GRID = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def expert_step(shape: ExpertShape, routes: list[int], *, device: str = "cuda", kernel: str = "auto"):
    """A closure running forward + backward of the experts of one GPU for `routes[i]` tokens each.

    kernel: "grouped" (`torch._grouped_mm`, one kernel per matrix for all experts, groups padded
    to 16 rows as torchtitan does), "bmm" (experts padded to the largest group, as capacity-based
    dispatch runs them) or "auto" (grouped on CUDA where it works, else bmm). Returns
    (closure, kernel used).
    """
    import torch

    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    k = len(routes)
    inner = shape.ffn_hidden * (2 if shape.gated else 1)
    w1 = torch.randn(k, shape.hidden, inner, device=device, dtype=dt, requires_grad=True)
    w2 = torch.randn(k, shape.ffn_hidden, shape.hidden, device=device, dtype=dt, requires_grad=True)

    def act(h):
        if shape.gated:
            a, b = h.chunk(2, dim=-1)
            return torch.nn.functional.silu(a) * b
        return torch.nn.functional.gelu(h)

    def grouped():
        padded = [-(-max(int(n), 0) // 16) * 16 for n in routes]
        offs = torch.tensor(np.cumsum(padded), device=device, dtype=torch.int32)
        x = torch.randn(max(sum(padded), 16), shape.hidden, device=device, dtype=dt, requires_grad=True)

        def run() -> None:
            y = torch._grouped_mm(act(torch._grouped_mm(x, w1, offs=offs)), w2, offs=offs)
            y.backward(torch.ones_like(y))
            x.grad = w1.grad = w2.grad = None

        return run

    def bmm():
        per = max(1, max(int(n) for n in routes))
        x = torch.randn(k, per, shape.hidden, device=device, dtype=dt, requires_grad=True)

        def run() -> None:
            y = torch.bmm(act(torch.bmm(x, w1)), w2)
            y.backward(torch.ones_like(y))
            x.grad = w1.grad = w2.grad = None

        return run

    if kernel in ("grouped", "auto") and device.startswith("cuda") and hasattr(torch, "_grouped_mm"):
        try:
            run = grouped()
            run()
            torch.cuda.synchronize()
            return run, "grouped"
        except (RuntimeError, TypeError, NotImplementedError):
            if kernel == "grouped":
                raise
    return bmm(), "bmm"


def time_fn(run, *, device: str = "cuda", repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of `run()` (CUDA events on a GPU, perf_counter on CPU)."""
    import time

    import torch

    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            run()
            t = time.perf_counter() - t0
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def time_grouped_gemm(
    shape: ExpertShape,
    local_experts: int,
    routes: int,
    *,
    device: str = "cuda",
    repeats: int = 10,
    warmup: int = 3,
    kernel: str = "auto",
) -> tuple[int, float, str]:
    """(routes timed, median seconds, kernel) of forward + backward of `local_experts` experts.

    `routes` is rounded up to a multiple of `local_experts` and split evenly."""
    per = max(1, -(-routes // local_experts))
    run, used = expert_step(shape, [per] * local_experts, device=device, kernel=kernel)
    return per * local_experts, time_fn(run, device=device, repeats=repeats, warmup=warmup), used


def calibrate(
    shape: ExpertShape,
    local_experts: int,
    *,
    grid: tuple[int, ...] = DEFAULT_GRID,
    device: str = "cuda",
    repeats: int = 10,
    kernel: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measured `Calibration` for `shape` with `local_experts` experts per GPU on `device`."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            "calibrate: no CUDA GPU here; run it on a GPU machine, or pass --device cpu "
            "to time this CPU (marked as such)"
        )
    if local_experts < 1:
        raise InputError(f"--experts-per-gpu {local_experts}: must be >= 1")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    secs: list[float] = []
    timed: list[int] = []
    pers: list[int] = []
    used = "bmm"
    for n in sorted(set(int(g) for g in grid)):
        routes, t, used = time_grouped_gemm(shape, local_experts, n, device=device, repeats=repeats, kernel=kernel)
        if timed and routes <= timed[-1]:
            continue
        timed.append(routes)
        pers.append(routes // local_experts)
        secs.append(t)
        if progress is not None:
            progress(f"{routes} routes on {local_experts} experts ({used}): {t * 1e3:.3f} ms")
    # Uneven splits (Dirichlet shares of a few totals) choose the padding tile and measure the error.
    rng = np.random.default_rng(0)
    samples = []
    for total in sorted({timed[len(timed) // 2], timed[-3], timed[-2]}):
        for _ in range(3):
            split = rng.multinomial(total, rng.dirichlet(np.ones(local_experts))).tolist()
            run, _ = expert_step(shape, split, device=device, kernel=used)
            samples.append((np.asarray(split, dtype=np.float64), time_fn(run, device=device, repeats=repeats)))
    best: tuple[float, Calibration] | None = None
    for tile in TILES:
        xs = [local_experts * (-(-p // tile) * tile if tile else p) for p in pers]
        keep = [i for i in range(len(xs)) if i == 0 or xs[i] > xs[i - 1]]
        cal = Calibration(
            (0.0, *(float(xs[i]) for i in keep)),
            (0.0, *np.maximum.accumulate(np.asarray(secs)[keep]).tolist()),
            tile=tile,
        )
        errs = [
            abs(float(cal.gemm_time(np.ceil(n / tile).sum() * tile if tile else n.sum())) - t) / t for n, t in samples
        ]
        err = float(np.median(errs))
        if progress is not None:
            progress(f"tile {tile}: median error on {len(samples)} uneven splits {err:.1%}")
        if best is None or err < best[0] - 1e-3:
            best = (err, cal)
    if best is None:  # TILES is never empty; kept for the type checker
        raise InputError("calibrate: no padding tile could be evaluated")
    err, fit = best
    name = f"{name}, {used} GEMMs"
    return Calibration(
        fit.tokens,
        fit.seconds,
        measured=True,
        device=name,
        shape=asdict(shape),
        rel_error=max(err, 0.02),
        tile=fit.tile,
    )
