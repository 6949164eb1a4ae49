"""Test-only shims that let the real megatron-core MoE code run on a CPU-only torch build.

Nothing here changes what the router computes: each shim replaces one CUDA-only call or fills one
name that a missing optional dependency leaves undefined. Used by tests/tracing/test_megatron.py only.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Run megatron-core MoE layers on CPU; restores everything on exit."""
    from megatron.core.transformer.moe import moe_utils

    saved_device = torch.cuda.current_device
    # Replaces torch.cuda.current_device(): Router.gating moves the router weight to
    # `torch.cuda.current_device()` when it sits on the CPU, and TopKRouter allocates its expert-bias
    # buffers there; a CPU-only torch raises instead. "cpu" keeps the weight where it is.
    torch.cuda.current_device = lambda: "cpu"
    # Fills moe_utils.te_general_gemm: megatron-core 0.16.1 reads this name in the router's gating
    # GEMM but defines it only when Transformer Engine imports; None selects its plain torch path.
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    if not had_gemm:
        moe_utils.te_general_gemm = None
    try:
        yield
    finally:
        torch.cuda.current_device = saved_device
        if not had_gemm:
            del moe_utils.te_general_gemm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_world_of_one() -> Iterator[None]:
    """A 1-process gloo group (what megatron's parallel_state needs), destroyed on exit."""
    dist = torch.distributed
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
