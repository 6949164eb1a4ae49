"""Live expert re-placement inside training frameworks (DeepSpeed MoE and megatron-core MoELayer).

`permute.py` plans a re-placement as arrays (pure NumPy); `deepspeed.py` applies one to a
`deepspeed.moe.layer.MoE` layer and `megatron.py` to a megatron-core `MoELayer` (SequentialMLP
experts), each collectively over its expert-parallel group; `loop.py` (`Replacer`, both backends)
applies plans during training when the cost model says they pay (plans from `moeload.online.OnlinePlanner`,
also importable here; on layers with replicas it acts through `slot_plan.py`, which turns a slot plan
into `add_replica` / `remove_replica` calls and splits a trace's routes over the copies); `checkpoint.py` saves the maps in force
beside a checkpoint and applies them before it loads (`layout_state_dict`, `apply_layout`,
`record_layout` for a resumed tracer); `replicas.py` gives a DeepSpeed MoE layer copies of hot experts
(`enable_replicas`, `add_replica`, `remove_replica`, `sync_replica_grads`, exported here), and
`megatron_replicas.py` a megatron-core MoELayer (the same four names, imported from that module). Framework packages are
imported only inside their backend; `Replacer`, `plan_maps`, the checkpoint and the replica functions
are imported on first use.
"""

from __future__ import annotations

from typing import Any

from moeload.act.permute import Moves, check_expert_to_rank, contiguous_expert_to_rank, phy2log, plan_moves

__all__ = [
    "Moves",
    "OnlinePlanner",
    "Replacer",
    "add_replica",
    "apply_layout",
    "check_expert_to_rank",
    "contiguous_expert_to_rank",
    "enable_replicas",
    "layout_state_dict",
    "phy2log",
    "plan_maps",
    "plan_moves",
    "record_layout",
    "remove_replica",
    "sync_replica_grads",
]
_REPLICAS = ("add_replica", "enable_replicas", "remove_replica", "sync_replica_grads")  # replicas.py (DeepSpeed)


def __getattr__(name: str) -> Any:
    if name == "OnlinePlanner":  # moeload.online's, where plans come from
        from moeload.online import OnlinePlanner

        return OnlinePlanner
    if name in ("Replacer", "plan_maps"):
        from moeload.act import loop

        return getattr(loop, name)
    if name in ("apply_layout", "layout_state_dict", "record_layout"):
        from moeload.act import checkpoint

        return getattr(checkpoint, name)
    if name in _REPLICAS:
        from moeload.act import replicas

        return getattr(replicas, name)
    raise AttributeError(f"module 'moeload.act' has no attribute {name!r}")
