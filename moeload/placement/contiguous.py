"""What frameworks do by default: expert e on GPU e // (E / G), no replicas."""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement


def plan_contiguous(weight: np.ndarray, num_gpus: int, num_replicas: int) -> Placement:
    """Static placement of `weight: [L, E]`: slot e holds expert e; needs num_replicas == E."""
    num_layers, num_experts = weight.shape
    if num_replicas != num_experts:
        raise InputError(
            f"contiguous placement has no replicas: num_replicas={num_replicas} must equal "
            f"the number of experts {num_experts}"
        )
    phy2log = np.tile(np.arange(num_experts), (num_layers, 1))
    return Placement(phy2log, np.ones(phy2log.shape), num_gpus, weight, "contiguous")
