"""DeepSeek-V3-scale trace: write 100k steps x 58 layers x 256 experts, then read slices.

    python benchmarks/trace_scale.py --out /tmp/v3.moeload [--steps 100000]

Prints write time, size on disk, and time + peak RSS of typical reads (a 1,000-step slice of all
layers; one layer over all steps; the step index). Counts are multinomial-like (Poisson around a
slowly drifting Dirichlet mean), 8 routed experts per token, 4,096 tokens per step per layer.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time

import numpy as np

from moeload import open_trace
from moeload.trace import Manifest, TraceWriter


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/v3.moeload")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=58)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--flush-every", type=int, default=1000)
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    L, E, F = a.layers, a.experts, a.flush_every
    rng = np.random.default_rng(0)
    m = Manifest(layers=[f"model.layers.{i + 3}.mlp.gate" for i in range(L)], experts_per_layer=E, top_k=8,
                 framework="synthetic", model_name="deepseek-v3-shape", tokens_per_step=4096, flush_every=F)
    base = rng.dirichlet(np.full(E, 2.0), size=L) * 4096 * 8
    t0 = time.perf_counter()
    with TraceWriter(a.out, m, fsync=False) as w:
        for b in range(0, a.steps, F):
            drift = base * (1 + 0.1 * np.sin(b / 7000 + np.arange(E) / 9))
            c = rng.poisson(drift[None], size=(F, L, E))
            w.write_block(np.arange(b, b + F), c, tokens=np.full((F, L), 4096))
            print(f"\rwrote {b + F}/{a.steps} steps", end="", flush=True)
    t_write = time.perf_counter() - t0
    print()
    t = open_trace(a.out)
    size = t.size_bytes
    rows = []

    def timed(name, fn):
        t0 = time.perf_counter()
        x = fn()
        rows.append((name, time.perf_counter() - t0, getattr(x, "shape", None), rss_gib()))

    timed("open + step index", lambda: open_trace(a.out).steps)
    timed("1,000 steps x all layers", lambda: t.counts((50_000, 51_000)))
    timed("all steps x 1 layer", lambda: t.counts(layers=[10]))
    timed("all steps x 1 layer, proportions", lambda: t.proportions(layers=[10]))
    print(f"| trace | {a.steps:,} steps x {L} layers x {E} experts | write {t_write:.0f} s | {size / 2**30:.2f} GiB on disk |")
    print("| read | seconds | shape | peak RSS (GiB) |\n|---|---|---|---|")
    for name, sec, shape, rss in rows:
        print(f"| {name} | {sec:.2f} | {shape} | {rss:.2f} |")


if __name__ == "__main__":
    main()
