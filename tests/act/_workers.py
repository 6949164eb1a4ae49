"""What the multi-process tests of tests/act share: the launch, the worker setup, the models, their state
by logical expert, and the Replacer scenario with its checks.

Each test file there is also its own worker. Its fixture calls `launch(__file__, out, ...)`, which runs the
file under `torch.distributed.run` on real gloo ranks (CPU, one process per rank); the file's `__main__`
runs its `_worker`, which joins the group (`deepspeed_world` or `megatron_world`), builds real DeepSpeed MoE
or megatron-core MoELayer models with the builders below and ends with `write_result`. DeepSpeed,
megatron-core and moeload are imported where they are used: importing this module needs torch, numpy, pytest.
The CUDA-only calls megatron-core makes are shimmed by tests/tracing/_shims.py (`megatron_on_cpu`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
ENV = {"DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1"}  # no DeepSpeed op builds; one thread per rank on few cores
GLOO_TIMEOUT = datetime.timedelta(seconds=60)  # a collective that waits longer raises in the worker
BAD, GOOD = [1, 1, 0, 0], [0, 1, 0, 1]  # the Replacer scenario: experts 0, 1 both to rank 1; split over ranks
LOOP_STEPS = 8
INVALID = ([0, 1, 1], [0, 0, 0, 1], [0, 1, 2, 1], [0.5, 1, 0, 1], "0011")  # bad maps of 4 experts (check_refusals)


def _shims() -> ModuleType:
    """tests/tracing/_shims.py (free_port, megatron_on_cpu)."""
    here = str(ROOT / "tests" / "tracing")
    if here not in sys.path:
        sys.path.insert(0, here)
    import _shims

    return _shims


# --- the launch, on the pytest side ---


def launch(worker: str | Path, out: Path, *args: str, nproc: int = 2, prefix: str = "",
           timeout: float = 180) -> list[dict]:
    """Run `python -m torch.distributed.run --nproc_per_node <nproc> <worker> <out> <args>` from the checkout's
    root -> what each rank wrote with `write_result(out, ..., prefix)`, in rank order.

    A hard timeout: after `timeout` seconds the launcher and every process below it are killed and the test
    fails (a hung collective never hangs the suite); a non-zero exit fails it with the output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_shims().free_port()), str(worker), str(out), *args]
    # files, not pipes: reading a pipe would wait for every process that holds it, killed or not
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        p = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, cwd=ROOT, env={**os.environ, **ENV})
        hung = False
        try:
            p.wait(timeout=timeout)
        except BaseException as e:  # the timeout, or the run interrupted: no rank outlives the test
            for pid in _descendants(p.pid):  # the ranks first, while the launcher (their parent) waits on them
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.kill()
            p.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            hung = True
        stdout.seek(0)
        stderr.seek(0)
        tail = stdout.read()[-3000:] + stderr.read()[-5000:]
    if hung:
        pytest.fail(f"{Path(worker).name} on {nproc} ranks: killed after {timeout:g} s\n{tail}")
    assert p.returncode == 0, tail
    return results(out, nproc, prefix)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, read from /proc. torch.distributed.run starts each rank in a session of its
    own, so neither a process group nor a session holds them all."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def results(out: Path, nproc: int, prefix: str = "") -> list[dict]:
    """What ranks 0 .. nproc - 1 wrote with `write_result(out, ..., prefix)`."""
    return [json.loads((out / f"{prefix}rank{r}.json").read_text()) for r in range(nproc)]


# --- the worker side ---


def deepspeed_world() -> tuple[int, int]:
    """Join the gloo group that torch.distributed.run set up, through `deepspeed.init_distributed` -> (rank, world)."""
    import deepspeed
    import deepspeed.ops

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__ = {}  # no C++ op build on a CPU-only torch; gloo does the collectives
    deepspeed.init_distributed("gloo", timeout=GLOO_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def megatron_world() -> tuple[int, int]:
    """Join the gloo group that torch.distributed.run set up -> (rank, world); imports megatron-core with its
    import-time warnings silenced (later imports find it loaded)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=GLOO_TIMEOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.transformer.moe.moe_layer  # noqa: F401
    return dist.get_rank(), dist.get_world_size()


def megatron_on_cpu() -> contextlib.AbstractContextManager[None]:
    """tests/tracing/_shims.py's `megatron_on_cpu`: megatron-core MoE layers on a CPU-only torch."""
    return _shims().megatron_on_cpu()


def write_result(out: Path, res: dict, prefix: str = "") -> None:
    """This rank's result as out/<prefix>rank<r>.json (what `launch` returns), then a barrier."""
    (out / f"{prefix}rank{dist.get_rank()}.json").write_text(json.dumps(res))
    dist.barrier()


# --- models ---


class DeepSpeedNet(nn.Module):
    """DeepSpeed MoE layers in a residual stack (`self.moe`); forward([1, tokens, hidden]) -> a scalar loss,
    the output's mean square + 0.01 x the aux losses.

    layers: (top-k, drop_tokens) of each layer; num_experts: every layer's, or one per layer. Experts are
    Linear(h, 2h) GELU Linear(2h, h); capacity factor 1, min_capacity 1, use_rts=False and no sampled second
    expert: which tokens drop is then a function of each expert's column alone."""

    def __init__(self, hidden: int, num_experts: int | Sequence[int], ep_size: int,
                 layers: Sequence[tuple[int, bool]]) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        sizes = [num_experts] * len(layers) if isinstance(num_experts, int) else list(num_experts)
        self.moe = nn.ModuleList(
            MoE(hidden, nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)),
                num_experts=n, ep_size=ep_size, k=k, min_capacity=1, drop_tokens=drop, use_rts=False,
                top2_2nd_expert_sampling=False)
            for n, (k, drop) in zip(sizes, layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        aux = 0.0
        for m in self.moe:
            y, l_aux, _ = m(x)
            x, aux = x + y, aux + l_aux
        return x.pow(2).mean() + 0.01 * aux


def deepspeed_engine(model: nn.Module) -> object:
    """A DeepSpeed engine over `model`: micro-batch 1, torch's Adam (lr 1e-2, L2 mode)."""
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True, "adam_w_mode": False}}}
    return deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())[0]


def deepspeed_step(eng: object, x: torch.Tensor) -> float:
    """One training step of engine `eng` on x -> its loss."""
    loss = eng(x)
    eng.backward(loss)
    eng.step()
    return float(loss.detach())


def megatron_layer(i: int, hidden: int, num_experts: int, num_layers: int, seed: int = 0, **config: object) -> nn.Module:
    """MoELayer number i + 1 (of a `num_layers`-layer TransformerConfig), expert-model-parallel over the whole
    world, SequentialMLP experts (the local spec, no grouped GEMM), fp32 on CPU; logical expert e gets its
    own weights, 0.3 x N(0, 1) from seed `seed + 100 i + e` (CPU init draws the same local experts on every
    rank). config: more TransformerConfig keywords (the router's); add_bias_linear is False unless given."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = num_experts // world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig

        cfg = TransformerConfig(num_layers=num_layers, hidden_size=hidden, num_attention_heads=2,
                                ffn_hidden_size=2 * hidden, num_moe_experts=num_experts,
                                expert_model_parallel_size=world, use_cpu_initialization=True,
                                params_dtype=torch.float32, **{"add_bias_linear": False, **config})
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False).submodules.mlp
        layer = MoELayer(config=cfg, submodules=spec.submodules, layer_number=i + 1)
    layer.set_layer_number(i + 1)
    for j, ex in enumerate(layer.experts.local_experts):
        g = torch.Generator().manual_seed(seed + 100 * i + rank * per_rank + j)
        with torch.no_grad():
            for p in ex.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return layer


class MegatronNet(nn.Module):
    """megatron-core MoELayers in a residual stack (`self.layers`); forward([tokens, 1, hidden]) -> the output's
    mean square. The global generator is seeded with `seed` first, then `make(0) .. make(n - 1)` build the
    layers in order (their router weights are then the same on every rank)."""

    def __init__(self, seed: int, n: int, make: Callable[[int], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(make(i) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.layers:
            x = x + m(x)[0]
        return x.pow(2).mean()


def megatron_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                  before_step: Callable[[], object] | None = None) -> float:
    """One training step on x -> its loss; the non-expert (router) gradients are averaged over the world
    first, as data parallelism does (megatron marks expert parameters allreduce=False); then before_step(),
    where given (e.g. sync_replica_grads), then the optimizer step."""
    loss = net(x)
    loss.backward()
    world = dist.get_world_size()
    for p in net.parameters():
        if getattr(p, "allreduce", True) and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    if before_step is not None:
        before_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# --- checkpoints and state ---


def save_checkpoint(path: Path, module: nn.Module, optimizer: object, layout: dict | None = None) -> None:
    """torch.save {"model", "optimizer": their state dicts, and "layout" when given} to path."""
    ck = {"model": module.state_dict(), "optimizer": optimizer.state_dict()}
    if layout is not None:
        ck["layout"] = layout
    torch.save(ck, path)


def load_checkpoint(path: Path, module: nn.Module, optimizer: object) -> dict:
    """Load a `save_checkpoint` file into module and optimizer -> the checkpoint.

    A fresh torch.load each time: on CPU, Optimizer.load_state_dict keeps the loaded tensors themselves as
    its state, so models loaded from one dict would share (and update) the same Adam moments."""
    ck = torch.load(path, weights_only=False)
    module.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    return ck


def state_diff(module: nn.Module, optimizer: object, ref: dict) -> dict:
    """Max abs difference from checkpoint `ref`, slot by slot: {"model": over the module's tensors, and each
    optimizer state key ("exp_avg", "step", ...): over its tensors}."""
    d = {"model": max(float((v.double() - ref["model"][k].double()).abs().max())
                      for k, v in module.state_dict().items() if isinstance(v, torch.Tensor))}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            d[k] = max(d.get(k, 0.0), float((v - ref["optimizer"]["state"][i][k]).abs().max()))
    return d


def rows(p: torch.Tensor, opt: torch.optim.Optimizer, inv: np.ndarray) -> dict:
    """Router parameter p [experts, ...] in logical order (inv: logical -> slot) -> {"param", "grad" if any,
    and each optimizer state tensor of p that is not a scalar: list}."""
    return {"param": p.detach()[inv].tolist(), **({} if p.grad is None else {"grad": p.grad[inv].tolist()}),
            **{k: v[inv].tolist() for k, v in opt.state.get(p, {}).items() if v.dim()}}


def by_logical(layers: Sequence[tuple[Sequence[int], Sequence[nn.Module], dict]], opt: torch.optim.Optimizer) -> dict:
    """The state of a model by logical expert, gathered over the world (a collective: every rank calls).

    layers: per MoE layer, (its expert->rank map [experts], this rank's experts in slot order, its router's
    state by logical expert {key: list}). -> {layer: ({logical expert: {param i: {"param"|"grad"|state key:
    list or float}}} over all ranks, the router's dict of this rank)}."""
    rank, world = dist.get_rank(), dist.get_world_size()
    from moeload.act.permute import phy2log

    mine = {}
    for li, (e2r, experts, router) in enumerate(layers):
        p2l = phy2log(np.asarray(e2r))
        layer = {}
        for j, ex in enumerate(experts):
            layer[int(p2l[rank * len(experts) + j])] = {
                i: {"param": p.detach().tolist(), **({} if p.grad is None else {"grad": p.grad.tolist()}),
                    **{k: (v.tolist() if v.dim() else float(v)) for k, v in opt.state.get(p, {}).items()}}
                for i, p in enumerate(ex.parameters())}
        mine[li] = (layer, router)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return {li: ({e: v for r in every for e, v in r[li][0].items()}, every[rank][li][1]) for li in mine}


def replica_copy_diff(layers: Sequence[tuple[Sequence[nn.Module], Sequence[Sequence[int]]]],
                      opt: torch.optim.Optimizer) -> float:
    """Max abs difference between each replicated expert's copies (parameters, exp_avg, exp_avg_sq), over all
    ranks (a collective). layers: per MoE layer, (this rank's experts in slot order (global slot rank * len +
    j), the slots of each replicated expert, its primary first). Slots without optimizer state are left out;
    -1.0 where no expert has a copy."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {f"{li}/{rank * len(experts) + j}": torch.cat(
                [p.detach().reshape(-1) for p in ex.parameters()]
                + [opt.state[p][k].reshape(-1) for p in ex.parameters() for k in ("exp_avg", "exp_avg_sq")]).tolist()
            for li, (experts, _) in enumerate(layers) for j, ex in enumerate(experts)
            if opt.state.get(next(ex.parameters()))}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    flat = {k: v for r in every for k, v in r.items()}
    pairs = [(f"{li}/{s}", f"{li}/{c[0]}") for li, (_, groups) in enumerate(layers) for c in groups for s in c[1:]]
    return max((float(np.abs(np.subtract(flat[a], flat[b])).max()) for a, b in pairs), default=-1.0)


def two_phase_ranks(worker: str | Path, out: Path) -> dict:
    """A checkpoint test's fixture body: phases "train" and "resume", each a fresh 2-rank gloo launch of
    `worker` over the same directory -> {"out": out, "train": [per rank], "resume": [per rank]}."""
    return {"out": out, **{phase: launch(worker, out, phase, prefix=f"{phase}_") for phase in ("train", "resume")}}


def strip_seconds(history: list[dict]) -> list[dict]:
    """A Replacer history without the measured seconds (each run's own)."""
    return [{**d, "layers": {k: {n: x for n, x in v.items() if n != "seconds"} for k, v in d["layers"].items()}}
            for d in history]


def max_diff(a: dict, b: dict) -> dict:
    """Two `by_logical` states -> {key: max abs difference}: expert keys ("param", "exp_avg", ...) over all
    experts and layers, router keys as the router dicts name them."""
    d: dict = {}
    for li in a:
        for e in a[li][0]:
            for i in a[li][0][e]:
                for k, v in a[li][0][e][i].items():
                    d[k] = max(d.get(k, 0.0), float(np.abs(np.subtract(v, b[li][0][e][i][k])).max()))
        for k, v in a[li][1].items():
            d[k] = max(d.get(k, 0.0), float(np.abs(np.subtract(v, b[li][1][k])).max()))
    return d


def refusals(permute_experts: Callable, expert_to_rank: Callable, layer: nn.Module, bad_maps: Sequence,
             good_map: Sequence[int], optimizer: object) -> dict:
    """Invalid calls of `permute_experts` on `layer`, which must raise before any communication: each bad map
    on one rank at a time (the others do not call, so a collective inside would hang until the gloo timeout),
    then `good_map` with a foreign optimizer on rank 0 only (found there, shared: every rank raises).
    -> {"errors": each InputError's message or None, "unchanged_after_errors", "map_after_errors"}."""
    from moeload.errors import InputError

    rank = dist.get_rank()
    before = [p.detach().clone() for p in layer.parameters()]
    errors: list = []

    def attempt(m: Sequence, opt: object) -> None:
        try:
            permute_experts(layer, m, opt)
            errors.append(None)
        except InputError as e:
            errors.append(str(e))

    for caller in range(dist.get_world_size()):
        if rank == caller:
            for bad in bad_maps:
                attempt(bad, optimizer)
        dist.barrier()
    other = torch.optim.Adam(nn.Linear(2, 2).parameters())  # made on every rank: each draws the same numbers
    attempt(good_map, other if rank == 0 else optimizer)
    return {"errors": errors, "unchanged_after_errors": all(torch.equal(a, p) for a, p in zip(before, layer.parameters())),
            "map_after_errors": expert_to_rank(layer)}


def check_training_identical(rs: list[dict], keys: set[str]) -> None:
    """The permutation tests' runs A (never permuted), B (permuted after step 2 with its optimizer) and C (the
    control: without it), one result per rank: B trains as A, its state by logical expert is A's (`max_diff`
    over at least `keys`); C is the same up to the first update after its permutation, then apart."""
    for r in rs:
        la, lb, lc = (np.array(r["losses"][k]) for k in "ABC")
        np.testing.assert_allclose(lb, la, rtol=1e-6, atol=0)
        assert max(r["diff_B"].values()) <= 1e-6, r["diff_B"]
        assert keys <= set(r["diff_B"])
        np.testing.assert_allclose(lc[:3], la[:3], rtol=1e-6)
        assert np.abs(lc[3:] - la[3:]).max() > 1e-4 * np.abs(la).max()
        assert r["diff_C"]["exp_avg"] > 1e-4


def check_refusals(rs: list[dict]) -> None:
    """The checks of `refusals` with the INVALID maps (wrong length, [3, 1] experts per rank, a rank out of
    range, a fraction, a string; then the foreign optimizer) on a 2-rank layer of 4 experts, one result per rank."""
    for r in rs:
        errs = r["errors"]
        assert len(errs) == len(INVALID) + 1 and None not in errs
        assert "expected 4 entries" in errs[0] and "got [3, 1] experts per rank" in errs[1]
        assert "outside [0, 2)" in errs[2] and "integer ranks" in errs[3] and "string" in errs[4]
        assert "does not hold this layer's expert parameters" in errs[5]
        assert r["unchanged_after_errors"] and r["map_after_errors"] == [0, 0, 1, 1]


# --- the Replacer scenario (test_loop.py on DeepSpeed, test_megatron_loop.py on megatron-core) ---


def replacer_run(module: nn.Module, optimizer: object, step: Callable[[int], float], trace: Path, replace: bool,
                 maps: Callable[[], list], after_step: Callable[[int], None] | None = None) -> dict:
    """LOOP_STEPS steps of `step(t)` -> its loss, traced by a LoadTracer on `module` into `trace`; with
    `replace`, a Replacer checks every 2 steps (plan [BAD, BAD], then [GOOD, GOOD] from step 2; 1 us per
    route on the busiest GPU), and after the last step is given a plan of the wrong size.
    after_step(tracer step count), if given, runs after each step. -> {"losses", "history": the Replacer's
    (empty without), "maps": maps() at the end, "warned": the warnings of the wrong plan's check}."""
    from moeload import LoadTracer
    from moeload.act.loop import Replacer
    from moeload.advise.cost import Calibration

    tracer = LoadTracer(module, trace, flush_every=2, fsync=False)
    cal = Calibration(tokens=(0.0, 1e4), seconds=(0.0, 1e-2))
    rep = Replacer(tracer, [BAD, BAD], optimizer=optimizer, every=2, horizon=4, window=2, calibration=cal) if replace else None
    losses = []
    with tracer:
        for t in range(LOOP_STEPS):
            losses.append(step(t))
            tracer.step()
            if rep is not None:
                rep.on_step_end()
                if tracer.step_count == 2:
                    rep.set_plan([GOOD, GOOD])
            if after_step is not None:
                after_step(tracer.step_count)
        caught: list = []
        if rep is not None:  # a plan that does not fit fails on rank 0 only: every rank warns, nothing moves
            rep.set_plan([[0, 1], [0, 1]])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                rep.check()
    return {"losses": losses, "history": [] if rep is None else rep.history, "maps": maps(),
            "warned": [str(w.message) for w in caught]}


def check_replacer_history(rs: list[dict]) -> None:
    """The checks of `replacer_run`'s runs A (traced only) and B (with the Replacer), one result per rank."""
    for r in rs:
        h = r["B"]["history"]
        assert [d["step"] for d in h] == [2, 4, 6, 8, 8]
        # step 2: both experts to rank 1 is as unbalanced as before: no gain, not applied
        assert h[0]["apply"] == {} and set(h[0]["layers"]) == {"0", "1"}
        assert all(v["gain_s"] <= v["cost_s"] for v in h[0]["layers"].values())
        # step 4: splitting experts 0 and 1 halves the busiest GPU's routes: applied on both layers
        assert h[1]["apply"] == {"0": GOOD, "1": GOOD}
        for v in h[1]["layers"].values():
            assert v["gain_s"] > v["cost_s"] > 0 and v["after_s"] < v["before_s"]
            assert v["experts_moved"] == 2 and v["bytes_total"] > 0 and v["seconds"] > 0
        assert all(d["apply"] == {} and d["why"] == "the plan is the map in force" for d in h[2:4])
        assert "plan[0]: expected 4 entries" in h[4]["error"] and h[4]["apply"] == {}
        assert len(r["B"]["warned"]) == 1 and "re-placement check at step 8 failed on rank 0" in r["B"]["warned"][0]
        assert r["B"]["maps"] == [GOOD, GOOD] and r["A"]["maps"] == [[0, 0, 1, 1]] * 2
        # re-placement is transparent: the same losses as the run without it
        np.testing.assert_allclose(r["B"]["losses"], r["A"]["losses"], rtol=1e-6, atol=0)
    # one decision (rank 0's, broadcast); only the measured bytes and seconds are each rank's own
    strip = [[{**d, "layers": {k: {n: x for n, x in v.items() if n != "seconds"} for k, v in d["layers"].items()}}
              for d in r["B"]["history"]] for r in rs]
    assert strip[0] == strip[1]


def check_trace_follows_change(out: Path, skew: float) -> None:
    """The traces of runs A and B (out/a, out/b): the change at step 4 recorded, counts per logical expert,
    experts 0 and 1 take more than `skew` of the routes, GPU loads follow the change and get lighter."""
    from moeload import open_trace

    a, b = open_trace(out / "a"), open_trace(out / "b")
    assert a.meta["rank_map_changes"] == []
    assert b.meta["rank_map_changes"] == [{"step": 4, "layer": 0, "expert_to_rank": GOOD},
                                          {"step": 4, "layer": 1, "expert_to_rank": GOOD}]
    c = b.counts()
    np.testing.assert_array_equal(c, a.counts())  # counts stay per logical expert across the change
    assert (c[:, :, :2].sum(-1) > skew * c.sum(-1)).all()
    ga, gb = a.gpu_loads(), b.gpu_loads()
    np.testing.assert_array_equal(gb[:4], ga[:4])
    np.testing.assert_array_equal(gb[4:], np.stack([c[4:, :, 0::2].sum(-1), c[4:, :, 1::2].sum(-1)], -1))
    assert (gb[4:].max(-1) < ga[4:].max(-1)).all()  # the busiest GPU got lighter after the change
