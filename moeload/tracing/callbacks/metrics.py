"""Per-layer load metrics of each flushed block, logged to TensorBoard and Weights & Biases.

`load_metrics` is pure NumPy. `MetricLogger` is a tracer `sink`: it runs on the tracer's writer
thread after each block, on the host copy the tracer already made (no extra device sync), and logs
only on the rank that writes the trace (rank 0).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload._balance import balance_stats

METRICS = (
    "max_over_mean",
    "min_over_max",
    "cv",
    "hottest_share",
    "tokens_min",
    "tokens_max",
    "tokens_std",
    "tokens_p50",
    "tokens_p90",
    "tokens_p99",
)


def load_metrics(counts: np.ndarray, experts_per_layer: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Load balance of each layer from its expert counts.

    counts: [L, E] routed (token, expert) assignments; experts_per_layer: [L] real experts of each
    layer (columns past it are ignored), default E. Returns name -> [L] float64, NaN for a layer
    with no tokens: max_over_mean (max / mean expert load, 1 = balanced), min_over_max,
    cv (std / mean, population std), hottest_share (max / sum), all from
    `moeload._balance.balance_stats`, and the raw tokens per expert min / max / std / p50 / p90 / p99.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be [L, E], got shape {c.shape}")
    L, E = c.shape
    n = list(experts_per_layer) if experts_per_layer is not None else [E] * L
    out = {k: np.full(L, np.nan) for k in METRICS}
    for i in range(L):
        x = c[i, : n[i]]
        tot = x.sum()
        if tot <= 0:
            continue
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        vals = {k: float(v) for k, v in balance_stats(x).items()}
        vals.update(
            tokens_min=x.min(), tokens_max=x.max(), tokens_std=x.std(), tokens_p50=p50, tokens_p90=p90, tokens_p99=p99
        )
        for k, v in vals.items():
            out[k][i] = v
    return out


def gpu_max_over_mean(counts: np.ndarray, expert_to_rank: Sequence[Sequence[int]]) -> np.ndarray:
    """[L] max / mean load over EP ranks; counts: [L, E], expert_to_rank: [L][E_l] rank of each expert."""
    out = np.full(len(expert_to_rank), np.nan)
    for i, row in enumerate(expert_to_rank):
        m = np.asarray(row, dtype=np.int64)
        g = np.bincount(m, weights=np.asarray(counts[i, : len(m)], np.float64), minlength=int(m.max()) + 1)
        if g.sum() > 0:
            out[i] = g.max() / g.mean()
    return out


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class MetricLogger:
    """Tracer sink: per-layer load metrics of each flushed block -> TensorBoard / W&B (rank 0 only).

    Each block's counts are summed over its steps and ranks and logged at its last step, as
    `moeload/<layer>/<metric>` and `moeload/all/<metric>` (mean over layers). tensorboard: a log
    directory or a `SummaryWriter`; wandb: log to the active `wandb.run` (None: if wandb is imported
    and a run is active). `last` holds (step, {tag: value}) of the last logged block.
    """

    def __init__(
        self,
        tensorboard: str | os.PathLike | Any | None = None,
        *,
        wandb: bool | None = None,
        layers: Sequence[str] | None = None,
        experts_per_layer: Sequence[int] | None = None,
        expert_to_rank: Sequence[Sequence[int]] | None = None,
        per_layer: bool = True,
    ) -> None:
        self.enabled = _rank() == 0
        self.layers = list(layers) if layers is not None else None
        self.experts_per_layer = experts_per_layer
        self.expert_to_rank = expert_to_rank
        self.per_layer = per_layer
        self.last: tuple[int, dict[str, float]] | None = None
        self._tb = None
        self._own_tb = False
        if self.enabled and tensorboard is not None:
            if isinstance(tensorboard, (str, os.PathLike)):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.fspath(tensorboard))
                self._own_tb = True
            else:
                self._tb = tensorboard
        self._wandb = None
        if self.enabled and wandb is not False:
            wb = sys.modules.get("wandb")
            if wb is None and wandb:
                wb = importlib.import_module("wandb")  # (the argument `wandb` shadows the name)
            if wb is not None and getattr(wb, "run", None) is not None:
                self._wandb = wb
                wb.define_metric("moeload/*", step_metric="moeload/step")

    def configure(self, layers: Sequence[str], experts_per_layer: Sequence[int], expert_to_rank: Any) -> None:
        """Take the layer names and sizes from the tracer's manifest (where not given)."""
        self.layers = self.layers or list(layers)
        self.experts_per_layer = self.experts_per_layer or list(experts_per_layer)
        self.expert_to_rank = self.expert_to_rank or expert_to_rank

    def __call__(self, block: Any) -> None:
        """Sink for `LoadTracer(sink=...)`: block.routed [S, R, L, E]."""
        if not self.enabled or block.split != "train" or len(block.steps) == 0:
            return
        counts = block.routed.sum((0, 1))
        scalars = self.scalars(counts)
        step = int(block.steps[-1])
        self.last = (step, scalars)
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({**scalars, "moeload/step": step})

    def scalars(self, counts: np.ndarray) -> dict[str, float]:
        """{tag: value} for one block's counts [L, E] (NaN entries left out)."""
        m = load_metrics(counts, self.experts_per_layer)
        if self.expert_to_rank:
            m["gpu_max_over_mean"] = gpu_max_over_mean(counts, self.expert_to_rank)
        names = self.layers or [str(i) for i in range(counts.shape[0])]
        out: dict[str, float] = {}
        for k, v in m.items():
            if np.isfinite(v).any():
                out[f"moeload/all/{k}"] = float(np.nanmean(v))
            if self.per_layer:
                out.update({f"moeload/{name}/{k}": float(x) for name, x in zip(names, v) if np.isfinite(x)})
        return out

    def close(self) -> None:
        if self._tb is not None and self._own_tb:
            self._tb.close()
        self._tb = None


__all__ = ["METRICS", "MetricLogger", "gpu_max_over_mean", "load_metrics"]
