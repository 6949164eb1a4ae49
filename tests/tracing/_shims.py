"""Test-only shims that let the real megatron-core and DeepSpeed code run on a CPU-only torch build.

Nothing here changes what the router computes: each shim replaces one CUDA-only call or fills one
name that a missing optional dependency leaves undefined; the world helpers set up and fully undo
a 1-process torch.distributed world. Used by tests/tracing/test_megatron.py, test_callbacks.py and the two-rank EP tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

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


def run_workers(tmp_path: Path, source: str, world: int, args: Callable[[int], list[str]], timeout: float = 90) -> None:
    """Run `source` (a worker script) as `world` real processes, `python worker.py RANK *args(RANK)`, with
    MASTER_ADDR/PORT set for a gloo group, the checkout and tests/tracing on PYTHONPATH; kills them all
    and fails the test after `timeout` seconds (CI never hangs); asserts every one exited 0."""
    import time

    import pytest

    script = tmp_path / "worker.py"
    script.write_text(source)
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{here.parents[1]}{os.pathsep}{here}",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(script), str(r), *args(r)], env=env, stderr=subprocess.PIPE)
             for r in range(world)]
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank hung (killed after {timeout:g} s)")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exit {p.returncode}: " + p.stderr.read().decode()[-3000:]


def run_ep_script(script: str, out: Path, *args: str) -> dict:
    """Run benchmarks/gpu/<script> on 2 gloo ranks at tiny sizes; -> its JSON summary (asserts it exited 0)."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(root / "benchmarks/gpu" / script), "--out", str(out), "--device", "cpu", "--hidden", "16",
           "--experts", "4", "--tokens", "32", "--steps", "3", "--flush-every", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


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


@contextlib.contextmanager
def deepspeed_world_of_one() -> Iterator[None]:
    """`deepspeed.init_distributed("gloo")` as a 1-process world, undone on exit (for engine tests)."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops
    from deepspeed.utils import groups

    saved_ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    # Tells DeepSpeed that none of its C++ ops is buildable. Without it, init_distributed on a
    # CPU-only torch compiles the shared-memory allreduce op `deepspeed_shm_comm` (30 s to 3 min
    # on 2 cores, cached afterwards under ~/.cache/torch_extensions) after probing every op with
    # the compiler; gloo then does the collectives itself.
    deepspeed.ops.__compatible_ops__ = {}
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deepspeed.init_distributed("gloo")
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        ds_comm.cdb = None  # DeepSpeed's handle on the destroyed world
        for d in (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS,
                  groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS):
            d.clear()
        groups._WORLD_GROUP = None
        if saved_ops is None:
            deepspeed.ops.__dict__.pop("__compatible_ops__", None)
        else:
            deepspeed.ops.__compatible_ops__ = saved_ops
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
