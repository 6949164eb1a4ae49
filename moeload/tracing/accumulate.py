"""Device-side accumulation of one gate forward into the current step's count rows, without host syncs.

Only host-known facts (shapes, dtypes) are checked; values never leave the device: no `.item()`,
no boolean-mask indexing, no `nonzero`, no `bincount` (it syncs on CUDA). Top-k indices go through
one `index_add_` at bin `clamp(id, -1, E) + 1`: -1 (no expert) and dropped routes land in bin 0, ids
>= E in bin E + 1, expert e in bin e + 1. A NaN in the router probabilities (`Routing.probs`) is added
to the NAN_COL bin as `isnan(probs).any()`, read by the writer thread when the block is flushed.

With a `KernelCache` (the tracer's), top-k indices take two kernel launches per forward: the bin of
each id in one `bucketize` against cached boundaries [-1, 0, .., E-1], then the `index_add_` of a
cached ones vector; the token count, known on the host from the shape, is returned for the caller to
tally on the host instead of being added on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeload.tracing.adapters.base import Routing, RoutingShapeError
from moeload.tracing.block import NAN_COL, TOKENS_COL


def as_routing(r: Routing | Tensor) -> Routing:
    """A bare tensor -> Routing: 1-D -> counts [E]; 2-D integer -> indices [T, k]; 2-D bool/float -> mask [T, E]."""
    if isinstance(r, Routing):
        return r
    if not isinstance(r, Tensor):
        raise RoutingShapeError(f"expected a Routing or a tensor, got {type(r).__name__}")
    if r.dim() == 1:
        return Routing(counts=r)
    if r.dim() == 2 and (r.dtype == torch.bool or r.is_floating_point()):
        return Routing(mask=r)
    if r.dim() == 2:
        return Routing(indices=r)
    raise RoutingShapeError(f"expected counts [E], indices [T, k] or a routing map [T, E], got shape {tuple(r.shape)}")


class KernelCache:
    """Device constants of the hot path, made once: bin boundaries per (device, dtype, E) and a ones
    vector per device (grown, never shrunk), so a forward launches no allocation kernels."""

    def __init__(self) -> None:
        self._bounds: dict[tuple, Tensor] = {}
        self._ones: dict[torch.device, Tensor] = {}

    def bounds(self, dev: torch.device, dtype: torch.dtype, num_experts: int) -> Tensor:
        key = (dev, dtype, num_experts)
        b = self._bounds.get(key)
        if b is None:  # signed ids compare against boundaries of their own dtype (no conversion kernel)
            bd = (
                dtype
                if dtype in (torch.int16, torch.int32, torch.int64) and num_experts < torch.iinfo(dtype).max
                else torch.int64
            )
            b = self._bounds[key] = torch.arange(-1, num_experts, dtype=bd, device=dev)
        return b

    def ones(self, dev: torch.device, n: int) -> Tensor:
        o = self._ones.get(dev)
        if o is None or o.numel() < n:
            o = self._ones[dev] = torch.ones(
                max(n, 1024, 2 * (0 if o is None else o.numel())), dtype=torch.int64, device=dev
            )
        return o[:n]


def accumulate(
    r: Routing | Tensor,
    routed: Tensor,
    kept: Tensor | None,
    num_experts: int,
    top_k: int,
    *,
    cache: KernelCache | None = None,
    nan: bool = True,
) -> int | None:
    """Add one forward's routing to this step's rows of one layer.

    routed, kept: [W] int64 rows of the current step for one layer, W >= num_experts + 5: bin 0 no
    expert / dropped, bins [1, E] experts 0..E-1, bin E + 1 out-of-range ids, NAN_COL forwards with
    NaN probabilities, TOKENS_COL tokens (kept's last bins unused). kept None: routed only.
    Raises RoutingShapeError (a ValueError) on a malformed routing (shape or dtype), before touching
    the rows. cache: the fast path (module docstring): returns the forward's token count where it is
    a host number, which the caller adds to the TOKENS_COL bin itself; else (and without a cache) the
    tokens are added on the device and None is returned. nan: check `Routing.probs` for NaN.
    """
    r = as_routing(r)
    E = num_experts
    dev = routed.device
    if r.indices is not None:
        idx = r.indices if r.indices.dim() == 2 else r.indices.reshape(-1, 1)
        if idx.dim() != 2 or idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
            raise RoutingShapeError(
                f"top-k indices must be an integer tensor [T, k], got {idx.dtype} {tuple(r.indices.shape)}"
            )
        keep = r.kept
        if keep is not None and keep.numel() != idx.numel():
            raise RoutingShapeError(f"kept has shape {tuple(keep.shape)}, indices {tuple(idx.shape)}")
        tokens = idx.shape[0] if r.tokens is None else r.tokens
        if cache is not None:
            flat = idx.reshape(-1)
            if flat.device != dev:
                flat = flat.to(dev, non_blocking=True)
            i = torch.bucketize(flat, cache.bounds(dev, flat.dtype, E))  # id <= -1 -> 0, e -> e + 1, >= E -> E + 1
            ones = cache.ones(dev, i.numel())
        else:
            i = idx.reshape(-1).to(dev, torch.int64, non_blocking=True).clamp(-1, E).add_(1)
            ones = torch.ones_like(i)
        routed.index_add_(0, i, ones)
        if kept is not None:
            if keep is not None:
                i = torch.where(keep.reshape(-1).to(dev, non_blocking=True).bool(), i, 0)
            kept.index_add_(0, i, ones)
    elif r.mask is not None:
        m = r.mask
        if m.dim() != 2 or m.shape[1] != E:
            raise RoutingShapeError(f"routing map must be [T, {E}], got shape {tuple(m.shape)}")
        c = m.to(dev, non_blocking=True).sum(0, dtype=torch.int64)
        tokens = m.shape[0] if r.tokens is None else r.tokens
        routed[1 : E + 1].add_(c)
        if kept is not None:
            km = r.kept_mask
            if km is not None and tuple(km.shape) != tuple(m.shape):
                raise RoutingShapeError(f"kept_mask has shape {tuple(km.shape)}, routing map {tuple(m.shape)}")
            kept[1 : E + 1].add_(c if km is None else km.to(dev, non_blocking=True).sum(0, dtype=torch.int64))
    elif r.counts is not None:
        if r.counts.dim() != 1 or r.counts.shape[0] != E:
            raise RoutingShapeError(f"expert counts must be [{E}], got shape {tuple(r.counts.shape)}")
        if r.kept_counts is not None and tuple(r.kept_counts.shape) != (E,):
            raise RoutingShapeError(f"kept_counts must be [{E}], got shape {tuple(r.kept_counts.shape)}")
        cap = r.capacity
        if cap is not None and (r.kept_counts is not None or type(cap) is not int or cap < 0):
            raise RoutingShapeError(
                f"capacity must be an int >= 0 given without kept_counts / kept_ids, got {cap!r}"
                f"{' and kept_counts' if r.kept_counts is not None else ''}"
            )
        c = r.counts.to(dev, torch.int64, non_blocking=True)
        tokens = torch.div(c.sum(), top_k, rounding_mode="floor") if r.tokens is None else r.tokens
        routed[1 : E + 1].add_(c)
        if kept is not None:
            if cap is not None:  # kept = min(routed, C) per expert (Routing.capacity)
                kc = c.clamp(max=cap)
            else:
                kc = c if r.kept_counts is None else r.kept_counts.to(dev, torch.int64, non_blocking=True)
            kept[1 : E + 1].add_(kc)
    else:
        raise RoutingShapeError("Routing holds neither indices, mask nor counts")
    p = r.probs
    if nan and isinstance(p, Tensor) and (p.is_floating_point() or p.is_complex()):
        routed[NAN_COL].add_(torch.isnan(p).any().to(dev, non_blocking=True))
    if cache is not None and isinstance(tokens, int):
        return tokens
    if isinstance(tokens, Tensor):
        tokens = tokens.to(dev, torch.int64, non_blocking=True)
    routed[TOKENS_COL].add_(tokens)
    return None
