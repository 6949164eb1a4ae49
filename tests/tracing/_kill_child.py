"""Child process of test_kill_resume.py: a real traced training run that the test kills or resumes.

Trains the embedded workload (TINY_DROP: 2 MoE layers, 4 experts, top-2, capacity dropping) on one
CPU thread, deterministically (same seed, same weights, same batches, same counts), with a real
LoadTracer writing to --trace. After each step it prints one JSON line to stdout:
``{"step": s, "flushed": tracer.last_flushed_step, "counts": [L][E] routed counts of the step seen by
its own router hooks (independent of the tracer), "ckpt": n (only where a checkpoint was saved)}``.

Checkpoints (model, optimizer, data position and ``tracer.state_dict()``) go to
``--ckpt-dir/ckpt-<n>.pt`` (n = steps done, i.e. the next step number) every --ckpt-every steps,
written to a temporary name and renamed. --resume <file> restores one and continues from its
step, appending to the same trace; --data-seed reshuffles the batches after the resume point.
--hold-at s: after step s the loop stops (without closing the tracer) and the process waits to
be killed, like a hung job; it prints ``{"hold": s, "flushed": ...}`` once the writer thread has
written every complete block. Without --hold-at it closes the tracer after --steps and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

torch.set_num_threads(1)

from _loop import TINY_DROP  # tests/tracing is this script's directory

from moeload import LoadTracer
from moeload.workloads import TopKRouter, batches, build_model


class HeavyBall:
    """SGD with momentum: the velocity is optimizer state that a resume must restore to stay exact.

    Hand-written because torch.optim's first step imports torch._dynamo (~0.7 s per process).
    """

    def __init__(self, params, lr: float = 0.005, momentum: float = 0.9) -> None:
        self.params = list(params)
        self.lr, self.momentum = lr, momentum
        self.velocity = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        for p, v in zip(self.params, self.velocity):
            if p.grad is not None:
                v.mul_(self.momentum).add_(p.grad)
                p.add_(v, alpha=-self.lr)
                p.grad = None

    def state_dict(self) -> dict:
        return {"velocity": [v.clone() for v in self.velocity]}

    def load_state_dict(self, state: dict) -> None:
        for v, saved in zip(self.velocity, state["velocity"]):
            v.copy_(saved)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--flush-every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=None, help="batches after a resume (default: continue --seed's)")
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--hold-at", type=int, default=None)
    a = ap.parse_args()

    model = build_model(TINY_DROP, a.seed)
    model.train()
    opt = HeavyBall(model.parameters())
    tracer = LoadTracer(model, a.trace, flush_every=a.flush_every)
    start = 0
    if a.resume:
        ck = torch.load(a.resume)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        tracer.load_state_dict(ck["tracer"])
        start = ck["step"]
    if a.resume and a.data_seed is not None:
        data = batches(TINY_DROP, a.data_seed)
    else:
        data = batches(TINY_DROP, a.seed)
        for _ in range(start):  # the data position: the same stream, advanced past the steps done
            next(data)

    seen = {}

    def probe(name: str):
        def fn(module: TopKRouter, args, out) -> None:
            if module.training:
                seen[name] = torch.bincount(out.indices.reshape(-1), minlength=module.num_experts).tolist()
        return fn

    for name, m in model.named_modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(probe(name))

    tracer.start()
    for step in range(start, a.steps):
        x, y = next(data)
        model(x, y).loss.backward()
        opt.step()
        tracer.step()
        line = {"step": step, "flushed": tracer.last_flushed_step, "counts": [seen[n] for n in tracer.layers]}
        if a.ckpt_dir and a.ckpt_every and (step + 1) % a.ckpt_every == 0:
            path = os.path.join(a.ckpt_dir, f"ckpt-{step + 1}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "tracer": tracer.state_dict(),
                        "step": step + 1}, path + ".tmp")
            os.replace(path + ".tmp", path)
            line["ckpt"] = step + 1
        emit(line)
        if step == a.hold_at:
            whole = (step + 1) // a.flush_every * a.flush_every - 1  # last step of the last complete block
            deadline = time.time() + 30
            while (tracer.last_flushed_step if tracer.last_flushed_step is not None else -1) < whole:
                if time.time() > deadline:  # the writer failed: say so instead of waiting forever
                    break
                time.sleep(0.005)
            emit({"hold": step, "flushed": tracer.last_flushed_step, "errors": tracer.errors})
            while True:  # a hung job: the tracer is never closed; the test kills this process
                time.sleep(1)
    tracer.close()
    emit({"done": a.steps, "flushed": tracer.last_flushed_step, "errors": tracer.errors})


if __name__ == "__main__":
    main()
