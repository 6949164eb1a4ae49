"""megatron-core's alltoall token dispatcher (`moe_token_dispatcher_type="alltoall"`) with moeload's tracer,
`act.megatron.permute_experts` and `act.megatron_replicas`: real MoELayers (SequentialMLP experts), 2 gloo
processes on CPU, expert-model-parallel size 2, 4 logical experts.

This file is also the worker: pytest runs it once under `torch.distributed.run` (_workers.launch); each rank
writes what it measured to rank<r>.json. The CUDA-only calls megatron makes are shimmed by
tests/tracing/_shims.py (`megatron_on_cpu`) and, for this dispatcher, by `alltoall_on_cpu` below. Four models
from the same weights and per-rank inputs, 5 AdamW steps: G uses the allgather dispatcher (the reference); A,
B and C the alltoall one. A is plain; B is permuted after step 2 (with its optimizer, and
`tracer.record_rank_map`); C has 6 slots (`enable_replicas(layer, 4)`) and after step 2 each layer's busiest
expert gets a copy on the other rank (`sync_replica_grads` every step). A, B and C are traced. Hooks record
the truth: each router's routing map per forward (by column) and the rows each local expert received from
the dispatcher. The routers are those of test_megatron_replicas.py: top-2 softmax with aux loss; sigmoid
top-2 with a non-zero expert bias and a router bias; top-1 with capacity factor 1 (drops) and the global aux loss.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _workers import MegatronNet, launch, megatron_layer, megatron_on_cpu, megatron_step, megatron_world, write_result

H, TOKENS, STEPS, K, E = 16, 32, 5, 2, 4
MAPS = ([1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0])  # B's layers 0, 1, 2 after step K
ROUTERS = (
    dict(moe_router_topk=2, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
    dict(moe_router_topk=2, moe_router_load_balancing_type="none", moe_router_score_function="sigmoid",
         moe_router_enable_expert_bias=True),
    dict(moe_router_topk=1, moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-1,
         moe_router_pre_softmax=True, moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
)


class _HostEvent:
    def synchronize(self) -> None:
        """Host work is done when it returns: nothing to wait for."""


class _HostStream:
    """A stand-in for torch.cuda.Stream: on the host every copy is synchronous."""

    def wait_stream(self, other: object) -> None:
        """Nothing to order on the host."""

    def record_event(self) -> _HostEvent:
        return _HostEvent()


@contextlib.contextmanager
def alltoall_on_cpu() -> Iterator[None]:
    """Run megatron-core 0.16.1's MoEAlltoAllTokenDispatcher on CPU; restores everything on exit.

    The dispatcher computes its all-to-all splits on the device, then copies them to the host on a side
    stream (`_maybe_dtoh_and_synchronize`): `torch.cuda.Stream()` in `__init__`, `current_stream()`,
    `torch.cuda.stream(...)` and an event's `synchronize()` there, which a CPU-only torch lacks; the
    `_HostStream` stand-ins do nothing, as nothing is in flight on the host. Its `maybe_move_tensor_to_cpu`
    turns only CUDA tensors into the NumPy splits that `torch.distributed.all_to_all_single` takes; a host
    tensor stays a tensor, which all_to_all_single refuses (TypeError), so the shim gives host tensors the
    NumPy view that a device tensor would get. Nothing the dispatcher routes or computes changes."""
    import torch
    from megatron.core.transformer.moe import token_dispatcher as td

    saved = (torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream, td.maybe_move_tensor_to_cpu,
             td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream)
    main = _HostStream()
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda device=None: main
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    td.maybe_move_tensor_to_cpu = lambda t, as_numpy=False, record_stream=False: (
        t.numpy() if as_numpy and torch.is_tensor(t) else t)
    try:
        yield
    finally:
        (torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream, td.maybe_move_tensor_to_cpu,
         td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream) = saved


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, world = megatron_world()
    from megatron.core import parallel_state

    from moeload import LoadTracer
    from moeload.act.megatron import expert_to_rank, permute_experts
    from moeload.act.megatron_replicas import add_replica, enable_replicas, replica_router, sync_replica_grads
    from moeload.act.permute import phy2log

    L, S = E // world, E + world
    Ls = S // world

    def plain_layer(i: int, dispatcher: str) -> nn.Module:
        layer = megatron_layer(i, H, E, len(ROUTERS), moe_token_dispatcher_type=dispatcher, **ROUTERS[i])
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(torch.linspace(0.3, -0.2, E))
            layer.router.bias = nn.Parameter(0.1 * torch.randn(E))
        return layer

    def opt(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    res: dict = {"rank": rank}
    with megatron_on_cpu(), alltoall_on_cpu():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
        G, A, B = (MegatronNet(0, len(ROUTERS), lambda i, d=d: plain_layer(i, d))
                   for d in ("allgather", "alltoall", "alltoall"))
        C = MegatronNet(1, len(ROUTERS), lambda i: megatron_layer(i, H, S, len(ROUTERS), seed=7,
                                                                  moe_token_dispatcher_type="alltoall", **ROUTERS[i]))
        with torch.no_grad():  # C: A's routers and experts, each logical expert in its home slot
            for a, c in zip(A.layers, C.layers):
                r = enable_replicas(c, E)
                r.weight.copy_(a.router.weight)
                if a.router.bias is not None:
                    r.bias = nn.Parameter(a.router.bias.detach().clone())
                if a.router.expert_bias is not None:
                    r.expert_bias.copy_(a.router.expert_bias)
                for j, ex in enumerate(a.experts.local_experts):
                    for p, q in zip(ex.parameters(), c.experts.local_experts[j].parameters()):
                        q.copy_(p)
        nets = {"G": G, "A": A, "B": B, "C": C}
        opts = {n: opt(net) for n, net in nets.items()}
        res["dispatchers"] = {n: [type(m.token_dispatcher).__name__ for m in net.layers] for n, net in nets.items()}
        res["router_class"] = type(C.layers[0].router).__name__

        # the truth: each router's last routing map by column [E or S]; the rows each local expert received
        cols: dict = {n: [None] * len(ROUTERS) for n in "ABC"}
        rows: dict = {n: [[0] * len(m.experts.local_experts) for m in nets[n].layers] for n in "ABC"}
        for n in "ABC":
            for li, m in enumerate(nets[n].layers):
                m.router.register_forward_hook(
                    lambda mod, i, o, n=n, li=li: cols[n].__setitem__(li, o[1].sum(0, dtype=torch.int64)))
                for j, ex in enumerate(m.experts.local_experts):
                    def count_rows(mod: nn.Module, i: tuple, n: str = n, li: int = li, j: int = j) -> None:
                        rows[n][li][j] += int(i[0].shape[0])
                    ex.register_forward_pre_hook(count_rows)

        gen = torch.Generator().manual_seed(1000 + rank)  # different tokens on each rank
        xs = [torch.randn(TOKENS, 1, H, generator=gen) for _ in range(STEPS)]
        tracers = {n: LoadTracer(nets[n], out / n.lower(), flush_every=2, fsync=False).start() for n in "ABC"}
        losses: dict = {n: [] for n in nets}
        truth: dict = {n: [] for n in "ABC"}  # per step: [layers][E] this rank's routes per logical expert
        columns: dict = {n: [] for n in "ABC"}  # per step: [layers][E or S] this rank's routes per router column
        received: dict = {n: [] for n in "ABC"}  # per step: [layers][local experts] rows the dispatcher delivered
        for t in range(STEPS):
            if t == K:
                res["permute"] = []
                for li, (m, mp) in enumerate(zip(B.layers, MAPS)):
                    res["permute"].append(permute_experts(m, mp, opts["B"]))
                    tracers["B"].record_rank_map(K, li, mp, phy2log=phy2log(np.asarray(mp)).tolist())
                res["hot"] = []
                for li, m in enumerate(C.layers):
                    routed = cols["A"][li].clone()
                    dist.all_reduce(routed)  # the last step's routes per expert, over both ranks
                    e = int(routed.argmax())
                    add_replica(m, e, (e // L + 1) % world * Ls + L, opts["C"])  # the other rank's free slot
                    res["hot"].append(e)
            for n, net in nets.items():
                losses[n].append(megatron_step(net, opts[n], xs[t], (lambda: sync_replica_grads(C)) if n == "C" else None))
            for tr in tracers.values():
                tr.step()
            truth["A"].append([c.tolist() for c in cols["A"]])
            truth["B"].append([np.bincount(phy2log(np.asarray(expert_to_rank(m))), weights=c.numpy(),
                                           minlength=E).astype(int).tolist() for m, c in zip(B.layers, cols["B"])])
            truth["C"].append([torch.zeros(E + 1, dtype=torch.int64).index_add_(0, replica_router(m).slot_logical, c)
                               [:E].tolist() for m, c in zip(C.layers, cols["C"])])
            for n in "ABC":
                columns[n].append([c.tolist() for c in cols[n]])
                received[n].append(rows[n])
                rows[n] = [[0] * len(r) for r in rows[n]]
        for tr in tracers.values():
            tr.close()
        res.update(losses=losses, truth=truth, columns=columns, received=received,
                   maps=[expert_to_rank(m) for m in B.layers], slots=[replica_router(m).slot_expert for m in C.layers])
        parallel_state.destroy_model_parallel()
    write_result(out, res)
    dist.destroy_process_group()


pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """This file as the worker on 2 gloo ranks, launched once -> (its directory, what each rank measured)."""
    out = tmp_path_factory.mktemp("mcore_alltoall")
    return out, launch(__file__, out)


@pytest.mark.slow
def test_alltoall_runs_the_allgather_function(ranks):
    _, rs = ranks
    for r in rs:
        assert r["dispatchers"]["G"] == ["MoEAllGatherTokenDispatcher"] * 3
        assert all(r["dispatchers"][n] == ["MoEAlltoAllTokenDispatcher"] * 3 for n in "ABC")
        np.testing.assert_allclose(r["losses"]["A"], r["losses"]["G"], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_tracer_counts_are_exact(ranks):
    from moeload import open_trace

    out, rs = ranks
    a = open_trace(out / "a")
    assert a.meta["ep_size"] == 2 and a.meta["expert_to_rank"] == [[0, 0, 1, 1]] * 3
    truth = np.array([r["truth"]["A"] for r in rs]).transpose(1, 0, 2, 3)  # [S, R, L, E]
    np.testing.assert_array_equal(a.rank_counts(), truth)
    np.testing.assert_array_equal(a.counts(), truth.sum(1))  # global = the sum over the 2 ranks
    per_rank = truth.sum(-1)  # [S, R, L]: tokens x top-k where nothing drops; the capacity layer keeps fewer
    assert (per_rank[:, :, :2] == TOKENS * 2).all()
    assert (per_rank[:, :, 2] <= TOKENS).all() and (per_rank[:, :, 2] < TOKENS).any()
    assert a.meta["extra"]["layer_count_kinds"] == ["routed", "routed", "kept"]
    assert not np.array_equal(truth[:, 0], truth[:, 1])
    assert (a.tokens() == TOKENS * 2).all()  # [S, L]: each rank's 32 tokens reached every router


@pytest.mark.slow
def test_dispatcher_delivers_each_column_to_its_slot(ranks):
    """The rows each local expert received equal the routes of its router column over both ranks: plain,
    permuted and with replicas (6 slot columns, 3 local experts per rank)."""
    _, rs = ranks
    for n, local in (("A", E // 2), ("B", E // 2), ("C", (E + 2) // 2)):
        cols = np.array([r["columns"][n] for r in rs]).sum(0)  # [S, L, columns] over both ranks
        for rank, r in enumerate(rs):
            np.testing.assert_array_equal(np.array(r["received"][n]), cols[:, :, rank * local:(rank + 1) * local])


@pytest.mark.slow
def test_permutation_keeps_the_function_and_logical_counts(ranks):
    from moeload import open_trace

    out, rs = ranks
    for r in rs:
        np.testing.assert_allclose(r["losses"]["B"], r["losses"]["A"], rtol=1e-6, atol=0)
        assert r["maps"] == [list(m) for m in MAPS]
        assert [s["experts_moved"] for s in r["permute"]] == [2, 4, 2]
        # the permuted router columns differ from the plain ones: the counts are logical only through the map
        assert r["columns"]["B"][K:] != r["columns"]["A"][K:]
        np.testing.assert_array_equal(r["truth"]["B"], r["truth"]["A"])
    a, b = open_trace(out / "a"), open_trace(out / "b")
    np.testing.assert_array_equal(b.rank_counts(), np.array([r["truth"]["B"] for r in rs]).transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(b.counts(), a.counts())
    assert b.meta["rank_map_changes"] == [{"step": K, "layer": li, "expert_to_rank": list(m)} for li, m in enumerate(MAPS)]


@pytest.mark.slow
def test_replicas_keep_the_function_and_logical_counts(ranks):
    from moeload import open_trace

    out, rs = ranks
    for r in rs:
        assert r["router_class"] == "ReplicaRouter"
        np.testing.assert_allclose(r["losses"]["C"], r["losses"]["A"], rtol=1e-6, atol=0)
        np.testing.assert_array_equal(r["truth"]["C"], r["truth"]["A"])
        for li, e in enumerate(r["hot"]):
            assert r["slots"][li].count(e) == 2
    # both copies took part of the hot expert's tokens from step K on: its home slot and, on the other rank,
    # the copy's slot received rows
    got = np.array([r["received"]["C"] for r in rs])  # [R, S, L, local experts]
    for li, e in enumerate(rs[0]["hot"]):
        home, copy = e // 2 * 3 + e % 2, (e // 2 + 1) % 2 * 3 + 2
        assert (got[copy // 3, K:, li, copy % 3] > 0).all() and (got[home // 3, K:, li, home % 3] > 0).all()
        assert (got[copy // 3, :K, li, copy % 3] == 0).all()
    a, c = open_trace(out / "a"), open_trace(out / "c")
    np.testing.assert_array_equal(c.rank_counts(), np.array([r["truth"]["C"] for r in rs]).transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(c.counts(), a.counts())
    for key in ("layers", "experts_per_layer", "ep_size", "expert_to_rank", "count_kind"):
        assert c.meta.get(key) == a.meta.get(key), key


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
