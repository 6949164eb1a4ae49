"""The block a tracer fills and flushes: its layout on the device and host, its column constants, and
the block as sinks receive it. Imported by the hot path (accumulate) and the writer (flush) alike.

Block layout (device and host): `[F, P, L, W]` int64 for one rank, `[R, F, P, L, W]` after the
gather; F = flush_every slots (steps), P planes (train routed, train kept, eval routed, eval kept;
see `Layout`), L layers, W = E_max + 5 columns: 0 no expert / dropped, [1, E_max] experts, E + 1
out-of-range ids (a layer with E < E_max uses its padding), then (routed planes only) FLAG_COL: why
the layer's hook was disabled in that step (DISABLED_ERROR / DISABLED_SHAPE, 0 while live), NAN_COL:
forwards whose router probabilities held a NaN (added on the device), TOKENS_COL: tokens. See
`accumulate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

FLAG_COL = -3
NAN_COL = -2
TOKENS_COL = -1
DISABLED_ERROR = 1
"""FLAG_COL value: the adapter (or accumulation) raised."""
DISABLED_SHAPE = 2
"""FLAG_COL value: the router's output did not have the shape its adapter expects (RoutingShapeError)."""
REASONS = {DISABLED_ERROR: "hook raised an exception", DISABLED_SHAPE: "unexpected router output shape"}
NAN_REASON = "NaN router probabilities"


class FlushedBlock(NamedTuple):
    """One written block, as given to a `sink`. R = ranks recorded (1 for pre-summed counts)."""

    split: str
    """"train" or "eval"."""
    steps: np.ndarray
    """[S] step numbers."""
    routed: np.ndarray
    """[S, R, L, E] int64 routed counts."""
    kept: np.ndarray | None
    """[S, R, L, E] int64 kept counts, None where not recorded."""
    tokens: np.ndarray
    """[S, R, L] tokens that reached each gate."""
    times: np.ndarray
    """[S] unix seconds at the end of each step."""
    micro: np.ndarray | None = None
    """[S, R, M, L, E] int64 routed counts of each micro-batch (train blocks with per_micro_batch), else None."""
    bias: np.ndarray | None = None
    """[S, L, E] float64 router expert bias in force during each step (train blocks of traces that
    record it; NaN for layers without one), else None."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Plane indices of the block; None where a plane is not recorded."""

    layers: list[str]
    experts_per_layer: list[int]
    routed: int
    kept: int | None
    eval_routed: int | None
    eval_kept: int | None
    bias: int | None = None
    """Plane of the router expert bias: float64 bits in columns [1, E] (see `bias_of`)."""

    @property
    def planes(self) -> int:
        return 1 + sum(p is not None for p in (self.kept, self.eval_routed, self.eval_kept, self.bias))

    @property
    def width(self) -> int:
        return max(self.experts_per_layer) + 5

    @staticmethod
    def make(
        layers: list[str], experts_per_layer: list[int], kept: bool, record_eval: bool, bias: bool = False
    ) -> Layout:
        n = iter(range(5))
        r = next(n)
        k = next(n) if kept else None
        er = next(n) if record_eval else None
        ek = next(n) if record_eval and kept else None
        b = next(n) if bias else None
        return Layout(list(layers), list(experts_per_layer), r, k, er, ek, b)


def bias_of(a: np.ndarray, layout: Layout, has_bias: Sequence[bool], rank_of: Sequence[int]) -> np.ndarray | None:
    """a: [S, R, P, L, W] host block -> [S, L, E_max] float64 expert bias (NaN where a layer has none), read
    from rank rank_of[l] (a rank that holds layer l); None where the layout records no bias."""
    if layout.bias is None:
        return None
    E = max(layout.experts_per_layer)
    raw = np.ascontiguousarray(a[:, :, layout.bias, :, 1 : E + 1])  # [S, R, L, E] int64 bits
    vals = raw.view(np.float64)
    out = np.full((a.shape[0], len(layout.layers), E), np.nan)
    for li, (has, r) in enumerate(zip(has_bias, rank_of)):
        if has:
            e = layout.experts_per_layer[li]
            out[:, li, :e] = vals[:, r, li, :e]
    return out


__all__ = [
    "DISABLED_ERROR",
    "DISABLED_SHAPE",
    "FLAG_COL",
    "NAN_COL",
    "NAN_REASON",
    "REASONS",
    "TOKENS_COL",
    "FlushedBlock",
    "Layout",
    "bias_of",
]
