"""megatron-core's `dist_checkpointing` (torch_dist backend) across a re-placement: a permuted plain MoELayer
and a replica layer in one model, saved with `sharded_state_dict()` + `dist_checkpointing.save` and resumed in
a fresh process group. Real MoELayers (SequentialMLP experts, allgather dispatcher), EP 2 over 2 gloo ranks on
CPU, two separate launches.

This file is also the worker. "train": B has layer 0 (4 experts, sigmoid top-2 with a non-zero expert bias)
and layer 1 (4 experts in 6 slots, a ReplicaRouter, top-1 favouring expert 0). After step 2 layer 0 is
permuted to PERM and layer 1 gets a copy of expert 0 on rank 1 (COPY). After step N every rank saves: the
model through dist_checkpointing (one directory for all ranks), its `layout_state_dict` and its torch
optimizer's state_dict in files of its own (torch.save: megatron's distributed optimizer needs megatron's
DDP, which moeload refuses), and, for the checks only, its module's and optimizer's torch state dicts
(`ref`). B goes on to STEPS and saves those again (`end`). "resume": fresh models from another seed, in a new
process group: R applies the layout, then `dist_checkpointing.load` + `load_state_dict` and the optimizer's
file, and trains steps N .. STEPS - 1; R0, the control, loads the same without the layout.

megatron-core 0.16.1's torch_dist save runs on a CPU-only torch with the shims of `megatron_on_cpu` and one
more, a torch.cuda.synchronize() that does nothing (`torch_dist_save_on_cpu`, below); loading needs none beyond
`megatron_on_cpu`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _workers import (
    MegatronNet,
    by_logical,
    max_diff,
    megatron_layer,
    megatron_on_cpu,
    megatron_step,
    megatron_world,
    replica_copy_diff,
    save_checkpoint,
    state_diff,
    two_phase_ranks,
    write_result,
)

H, TOKENS, E, S, N, STEPS = 16, 32, 4, 6, 4, 7
CONF = (
    dict(moe_router_topk=2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    dict(moe_router_topk=1, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
         moe_router_pre_softmax=True),
)
PERM = [1, 0, 1, 0]  # layer 0: experts 1, 3 on rank 0, experts 0, 2 on rank 1
PHY2LOG = [1, 3, 0, 2]  # the logical expert in each of its slots under PERM
INITIAL, COPY = [0, 1, -1, 2, 3, -1], [0, 1, -1, 2, 3, 0]  # layer 1: a copy of hot expert 0 in rank 1's free slot
FC1 = "layers.{}.experts.experts.linear_fc1.weight"  # the sharded key of a layer's experts' fc1 weights
EXTRA = "layers.1.router._extra_state"  # the replica router's slot map
REPLICATED = ("router.weight", "router.expert_bias", "experts.local_experts.0.linear_fc1.weight")


@contextlib.contextmanager
def torch_dist_save_on_cpu() -> Iterator[None]:
    """megatron-core 0.16.1's synchronous torch_dist save (`dist_checkpointing.save`) on a CPU-only torch, a
    little faster; restores both on exit."""
    import queue

    import torch
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved_sync, saved_queue = torch.cuda.synchronize, filesystem_async._results_queue
    # Replaces torch.cuda.synchronize() (needed): FileSystemWriterAsync.preload_tensors copies every tensor to the
    # host with non_blocking=True, then waits for the copies with it, on the synchronous path too; a CPU-only torch
    # raises "Torch not compiled with CUDA enabled" there. On CPU the tensors are on the host already: a no-op.
    torch.cuda.synchronize = lambda device=None: None
    # Fills filesystem_async._results_queue (for time only; the save runs without it): megatron makes it a queue of
    # a multiprocessing Manager, a spawned process that re-imports this file (torch, megatron: ~4 s on 2 cores).
    # On the synchronous path the writer processes' results are put into it and read back by the calling process
    # itself, so a queue.Queue carries them the same way.
    if saved_queue is None:
        filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        torch.cuda.synchronize = saved_sync
        filesystem_async._results_queue = saved_queue


def _worker(out: Path, phase: str) -> None:
    import torch
    import torch.distributed as dist

    rank, world = megatron_world()
    from megatron.core import dist_checkpointing, parallel_state

    from moeload.act.checkpoint import apply_layout, layout_state_dict
    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.act.megatron_replicas import add_replica, enable_replicas, replica_router, sync_replica_grads

    gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank, the same in both phases
    xs = [torch.randn(TOKENS, 1, H, generator=gen) + 1.0 for _ in range(STEPS)]
    dcp = out / "dcp"

    def net(seed: int) -> tuple[MegatronNet, torch.optim.Optimizer]:
        m = MegatronNet(seed, 2, lambda i: megatron_layer(i, H, (E, S)[i], 2, seed=seed, **CONF[i]))
        with torch.no_grad():
            m.layers[0].router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
            enable_replicas(m.layers[1], E)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    def step(m: MegatronNet, o: torch.optim.Optimizer, t: int) -> float:
        return megatron_step(m, o, xs[t], lambda: sync_replica_grads(m))

    def sharded(m: MegatronNet) -> dict:
        """The model's sharded state dict: each MoELayer's own (MegatronModule.sharded_state_dict), by path."""
        return {k: v for i, layer in enumerate(m.layers) for k, v in layer.sharded_state_dict(f"layers.{i}.").items()}

    def ckpt(name: str) -> Path:
        return out / f"{name}_rank{rank}.pt"

    def fc1(i: int, j: int) -> str:
        """The module key of layer i's local expert j's fc1 weight (its sharded key is FC1)."""
        return f"layers.{i}.experts.local_experts.{j}.linear_fc1.weight"

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    def maps(m: MegatronNet) -> list:
        return [expert_to_rank(m.layers[0]), replica_router(m.layers[1]).slot_expert]

    def copy_diff(m: MegatronNet, o: torch.optim.Optimizer) -> float:
        r = replica_router(m.layers[1])
        return replica_copy_diff([(m.layers[1].experts.local_experts, r.replicated())], o)

    def logical(m: MegatronNet, o: torch.optim.Optimizer) -> dict:
        """Layer 0's experts by logical expert, as the layer's map names them (a collective)."""
        return by_logical([(expert_to_rank(m.layers[0]), m.layers[0].experts.local_experts, {})], o)

    res: dict = {"rank": rank}
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        if phase == "train":
            B, ob = net(0)
            with torch.no_grad():  # inputs have mean 1: layer 1 routes most tokens to expert 0
                B.layers[1].router.weight[:1] += 0.5
            losses = []
            for t in range(STEPS):
                if t == 2:
                    res["moved"] = permute_experts(B.layers[0], PERM, ob)["experts_moved"]
                    add_replica(B.layers[1], 0, 5, ob)
                losses.append(step(B, ob, t))
                if t == N - 1:
                    sd = sharded(B)
                    res["keys_are_state_dict_keys"] = set(sd) == set(B.state_dict())
                    res["fc1_offsets"] = [[sd[fc1(i, j)].global_offset[0] for j in range(len(m.experts.local_experts))]
                                          for i, m in enumerate(B.layers)]
                    res["replica_ids"] = {k: list(sd[f"layers.0.{k}"].replica_id) for k in REPLICATED}
                    x = sd[EXTRA]
                    res["extra"] = {"type": type(x).__name__, "key": x.key, "data": x.data,
                                    "replica_id": list(x.replica_id)}
                    dcp.mkdir(exist_ok=True)
                    with torch_dist_save_on_cpu():
                        dist_checkpointing.save(sd, str(dcp))
                    torch.save(layout_state_dict(B), ckpt("layout"))
                    torch.save(ob.state_dict(), ckpt("optimizer"))
                    save_checkpoint(ckpt("ref"), B, ob)
                    res["maps_saved"], res["copy_diff_saved"] = maps(B), copy_diff(B, ob)
            save_checkpoint(ckpt("end"), B, ob)
            res.update(losses=losses, maps=maps(B), copy_diff=copy_diff(B, ob))
        else:
            ref = torch.load(ckpt("ref"), weights_only=False)
            R, orr = net(5)
            R0, o0 = net(5)
            res["maps_fresh"] = maps(R)
            res["moved"] = {k: v["experts_moved"] for k, v in apply_layout(R, torch.load(ckpt("layout")), orr).items()}
            loaded = dist_checkpointing.load(sharded(R), str(dcp))
            res["extra_loaded"] = loaded[EXTRA]
            R.load_state_dict(loaded)
            orr.load_state_dict(torch.load(ckpt("optimizer")))
            R0.load_state_dict(dist_checkpointing.load(sharded(R0), str(dcp)))  # the control: no layout
            o0.load_state_dict(torch.load(ckpt("optimizer")))
            res["maps_loaded"], res["maps_R0"] = maps(R), maps(R0)
            res["diff_loaded"], res["diff_R0"] = state_diff(R, orr, ref), state_diff(R0, o0, ref)
            res["copy_diff_loaded"] = copy_diff(R, orr)
            lr, l0 = logical(R, orr)[0][0], logical(R0, o0)[0][0]
            res["logical_R0"] = max_diff({0: (l0, {})}, {0: (lr, {})})
            # the checkpoint read by its keys alone (every tensor whole): index p of an expert tensor is slot p
            plain = dist_checkpointing.load_plain_tensors(str(dcp))
            res["plain_shapes"] = [list(plain[FC1.format(i)].shape) for i in (0, 1)]
            w0, w1 = plain[FC1.format(0)], plain[FC1.format(1)]
            res["plain_vs_slot"] = max(gap(w[rank * len(m.experts.local_experts) + j], ref["model"][fc1(i, j)])
                                       for i, (w, m) in enumerate(zip((w0, w1), R.layers))
                                       for j in range(len(m.experts.local_experts)))
            res["plain_vs_logical"] = {name: [gap(w0[p], torch.tensor(lr[e][0]["param"])) for p, e in enumerate(order)]
                                       for name, order in (("phy2log", PHY2LOG), ("same_index", range(E)))}
            res["plain_copy_vs_primary"] = gap(w1[5], w1[0])
            res["losses"] = [step(R, orr, t) for t in range(N, STEPS)]
            res["losses_R0"] = [step(R0, o0, t) for t in range(N, STEPS)]
            end = torch.load(ckpt("end"), weights_only=False)
            res.update(maps=maps(R), copy_diff=copy_diff(R, orr), diff_end=state_diff(R, orr, end))
        parallel_state.destroy_model_parallel()
    write_result(out, res, prefix=f"{phase}_")
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    return two_phase_ranks(__file__, tmp_path_factory.mktemp("megatron_dist_ckpt"))


@pytest.mark.slow
def test_dist_checkpointing_holds_experts_by_slot_and_the_slot_map_as_a_sharded_object(ranks):
    for r, (tr, rs) in enumerate(zip(ranks["train"], ranks["resume"])):
        assert tr["moved"] == 2 and tr["maps_saved"] == tr["maps"] == [PERM, COPY] and tr["copy_diff"] == 0.0
        assert tr["keys_are_state_dict_keys"]
        # expert tensors are sharded by global slot index, rank x local experts + j, whatever the map
        assert tr["fc1_offsets"] == [[2 * r, 2 * r + 1], [3 * r, 3 * r + 1, 3 * r + 2]]
        # (PP, TP, DP) replica ids: the router's tensors (by slot too) are written by data-parallel rank 0 alone,
        # each rank writes its own slots (the expert data-parallel group has one rank)
        assert tr["replica_ids"] == dict(zip(REPLICATED, ([0, 0, r], [0, 0, r], [0, 0, 0])))
        # the slot map: one ShardedObject per layer, written once (data-parallel rank 0), loaded on every rank
        assert tr["extra"] == {"type": "ShardedObject", "key": EXTRA, "data": {"slot_expert": COPY},
                               "replica_id": [0, 0, r]}
        assert rs["extra_loaded"] == {"slot_expert": COPY}
        # read by key, the checkpoint holds [slots, ...] tensors: index p is slot p, logical expert PHY2LOG[p]
        assert rs["plain_shapes"] == [[E, 2 * H, H], [S, 2 * H, H]] and rs["plain_vs_slot"] == 0.0
        assert rs["plain_vs_logical"]["phy2log"] == [0.0] * E and min(rs["plain_vs_logical"]["same_index"]) > 0
        assert rs["plain_copy_vs_primary"] == 0.0  # the copy is saved again under its own slot


@pytest.mark.slow
def test_layout_first_then_dist_checkpointing_load_continues_the_uninterrupted_run(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        assert rs["maps_fresh"] == [[0, 0, 1, 1], INITIAL]
        assert rs["moved"] == {"layers.0": 2}  # the plain layer only; load_state_dict installs the slot map
        assert rs["maps_loaded"] == [PERM, COPY] and rs["copy_diff_loaded"] == 0.0
        assert {"model", "exp_avg", "exp_avg_sq", "step"} <= set(rs["diff_loaded"])
        assert max(rs["diff_loaded"].values()) == 0.0, rs["diff_loaded"]
        np.testing.assert_allclose(rs["losses"], tr["losses"][N:], rtol=1e-6, atol=0)
        assert rs["maps"] == tr["maps"] and rs["copy_diff"] == 0.0
        assert max(rs["diff_end"].values()) <= 1e-6, rs["diff_end"]


@pytest.mark.slow
def test_without_the_layout_the_same_slots_name_the_wrong_experts(ranks):
    for tr, rs in zip(ranks["train"], ranks["resume"]):
        # the replica layer's map came with the checkpoint; the plain layer's did not
        assert rs["maps_R0"] == [[0, 0, 1, 1], COPY] and max(rs["diff_R0"].values()) == 0.0
        np.testing.assert_allclose(rs["losses_R0"], tr["losses"][N:], rtol=1e-6, atol=0)  # the same function
        assert rs["logical_R0"]["param"] > 0.1  # but logical expert e is wherever slot e was


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
