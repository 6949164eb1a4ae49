"""EPLB-style placement (DeepSeek's expert-parallel load balancer), written from its description.

Global policy: give each extra replica to the expert with the highest load per replica (its load is
split evenly among its replicas), then pack the replicas onto GPUs heaviest first, each into the
lightest GPU that still has a free slot. Hierarchical policy (`num_groups`, `num_nodes`): pack
expert groups onto nodes the same way, replicate within each node, pack onto the node's GPUs.
Ties go to the lowest index (stable sort, first minimum), which reproduces the published example.
"""

from __future__ import annotations

import numpy as np

from moeload.errors import InputError
from moeload.placement._placement import Placement, even_share


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack `weight: [n]` items into `num_packs` packs of exactly n / num_packs items each.

    Heaviest first, each into the lightest pack with room. Returns `pack: [n]` and `rank: [n]`
    (position of the item inside its pack, in order of arrival).
    """
    n = weight.shape[0]
    per_pack = n // num_packs
    if per_pack == 1:
        return np.arange(n), np.zeros(n, dtype=np.int64)
    pack = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    loads = np.zeros(num_packs)
    items = np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-weight, kind="stable"):
        open_packs = np.flatnonzero(items < per_pack)
        p = open_packs[np.argmin(loads[open_packs])]
        pack[item], rank[item] = p, items[p]
        loads[p] += weight[item]
        items[p] += 1
    return pack, rank


def replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread `weight: [n]` over `num_phy >= n` replicas, extra ones to the highest load per replica.

    Returns `phy2log: [num_phy]` (first n entries are 0..n-1), `rank: [num_phy]` replica index of
    each physical expert, `count: [n]` replicas per logical expert.
    """
    n = weight.shape[0]
    phy2log = np.concatenate([np.arange(n), np.zeros(num_phy - n, dtype=np.int64)])
    rank = np.zeros(num_phy, dtype=np.int64)
    count = np.ones(n, dtype=np.int64)
    for i in range(n, num_phy):
        e = int(np.argmax(weight / count))
        phy2log[i], rank[i] = e, count[e]
        count[e] += 1
    return phy2log, rank, count


def _layer(w: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """One layer `w: [E]` -> `phy2log: [num_replicas]`."""
    num_experts = w.shape[0]
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    per_node_log = num_experts // num_nodes
    per_node_phy = num_replicas // num_nodes
    slots = num_replicas // num_gpus

    group_pack, group_rank = balanced_packing(w.reshape(num_groups, group_size).sum(1), num_nodes)
    # Node-major order of logical experts: groups of node 0 first, in the order they were packed.
    log2mlog = ((group_pack * groups_per_node + group_rank) * group_size)[:, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(-1)
    mlog2log = np.empty_like(log2mlog)
    mlog2log[log2mlog] = np.arange(num_experts)

    out = np.empty(num_replicas, dtype=np.int64)
    for node in range(num_nodes):
        node_log = mlog2log[node * per_node_log : (node + 1) * per_node_log]
        phy2mlog, _, count = replicate(w[node_log], per_node_phy)
        per_phy = (w[node_log] / count)[phy2mlog]
        pack, rank = balanced_packing(per_phy, num_gpus // num_nodes)
        position = pack * slots + rank
        node_out = np.empty(per_node_phy, dtype=np.int64)
        node_out[position] = node_log[phy2mlog]
        out[node * per_node_phy : (node + 1) * per_node_phy] = node_out
    return out


def _global_batched(weight: np.ndarray, num_replicas: int, num_gpus: int) -> np.ndarray:
    """The global policy (one group, one node) for all layers at once: `weight: [L, E]` -> `[L, R]`.

    The same steps, ties and orders as `_layer` with `num_groups = num_nodes = 1`, vectorised over
    layers (R + (R - E) NumPy steps instead of L times as many Python ones).
    """
    L, E = weight.shape
    rows = np.arange(L)
    phy2log = np.concatenate([np.tile(np.arange(E), (L, 1)), np.zeros((L, num_replicas - E), dtype=np.int64)], 1)
    count = np.ones((L, E), dtype=np.int64)
    for i in range(E, num_replicas):
        e = np.argmax(weight / count, axis=1)
        phy2log[:, i] = e
        count[rows, e] += 1
    per_phy = np.take_along_axis(weight / count, phy2log, axis=1)  # [L, R]
    slots = num_replicas // num_gpus
    if slots == 1:
        pack, rank = np.tile(np.arange(num_replicas), (L, 1)), np.zeros((L, num_replicas), dtype=np.int64)
    else:
        pack = np.full((L, num_replicas), -1, dtype=np.int64)
        rank = np.full((L, num_replicas), -1, dtype=np.int64)
        loads = np.zeros((L, num_gpus))
        items = np.zeros((L, num_gpus), dtype=np.int64)
        order = np.argsort(-per_phy, axis=1, kind="stable")
        for j in range(num_replicas):
            item = order[:, j]
            p = np.argmin(np.where(items < slots, loads, np.inf), axis=1)
            pack[rows, item], rank[rows, item] = p, items[rows, p]
            loads[rows, p] += per_phy[rows, item]
            items[rows, p] += 1
    out = np.empty((L, num_replicas), dtype=np.int64)
    out[rows[:, None], pack * slots + rank] = phy2log
    return out


def plan_eplb(
    weight: np.ndarray, num_gpus: int, num_replicas: int, *, num_groups: int = 1, num_nodes: int = 1
) -> Placement:
    """EPLB placement of `weight: [L, E]`; hierarchical when `num_groups % num_nodes == 0`.

    As in DeepSeek's EPLB, group counts that `num_nodes` does not divide fall back to the global
    policy (one group, one node). Sizes that the chosen policy cannot honour raise InputError.
    """
    num_experts = weight.shape[1]
    for name, value in (("num_groups", num_groups), ("num_nodes", num_nodes)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    if num_experts % num_groups:
        raise InputError(f"num_groups={num_groups} does not divide the number of experts {num_experts}")
    if num_gpus % num_nodes:
        raise InputError(f"num_nodes={num_nodes} does not divide num_gpus={num_gpus}")
    if num_groups == 1 and num_nodes == 1:
        phy2log = _global_batched(weight, num_replicas, num_gpus)
    else:
        phy2log = np.stack([_layer(w, num_replicas, num_groups, num_nodes, num_gpus) for w in weight])
    return Placement(
        phy2log,
        even_share(phy2log, num_experts),
        num_gpus,
        weight,
        "eplb",
        {"num_groups": num_groups, "num_nodes": num_nodes},
    )
