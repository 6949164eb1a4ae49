"""The hot path's kernel budget, counted on CPU: the aten operations (other than views) that the
tracer's hook dispatches per gate forward. A torchtitan-style router returning top-k indices costs
two (bucketize + index_add_) after the first forward of a step, which also checks the router
probabilities for NaN (three more); the token count is tallied on the host. Launch latency on a GPU
is measured by benchmarks/tracer_overhead.py, not here.
"""

from __future__ import annotations

import torch
from _models import SigmoidTopKRouter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moeload import LoadTracer, open_trace

VIEWS = {"view", "_unsafe_view", "slice", "select", "reshape", "alias", "as_strided", "narrow", "expand", "t",
         "transpose", "unsqueeze", "squeeze", "detach", "lift_fresh"}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name.rstrip("_") not in VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


Router = SigmoidTopKRouter


def ops_of(fn) -> list[str]:
    with torch.no_grad(), Count() as c:
        fn()
    return c.ops


def test_two_kernels_per_forward_after_the_first(tmp_path):
    model = nn.ModuleDict({"router": Router()})
    x = torch.randn(32, 16)
    bare = ops_of(lambda: model["router"](x))
    tracer = LoadTracer(model, tmp_path / "t", gates="router", flush_every=4).start()
    model["router"](x)  # warm-up: caches (bin boundaries, ones) are made once
    tracer.step()
    first = ops_of(lambda: model["router"](x))  # first forward of step 1: histogram + NaN check
    second = ops_of(lambda: model["router"](x))  # a later micro-batch of the same step
    tracer.step()
    tracer.close()
    extra_first = [o for o in first if o not in bare or first.count(o) > bare.count(o)]
    hook_second = second[len(bare):] if second[: len(bare)] == bare else second
    assert sorted(hook_second) == ["bucketize", "index_add_"], second
    assert len(first) - len(bare) <= 5, extra_first
    t = open_trace(tmp_path / "t")
    assert t.tokens().tolist() == [[32], [64]]  # tallied on the host, exact
    assert t.counts().sum(-1).tolist() == [[64], [128]]
