"""The loop: apply a re-placement plan during training when the cost model says it pays.

::

    tracer = LoadTracer(engine.module, "runs/exp1.moeload", flush_every=100)
    planner = OnlinePlanner(tracer, num_gpus=ep_size)          # or plans given with set_plan()
    replacer = Replacer(tracer, planner, optimizer=engine, every=500, calibration="calib.json")
    with tracer:
        for batch in loader:
            ...; engine.backward(loss); engine.step()
            tracer.step()
            replacer.on_step_end()        # every `every` steps: decide, maybe permute_experts

At each check (step boundary, after the optimizer step and `tracer.step()`), rank 0 of `group`
takes the latest plan ([L][E] expert->rank maps) and the global counts of the last `window` steps
the tracer flushed (it waits up to `wait_s` for the writer thread to hand over the blocks already
flushed), and for each layer whose map would change predicts the MoE step time under the current
and the planned map (`moeload.advise`: `Setting.times`, the mean counts of the window standing for
the next `horizon` steps) and the stall of moving the experts (`advise.cost.migration_time`). A
layer is re-placed where `horizon x (before - after) > migration`. Rank 0 broadcasts the decision,
so every rank applies the same one: the backend's `permute_experts` (`act.deepspeed` for DeepSpeed MoE
layers, `act.megatron` for megatron-core MoELayers with SequentialMLP experts) on each chosen layer, then
`tracer.record_rank_map` (the manifest's `rank_map_changes`; counts stay per logical expert). Each
check is one line on the `moeload.act` logger and one entry of `history`.

Replica layers (`act.replicas.ReplicaGate`, `act.megatron_replicas.ReplicaRouter`: E experts in S slots) take
slot plans: a placement with S slots per layer (EPLB-style, hot experts copied), [S] slot maps, or [E] maps (one
copy each). What each rank should hold becomes a target slot map and a sequence of `remove_replica` /
`add_replica` calls (`act.slot_plan`); primaries move too, as a copy on the new rank and the old slot removed.
The cost of the change is the stall of its adds (each copies one expert's parameters and optimizer state), the
times are the advisor's with each copy taking an even share of its expert's routes. The trace gets each
expert's primary rank in `rank_map_changes` (what fits there: one rank per expert) and the slot map in the
manifest's `extra.replica_slot_changes` (`slot_plan.replica_gpu_loads` splits the routes by it). Summing the
copies' gradients stays the training loop's job: `sync_replica_grads(model)` every step, before the optimizer. A fault in rank 0's
decision (a bad plan) is broadcast too: every rank warns once, skips that check, training goes on.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from moeload.act import _backends as bk
from moeload.act import slot_plan as sp
from moeload.act._slots import SlotMap
from moeload.act.permute import check_expert_to_rank, phy2log
from moeload.advise.cost import Calibration, ExpertShape, default_calibration
from moeload.advise.strategies import Setting
from moeload.errors import InputError

if TYPE_CHECKING:
    from moeload.tracing.block import FlushedBlock
    from moeload.tracing.tracer import LoadTracer

log = logging.getLogger("moeload.act")


def plan_maps(plan: Any, num_experts: list[int], ep_size: int) -> list[list[int]]:
    """A plan -> [L][E] expert->rank maps. plan: [L][E] ranks; a `placement.Placement` without
    replicas (slot s on GPU s // (E / num_gpus)); or an `OnlinePlanner` (its `current` plan).
    InputError where it does not fit the layers (L, E, ep_size) or holds replicas."""
    if hasattr(plan, "current") and hasattr(plan, "feed"):  # OnlinePlanner
        plan = plan.current
        if plan is None:
            raise InputError("plan: the OnlinePlanner has no plan yet")
    if hasattr(plan, "phy2log") and hasattr(plan, "num_gpus"):  # Placement
        p2l, G = np.asarray(plan.phy2log, dtype=np.int64), int(plan.num_gpus)
        if G != ep_size or p2l.shape[-1] != max(num_experts):
            raise InputError(
                f"plan: a placement of {p2l.shape[-1]} slots on {G} GPUs; the layers need "
                f"{max(num_experts)} slots on {ep_size} ranks (re-placement moves experts, no replicas)"
            )
        maps = np.zeros_like(p2l)
        np.put_along_axis(maps, p2l, np.arange(p2l.shape[-1])[None, :] // (p2l.shape[-1] // G), axis=-1)
        if any(sorted(row) != list(range(p2l.shape[-1])) for row in p2l.tolist()):
            raise InputError("plan: the placement holds replicas (an expert in several slots); only permutations apply")
        plan = maps.tolist()
    if isinstance(plan, (str, bytes)) or not hasattr(plan, "__len__") or len(plan) != len(num_experts):
        raise InputError(
            f"plan: expected {len(num_experts)} expert->rank maps (one per traced layer), got {plan!r:.80}"
        )
    return [
        check_expert_to_rank(m, e, ep_size, f"plan[{i}]").tolist() for i, (m, e) in enumerate(zip(plan, num_experts))
    ]


def expert_shape(layer: Any, optimizer: Any = None) -> ExpertShape:
    """The `ExpertShape` of one MoE layer, measured from it: hidden from its gate / router; ffn_hidden
    from one expert's parameter count (DeepSpeed: two matrices with biases) or from the config
    (megatron-core: `moe_ffn_hidden_size`, `gated_linear_unit`); bytes per parameter that migrate from
    the parameters and their optimizer state as they are now (Adam after its first step: 3 x 4 fp32)."""
    found = [(b, m) for _, b, m in bk.moe_layers(layer) if m is layer]
    if not found:
        raise InputError(
            f"expert_shape: expected a DeepSpeed MoE or megatron-core MoELayer layer, got {type(layer).__name__}"
        )
    backend = found[0][0]
    if backend == "deepspeed":
        moe: Any = layer.deepspeed_moe
        hidden, gated = int(moe.gate.wg.in_features), False
        params = list(moe.experts.deepspeed_experts[0].parameters())
        ffn = max(1, round((sum(p.numel() for p in params) - hidden) / (2 * hidden + 1)))
    else:
        from moeload.act.megatron import _local_experts

        if isinstance(layer.router, SlotMap):
            from moeload.act.megatron_replicas import _experts as _local_experts
        cfg = layer.config
        hidden, gated = int(layer.router.weight.shape[1]), bool(getattr(cfg, "gated_linear_unit", False))
        params = list(_local_experts(layer)[0].parameters())
        ffn = int(getattr(cfg, "moe_ffn_hidden_size", None) or cfg.ffn_hidden_size)
    state_params = params  # whose optimizer state sets the bytes per parameter
    if (
        backend != "deepspeed"
        and getattr(layer.experts, "local_experts", None) is None
        and not isinstance(layer.router, SlotMap)
    ):
        state_params = list(layer.experts.parameters())  # GroupedMLP: the optimizer knows the whole tensors
    n = sum(p.numel() for p in state_params)
    opt = getattr(optimizer, "optimizer", optimizer)
    state = getattr(opt, "state", {})
    nbytes = sum(
        p.numel() * p.element_size()
        + sum(t.numel() * t.element_size() for t in state.get(p, {}).values() if isinstance(t, torch.Tensor))
        for p in state_params
    )
    return ExpertShape(
        hidden,
        ffn,
        gated=gated,
        act_bytes=params[0].element_size(),
        state_bytes_per_param=max(1, math.ceil(nbytes / n)),
        source="measured from the layer",
    )


class Replacer:
    """Applies re-placement plans at step boundaries when the predicted gain beats the migration cost.

    tracer: a started-or-not `LoadTracer` over a model of DeepSpeed MoE layers or megatron-core
    MoELayers with SequentialMLP experts (every traced gate must be one's gate / router, all with the
    same ep_size >= 2); plan: see `plan_maps` (or None; `set_plan` gives one later);
    optimizer: the torch optimizer (or DeepSpeed engine) whose state moves with the experts; every:
    steps between checks (at `tracer.step_count % every == 0`); horizon: steps the gain is counted
    over (default `every`); window: recent steps whose mean counts predict them; shape: an
    `ExpertShape` (default: read from each layer, `expert_shape`); calibration: a `Calibration` or
    the path of one (default: `default_calibration`, H200 roofline, said in each log line);
    num_nodes, micro_batches: of the cost model; group: the process group every rank of which calls
    `on_step_end` (default: the tracer's); wait_s: how long rank 0 waits for flushed blocks.

    Replica layers (a `ReplicaGate` / `ReplicaRouter`; the module docstring) take slot plans; their
    copies' gradients need `sync_replica_grads(model)` every step, before the optimizer (the caller's).

    `history`: one dict per check (step, applied layers, per layer before_s / after_s / gain_s /
    cost_s / experts_moved / bytes_total / seconds, replica layers also ops: the add / remove calls,
    or the error).
    """

    def __init__(
        self,
        tracer: LoadTracer,
        plan: Any = None,
        *,
        optimizer: Any = None,
        every: int = 100,
        horizon: int | None = None,
        window: int = 100,
        shape: ExpertShape | None = None,
        calibration: Calibration | str | Path | None = None,
        num_nodes: int = 1,
        micro_batches: int = 1,
        group: Any = None,
        wait_s: float = 30.0,
    ) -> None:
        for name, v in (("every", every), ("window", window), ("horizon", every if horizon is None else horizon)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"Replacer: {name}={v!r}: expected a positive integer")
        self.tracer, self.plan, self.optimizer = tracer, plan, optimizer
        self.every, self.horizon, self.window = every, every if horizon is None else horizon, window
        self.shape, self.num_nodes, self.micro_batches = shape, num_nodes, micro_batches
        self.calibration = Calibration.load(calibration) if isinstance(calibration, (str, Path)) else calibration
        self.group = tracer.group if group is None else group
        self.wait_s = float(wait_s)
        if not tracer.rank_layout.uniform:  # its layer indices are the trace's; pipeline stages would need a map
            raise InputError(
                "Replacer: every rank must hold every traced layer (no pipeline stages or tp_group "
                "replicas yet); re-placement under pipeline parallelism is not supported"
            )
        owners = {id(bk.gate(b, m)): (b, m) for _, b, m in bk.moe_layers(tracer.model)}
        missing = [n for n, s in zip(tracer.local_layers, tracer.specs) if id(s.module) not in owners]
        if missing:
            raise InputError(
                f"Replacer: traced layer(s) {missing[:3]} are not gates of deepspeed.moe.layer.MoE or "
                "megatron-core MoELayer layers"
            )
        self.backends: list[str] = [owners[id(s.module)][0] for s in tracer.specs]
        self.layers: list[Any] = [owners[id(s.module)][1] for s in tracer.specs]
        sizes = sorted({bk.ep_size(b, m) for b, m in zip(self.backends, self.layers)})
        if len(sizes) > 1 or sizes[0] < 2:
            raise InputError(f"Replacer: every MoE layer needs the same ep_size >= 2, got {sizes}")
        self.ep_size = sizes[0]
        self.num_experts = [int(s.num_experts) for s in tracer.specs]
        gates = [bk.gate(b, m) for b, m in zip(self.backends, self.layers)]
        self.num_slots: list[int | None] = [int(g.num_slots) if isinstance(g, SlotMap) else None for g in gates]
        self.history: list[dict[str, Any]] = []
        self._recent: deque[np.ndarray] = deque(maxlen=window)  # [L, E] global counts of recent steps
        self._blocks = 0
        self._lock = threading.Lock()
        self._flushes_at_attach = tracer.flushes - tracer.dropped_blocks  # blocks the sink will not see
        self._warned = False
        tracer.add_sink(self._sink)

    def set_plan(self, plan: Any) -> None:
        """The plan the next checks consider (see `plan_maps`)."""
        self.plan = plan

    def _sink(self, block: FlushedBlock) -> None:
        """Tracer sink (writer thread): keep the global counts of the last `window` train steps."""
        if block.split == "train":
            with self._lock:
                self._recent.extend(block.routed.sum(axis=1))
                self._blocks += 1

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        """After `optimizer.step()` and `tracer.step()`: check every `every` steps (collective)."""
        step = self.tracer.step_count
        if step > 0 and step % self.every == 0:
            self.check()

    def check(self) -> dict[str, Any]:
        """Decide on rank 0, share the decision, apply it on every rank; -> the `history` entry."""
        step = self.tracer.step_count
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        decision: dict[str, Any] = {}
        if rank == 0:
            try:
                decision = self.decide(self._counts(), step)
            except Exception as e:
                decision = {"step": step, "apply": {}, "layers": {}, "error": f"{type(e).__name__}: {e}"}
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            box = [decision]
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast_object_list(box, src=src, group=self.group)
            decision = box[0]
        if decision.get("error"):
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"moeload: re-placement check at step {step} failed on rank 0 ({decision['error']}); "
                    "training continues without it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.history.append(decision)
            return decision
        for li, m in sorted(decision["apply"].items()):
            info = decision["layers"][li]
            if self.num_slots[li] is None:
                stats = bk.backend(self.backends[li]).permute_experts(self.layers[li], m, self.optimizer)
                self.tracer.record_rank_map(step, li, m, phy2log=phy2log(np.asarray(m)).tolist())
            else:
                stats = self._apply_slots(li, m, info["ops"])
                sp.record_slots(self.tracer, step, li, m, self.num_experts[li], self.ep_size)
            info.update(
                experts_moved=stats["experts_moved"], bytes_total=stats["bytes_total"], seconds=stats["seconds"]
            )
            log.info(
                "moeload: step %d: re-placed layer %r (%d experts, %d bytes, %.4f s; predicted gain %.3g s over "
                "%d steps > migration %.3g s, %s calibration)",
                step,
                self.tracer.layers[li],
                stats["experts_moved"],
                stats["bytes_total"],
                stats["seconds"],
                info["gain_s"],
                self.horizon,
                info["cost_s"],
                decision["calibration"],
            )
        if not decision["apply"]:
            log.info(
                "moeload: step %d: no re-placement (%s)", step, decision.get("why", "no layer gains more than it costs")
            )
        self.history.append(decision)
        return decision

    def _apply_slots(self, li: int, target: list[int], ops: list[list]) -> dict[str, Any]:
        """Replica layer `li`: the decided add / remove calls (collective, every rank the same) -> stats."""
        t0, mod = (
            time.perf_counter(),
            importlib.import_module(
                "moeload.act.replicas" if self.backends[li] == "deepspeed" else "moeload.act.megatron_replicas"
            ),
        )
        nbytes, adds = 0, 0
        for op in ops:
            if op[0] == "remove":
                mod.remove_replica(self.layers[li], int(op[1]))
            else:
                nbytes += int(mod.add_replica(self.layers[li], int(op[1]), int(op[2]), self.optimizer)["bytes"])
                adds += 1
        got = list(bk.gate(self.backends[li], self.layers[li]).slot_expert)
        if got != list(target):  # the ops were computed from the map in force, so this is a bug, not user input
            raise RuntimeError(f"moeload: layer {li}: slot map {got} after the calls, planned {list(target)}")
        return {"experts_moved": adds, "bytes_total": nbytes, "seconds": time.perf_counter() - t0}

    def _plans(self) -> list[list[int]]:
        """The plan -> per layer: [E] expert->rank map (permutation layers) or [S] target slot map (replica
        layers, from what each rank should hold and the slot map in force)."""
        if all(n is None for n in self.num_slots):
            return plan_maps(self.plan, self.num_experts, self.ep_size)
        plan = self.plan
        if hasattr(plan, "current") and hasattr(plan, "feed"):  # OnlinePlanner
            plan = plan.current
            if plan is None:
                raise InputError("plan: the OnlinePlanner has no plan yet")
        if hasattr(plan, "phy2log") and hasattr(plan, "num_gpus"):  # Placement
            p2l = np.asarray(plan.phy2log, dtype=np.int64)
            if int(plan.num_gpus) != self.ep_size:
                raise InputError(
                    f"plan: a placement on {int(plan.num_gpus)} GPUs; the layers have ep_size {self.ep_size}"
                )
            replicas = any(sorted(r) != list(range(p2l.shape[-1])) for r in p2l.tolist())
            plan = p2l.tolist() if replicas else plan_maps(plan, self.num_experts, self.ep_size)
        if isinstance(plan, (str, bytes)) or not hasattr(plan, "__len__") or len(plan) != len(self.layers):
            raise InputError(f"plan: expected {len(self.layers)} maps (one per traced layer), got {plan!r:.80}")
        out = []
        for li, (row, E, S) in enumerate(zip(plan, self.num_experts, self.num_slots)):
            if S is None:
                out.append(check_expert_to_rank(row, E, self.ep_size, f"plan[{li}]").tolist())
            else:
                cur = list(bk.gate(self.backends[li], self.layers[li]).slot_expert)
                out.append(sp.slot_target(sp.per_rank(row, E, S, self.ep_size, f"plan[{li}]"), cur))
        return out

    def _counts(self) -> np.ndarray | None:
        """Rank 0: [W, L, E] global counts of the last steps flushed, after waiting for the writer thread
        to hand over the blocks flushed so far (at most wait_s); None if none."""
        tr, deadline = self.tracer, time.monotonic() + self.wait_s
        while (
            self._blocks < tr.flushes - tr.dropped_blocks - self._flushes_at_attach
            and tr.tracing_stopped is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.002)
        if time.monotonic() >= deadline:  # a block lost on the way (disk fault): do not wait for it again
            self._flushes_at_attach = tr.flushes - tr.dropped_blocks - self._blocks
        with self._lock:
            rows = list(self._recent)
        return np.stack(rows) if rows else None

    def decide(self, counts: np.ndarray | None, step: int) -> dict[str, Any]:
        """counts: [W, L, E] recent global counts -> {"step", "apply": {layer: map}, "layers": {layer: {before_s,
        after_s, gain_s, cost_s, moved}}, "calibration", "why"} (the same on any rank given the same input)."""
        out: dict[str, Any] = {"step": step, "apply": {}, "layers": {}, "calibration": "none"}
        if self.plan is None or counts is None or len(counts) == 0:
            out["why"] = "no plan yet" if self.plan is None else "no counts flushed yet"
            return out
        new = self._plans()
        mean = counts.astype(np.float64).mean(axis=0)  # [L, E] routes per step
        for li, layer in enumerate(self.layers):
            if self.num_slots[li] is not None:
                self._decide_slots(out, li, new[li], mean)
                continue
            cur, E = bk.backend(self.backends[li]).expert_to_rank(layer), self.num_experts[li]
            if new[li] == cur:
                continue
            shape = self.shape or expert_shape(layer, self.optimizer)
            cal = self.calibration or default_calibration(shape, E // self.ep_size)
            out["calibration"] = cal.kind
            s = Setting(
                num_gpus=self.ep_size,
                num_experts=E,
                num_layers=1,
                shape=shape,
                cal=cal,
                num_nodes=self.num_nodes,
                micro_batches=self.micro_batches,
            )
            c, share = mean[None, li : li + 1, :E], np.ones((1, E))
            before = float(s.times(c, phy2log(np.asarray(cur))[None], share)[0])
            after = float(s.times(c, phy2log(np.asarray(new[li]))[None], share)[0])
            moved = int((np.asarray(cur) != np.asarray(new[li])).sum())
            gain, cost = self.horizon * (before - after), s.migration(moved)
            out["layers"][li] = {"before_s": before, "after_s": after, "gain_s": gain, "cost_s": cost, "moved": moved}
            if gain > cost:
                out["apply"][li] = new[li]
        if not out["layers"]:
            out["why"] = "the plan is the map in force"
        return out

    def _decide_slots(self, out: dict[str, Any], li: int, target: list[int], mean: np.ndarray) -> None:
        """`decide` for replica layer `li`: target [S] slot map; mean: [L, E] routes per step."""
        layer, E, S = self.layers[li], self.num_experts[li], self.num_slots[li]
        assert S is not None  # a replica layer
        cur = list(bk.gate(self.backends[li], layer).slot_expert)
        if target == cur:
            return
        ops = sp.slot_moves(cur, target)
        shape = self.shape or expert_shape(layer, self.optimizer)
        cal = self.calibration or default_calibration(shape, S // self.ep_size)
        out["calibration"] = cal.kind
        s = Setting(
            num_gpus=self.ep_size,
            num_experts=E,
            num_layers=1,
            shape=shape,
            cal=cal,
            num_nodes=self.num_nodes,
            num_replicas=S,
            micro_batches=self.micro_batches,
        )
        c = mean[None, li : li + 1, :E]
        before, after = (float(s.times(c, *(a[None] for a in sp.cost_arrays(m)))[0]) for m in (cur, target))
        adds = sum(op[0] == "add" for op in ops)
        gain, cost = self.horizon * (before - after), s.migration(adds)
        out["layers"][li] = {
            "before_s": before,
            "after_s": after,
            "gain_s": gain,
            "cost_s": cost,
            "moved": adds,
            "ops": [list(op) for op in ops],
        }
        if gain > cost:
            out["apply"][li] = target

    def state_dict(self) -> dict[str, Any]:
        """The checks so far (the maps in force live on the layers)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
