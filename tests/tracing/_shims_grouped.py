"""A test-only shim that lets megatron-core's `GroupedMLP` experts run on a CPU-only torch build, next to
tests/tracing/_shims.py's `megatron_on_cpu` (which it does not replace: use both).

GroupedMLP (megatron-core 0.16.1, `moe_grouped_gemm=True` on the local spec) asserts at construction that the
`grouped_gemm` package imports and calls its CUDA kernel `grouped_gemm.ops.gmm` in forward; neither exists
here. Used by tests/act/test_megatron_grouped.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace

import torch


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """A shim for the CUDA kernel `grouped_gemm.ops.gmm`, exact: a: [sum(batch_sizes), K] tokens grouped by
    expert, b: [E, K, N] (trans_b: [E, N, K]), batch_sizes: [E] tokens per expert -> [sum(batch_sizes), N],
    rows of group i times b[i], one torch.matmul per expert (autograd through torch's own ops)."""
    parts = a.split([int(n) for n in batch_sizes.tolist()])
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(parts, b)])


@contextlib.contextmanager
def grouped_gemm_on_cpu() -> Iterator[None]:
    """Build and run megatron-core GroupedMLP experts on CPU; restores megatron's module on exit.

    Replaces `megatron.core.transformer.moe.grouped_gemm_util`'s `grouped_gemm` (None without the package, which
    fails GroupedMLP's `assert_grouped_gemm_is_available()`) and `ops` (what GroupedMLP.forward calls as
    `gg.ops.gmm(x, w, tokens_per_expert, trans_b=False)`) with a namespace holding `gmm` above: a shim for a
    CUDA kernel, computing the same products with a per-expert loop of torch.matmul. Nothing else changes."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    saved = gg.grouped_gemm, gg.ops
    ops = SimpleNamespace(gmm=gmm)
    gg.grouped_gemm, gg.ops = SimpleNamespace(ops=ops), ops
    try:
        yield
    finally:
        gg.grouped_gemm, gg.ops = saved
