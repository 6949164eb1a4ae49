"""The tracer's collectives: one all-gather per flush, with a bounded wait, on a gloo group of its own."""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import torch

from moeload.errors import first_line


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: Any, timeout: float | None = None) -> None:
    """One collective: out [R, *inp.shape] <- inp of every rank (gathered as a concatenation on dim 0).

    CPU tensors: waits at most `timeout` seconds (None: the group's own timeout) and raises the
    backend's error (RuntimeError) when it times out or a peer is gone. CUDA tensors: only orders the
    current stream after the collective (NCCL; a timeout would block the host), no host wait.
    """
    dist = torch.distributed
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = fn(out.view(-1, *inp.shape[1:]), inp, group=group, async_op=True)
    if inp.is_cuda or timeout is None:
        work.wait()
    elif not work.wait(timedelta(seconds=timeout)):
        raise RuntimeError(f"all_gather not done within flush_timeout={timeout:g} s")


def all_gather_object(obj: Any, group: Any, world_size: int) -> list[Any]:
    """[R] `obj` of every rank of `group` (picklable; on the tracer's gloo group the wait is bounded by
    its timeout, see `tracer_group`). Raises the backend's error where a peer is gone or late."""
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def tracer_group(group: Any, timeout: float | None) -> Any:
    """A gloo group of the same ranks as `group` (None: the world) for the tracer's own collectives, with
    `timeout` (seconds) as its operation timeout: a flush that fails or times out there never leaves a
    pending operation that could pair with training's collectives. Falls back to `group` (one warning)
    where it cannot be made.

    Over every rank of the world it is made by all ranks together (`new_group`'s global synchronization:
    every rank starts a tracer). Over fewer ranks only they call it, so it needs
    `use_local_synchronization`, whose group name hashes the ranks with the number of groups this rank
    belongs to: where the members' numbers differ (megatron's parallel_state makes groups whose membership
    differs per rank) they would wait for each other until the timeout, so the members compare those
    numbers first (one all-gather on `group`) and use `group` itself where they differ."""
    dist = torch.distributed
    try:
        ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        if sorted(ranks) == list(range(dist.get_world_size())):
            return dist.new_group(ranks, backend="gloo", **kw)
        from torch.distributed import distributed_c10d as c10d

        mine = len(c10d._world.pg_names)
        every: list[Any] = [None] * len(ranks)
        dist.all_gather_object(every, mine, group=group)
        if len(set(every)) > 1:
            raise RuntimeError(
                f"the group's ranks belong to different numbers of process groups ({sorted(set(every))}), so "
                "a locally synchronized group of them cannot be named alike"
            )
        return dist.new_group(ranks, backend="gloo", use_local_synchronization=True, **kw)
    except Exception as e:
        warnings.warn(
            f"moeload: no tracer process group ({type(e).__name__}: {first_line(e, 160)}); flushes use the "
            "training's group",
            RuntimeWarning,
            stacklevel=3,
        )
        return group
