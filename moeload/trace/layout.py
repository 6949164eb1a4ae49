"""Default expert -> rank layout: the one home of the contiguous map (trace imports nothing above it).

DeepSpeed-MoE and Megatron-core give EP rank r the `E // G` consecutive experts
`r * E // G .. (r + 1) * E // G - 1` and require `E % G == 0`. For sizes that do not divide, the map
uses ceiling-division blocks of `per = ceil(E / G)` experts, the last rank taking what is left
(rank = min(e // per, G - 1)); for divisible sizes both are the same map. E < G puts one expert per
rank on the first E ranks.
"""

from __future__ import annotations


def contiguous_expert_to_rank(num_experts: int, num_ranks: int) -> list[int]:
    """[num_experts] EP rank of each expert under the contiguous layout (module docstring)."""
    if num_experts < 0 or num_ranks < 1:
        raise ValueError(f"contiguous map needs num_experts >= 0 and num_ranks >= 1, got {num_experts}, {num_ranks}")
    per = max(1, -(-num_experts // num_ranks))
    return [min(e // per, num_ranks - 1) for e in range(num_experts)]
