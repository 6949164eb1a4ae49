"""Load: a real LoadTracer on 58 gates x 256 experts, a flush every 100 steps, 100,000 steps.

    python benchmarks/trace_load.py [--steps 100000] [--out load.json] [--trace DIR]

The model holds one generic-adapter gate module per layer (`LoadGate`: top-k ids of a few tokens,
drawn from a pool, so a step costs little beyond the tracer's hooks). The main thread runs the
forwards and `tracer.step()`; the tracer's background thread writes the blocks (zstd Parquet parts,
fsync'ed) meanwhile. Printed (and written as JSON with --out): step() latency p50 / p99 / max over
all steps and over the flush steps, dropped blocks (a step that would have waited for the writer
drops its block instead, so dropped_blocks = 0 means no step waited), the writer's busy time and
throughput (MB/s of host block data and of Parquet on disk), bytes per step on disk, the most blocks
pending at a flush, peak RSS, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moeload import LoadTracer, open_trace


class LoadGate(nn.Module):
    """A gate that returns top-k expert ids `{"expert_indices": [T, k]}`, cycling through a pool."""

    def __init__(self, num_experts: int, top_k: int, tokens: int, seed: int, pool: int = 16) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(num_experts, generator=g) + 0.2  # a skewed, per-layer load
        self.register_buffer("pool", torch.stack([
            torch.multinomial(w.expand(tokens, -1), top_k, generator=g) for _ in range(pool)]))
        self.i = 0

    def forward(self, x: torch.Tensor) -> dict:
        self.i = (self.i + 1) % len(self.pool)
        return {"expert_indices": self.pool[self.i]}


class LoadModel(nn.Module):
    """`layers` LoadGate modules at `layers.{i}.gate`; forward runs each once."""

    def __init__(self, layers: int, experts: int, top_k: int, tokens: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"gate": LoadGate(experts, top_k, tokens, i)}) for i in range(layers))

    def forward(self, x: torch.Tensor) -> None:
        for blk in self.layers:
            blk["gate"](x)


def build(layers: int, experts: int, top_k: int, tokens: int) -> LoadModel:
    return LoadModel(layers, experts, top_k, tokens).train()


def run(model: LoadModel, tracer: LoadTracer, steps: int, on_step=None) -> dict[str, np.ndarray]:
    """Forward + tracer.step() `steps` times -> {"step_s": [steps] step() seconds, "pending": [flushes]}."""
    x = torch.zeros(1, device=next(iter(model.buffers())).device)
    step_s = np.zeros(steps)
    pending = []
    F = tracer.flush_every
    for i in range(steps):
        model(x)
        t0 = time.perf_counter()
        tracer.step()
        step_s[i] = time.perf_counter() - t0
        if (i + 1) % F == 0:
            pending.append(tracer._writer.pending)
        if on_step is not None:
            on_step(i)
    return {"step_s": step_s, "pending": np.asarray(pending)}


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {"p50_ms": float(np.percentile(x, 50) * 1e3), "p99_ms": float(np.percentile(x, 99) * 1e3),
            "max_ms": float(x.max() * 1e3)}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(a: argparse.Namespace, trace: Path) -> dict:
    torch.set_num_threads(1)
    model = build(a.layers, a.experts, a.top_k, a.tokens).to(a.device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tr = LoadTracer(model, trace, gate_types=(LoadGate,), flush_every=a.flush_every, max_pending=a.max_pending)
    tr.start()
    last = [t0]

    def progress(i: int) -> None:
        if a.progress and time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(f"  step {i + 1}/{a.steps}  written up to {tr.last_flushed_step}", file=sys.stderr, flush=True)

    r = run(model, tr, a.steps, progress)
    t_steps = time.perf_counter() - t0
    tc = time.perf_counter()
    tr.close()
    t_close = time.perf_counter() - tc
    wall = time.perf_counter() - t0
    w = tr._writer
    F = a.flush_every
    flush = r["step_s"][F - 1 :: F]
    other = np.delete(r["step_s"], np.arange(F - 1, a.steps, F))
    t = open_trace(trace)
    parts = dir_bytes(trace / "parts")
    host_block = F * tr.layout.planes * a.layers * tr.layout.width * 8
    blocks = -(-a.steps // F)
    out = {
        "config": {"layers": a.layers, "experts": a.experts, "top_k": a.top_k, "tokens": a.tokens, "flush_every": F,
                   "steps": a.steps, "max_pending": w.max_pending, "fsync": True, "torch_threads": 1, "device": a.device,
                   "cpus": os.cpu_count()},
        "step": _stats(r["step_s"]),
        "flush_step": _stats(flush),
        "other_step": _stats(other),
        "dropped_blocks": tr.dropped_blocks,
        "lost_steps": t.meta["extra"].get("lost_steps", []),
        "steps_on_disk": len(t.steps),
        "max_pending_seen": int(r["pending"].max()) if len(r["pending"]) else 0,
        "writer_busy_s": w.write_seconds,
        "writer_busy_fraction": w.write_seconds / wall,
        "host_block_mb": host_block / 1e6,
        "host_mb_per_s": blocks * host_block / 1e6 / w.write_seconds,
        "disk_mb_per_s": parts / 1e6 / w.write_seconds,
        "bytes_on_disk": dir_bytes(trace),
        "bytes_per_step": parts / a.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_tracer_mb": rss0 / 1024,
        "stepping_s": t_steps,
        "close_s": t_close,
        "wall_s": wall,
        "errors": tr.errors[:5],
    }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--device", default="cpu", help="where the gates and the count buffer live (cuda: async copies)")
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="tokens per gate forward")
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--max-pending", type=int, default=4)
    ap.add_argument("--trace", default=None, help="trace directory (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    tmp = None
    if a.trace is None:
        tmp = tempfile.mkdtemp(prefix="moeload-load-")
        trace = Path(tmp) / "t"
    else:
        trace = Path(a.trace)
        shutil.rmtree(trace, ignore_errors=True)
    try:
        res = measure(a, trace)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    c = res["config"]
    print(f"{c['steps']} steps, {c['layers']} gates x {c['experts']} experts (top-{c['top_k']}, {c['tokens']} tokens), "
          f"flush every {c['flush_every']}, max_pending {c['max_pending']}, {c['cpus']} CPUs")
    for k in ("step", "flush_step", "other_step"):
        s = res[k]
        print(f"  {k + '()':<14} p50 {s['p50_ms']:.3f} ms  p99 {s['p99_ms']:.3f} ms  max {s['max_ms']:.3f} ms")
    print(f"  dropped blocks {res['dropped_blocks']} (a step never waits: a block is dropped instead); "
          f"steps on disk {res['steps_on_disk']}/{c['steps']}; most blocks pending at a flush {res['max_pending_seen']}")
    print(f"  writer busy {res['writer_busy_s']:.1f} s ({100 * res['writer_busy_fraction']:.1f} % of wall); "
          f"throughput {res['host_mb_per_s']:.0f} MB/s of host blocks ({res['host_block_mb']:.1f} MB each), "
          f"{res['disk_mb_per_s']:.1f} MB/s of Parquet")
    print(f"  on disk {res['bytes_on_disk'] / 1e6:.1f} MB, {res['bytes_per_step'] / 1e3:.2f} kB per step; peak RSS "
          f"{res['peak_rss_mb']:.0f} MB (before the tracer {res['rss_before_tracer_mb']:.0f} MB); "
          f"wall {res['wall_s']:.1f} s (close {res['close_s']:.2f} s)")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
