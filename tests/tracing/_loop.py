"""Shared pieces of the tracer tests: the embedded workload with capacity dropping, reference counts."""

from __future__ import annotations

import numpy as np
import torch

from moeload.workloads import batches, build_model, get_config, reference_counts

# `tiny` with an MoE FFN in both blocks and capacity dropping on: 2 gates, 4 experts, top-2.
TINY_DROP = get_config("tiny").replace(name="tiny-drop", moe_every=1, capacity_factor=1.0)


def reference(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Routed and kept counts [L, E] of one forward of x, from reference_counts' own hooks.

    Run in eval mode (the tracer ignores it; the model has no dropout, so routing is the same as in
    the training forward that follows on the same weights).
    """
    was = model.training
    model.eval()
    try:
        r = reference_counts(model, x)
    finally:
        model.train(was)
    return np.stack([v[0] for v in r.values()]), np.stack([v[1] for v in r.values()])


@torch.no_grad()
def sgd(model: torch.nn.Module, lr: float = 0.05) -> None:
    """Plain SGD step + zero_grad (torch.optim's first use imports torch._dynamo: seconds per process)."""
    for p in model.parameters():
        if p.grad is not None:
            p.add_(p.grad, alpha=-lr)
            p.grad = None


class Loop:
    """A hand-written training loop over the embedded workload; returns reference counts per step."""

    def __init__(self, cfg=TINY_DROP, seed: int = 0, data_seed: int | None = None) -> None:
        self.cfg = cfg
        self.model = build_model(cfg, seed)
        self.data = batches(cfg, seed if data_seed is None else data_seed)

    def step(self, tracer=None, micro: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """One optimizer step of `micro` micro-batches -> reference (routed, kept) [L, E] summed."""
        routed = kept = 0
        for _ in range(micro):
            x, y = next(self.data)
            r, k = reference(self.model, x)
            routed, kept = routed + r, kept + k
            (self.model(x, y).loss / micro).backward()
        sgd(self.model)
        if tracer is not None:
            tracer.step()
        return routed, kept

    def run(self, steps: int, tracer=None, micro: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """-> reference routed, kept [steps, L, E]."""
        out = [self.step(tracer, micro) for _ in range(steps)]
        return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])
