"""Live expert re-placement inside training frameworks (DeepSpeed MoE; megatron-core to come).

`permute.py` plans a re-placement as arrays (pure NumPy); `deepspeed.py` applies one to a
`deepspeed.moe.layer.MoE` layer collectively over its expert-parallel group. Framework packages are
imported only inside their backend.
"""

from __future__ import annotations

from moeload.act.permute import Moves, check_expert_to_rank, contiguous_expert_to_rank, phy2log, plan_moves

__all__ = ["Moves", "check_expert_to_rank", "contiguous_expert_to_rank", "phy2log", "plan_moves"]
