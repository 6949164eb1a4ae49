"""Expert / attention-head placement onto GPUs, with replicas, and a replay simulator.

`plan(weight, num_gpus=8, num_replicas=16, policy="eplb")` -> `Placement`; `available()` lists
policies. Pure NumPy: no torch at import time.
"""

from __future__ import annotations

from moeload.placement._placement import Evaluation, Placement, imbalance_of
from moeload.placement._registry import available, options, plan
from moeload.placement.heads import DecodeCost, adakv_budgets, head_decode_table, head_placement_table
from moeload.placement.replay import ReplayResult, compare, replay

__all__ = [
    "DecodeCost",
    "Evaluation",
    "Placement",
    "ReplayResult",
    "adakv_budgets",
    "available",
    "compare",
    "head_decode_table",
    "head_placement_table",
    "imbalance_of",
    "options",
    "plan",
    "replay",
]
