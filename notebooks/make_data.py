"""Regenerate the small real trace the notebooks read: notebooks/data/demo.moeload/.

Trains the embedded MoE GPT (`cpu-demo` config: 4 MoE layers x 8 experts, top-2) on the local
Python stdlib sources for --steps optimizer steps on the CPU, recorded with LoadTracer.

    .venv/bin/python notebooks/make_data.py    # 500 steps: ~3 min on 2 idle cores, ~20 min on a busy one

Torch runs on --threads threads (default 1): on a machine shared with other jobs, OpenMP threads
that spin-wait for a busy core made a step about 8x slower with 2 threads than with 1.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "demo.moeload"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="trace directory (replaced)")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps to train and record")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from moeload import LoadTracer, open_trace
    from moeload.workloads import build_model, train

    torch.set_num_threads(args.threads)

    tmp = args.out.with_name(args.out.name + ".partial")  # the old trace stays until the new one is complete
    if tmp.exists():
        shutil.rmtree(tmp)
    model = build_model("cpu-demo", seed=args.seed)
    with LoadTracer(model, tmp, flush_every=100, model_name="moeload-workload/cpu-demo", fsync=False) as tracer:
        result = train("cpu-demo", steps=args.steps, seed=args.seed, model=model,
                       on_step=lambda step, loss: tracer.step(), progress=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    t = open_trace(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{t}: {size / 1e3:.0f} kB; loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.wall_s:.0f} s")


if __name__ == "__main__":
    main()
