"""Balancing strategies replayed over a trace's counts, each step timed by the cost model.

Every strategy sees the steps in order and may only use counts of steps before the one it
places (except `reactive`, which acts after the gate of the current micro-batch has routed, as
LLEP / UltraEP-style systems do, and `oracle`, the floor). Counts stream in chunks, so a trace
far larger than memory replays in bounded memory: at most `history + chunk` steps are held.

Strategies (exact names of `moeload advise`):

- `none`: contiguous experts, never changed (what DeepSpeed, Megatron-core and torchtitan do).
- `eplb_static`: one EPLB plan from the first `window` steps, applied from then on.
- `eplb_periodic`: EPLB re-planned every `interval` steps from the last `window` steps
  (vLLM's defaults 1000 / 3000; SGLang re-plans every 1000).
- `ema_migration`: MindSpeed's rule: an EMA of the loads (theta 0.9); every 50 steps a candidate
  plan per layer, adopted where it lowers the coefficient of variation of GPU load by >= 0.08.
- `reactive`: per micro-batch, copies of the hottest experts on the least-loaded GPUs (at most
  `copies_per_gpu` per GPU and layer), their tokens split to even out the two GPUs; each copy
  pays its weights in and its gradients out.
- `forecast`: moeload: a predictor's forecast of the next interval, an EPLB plan, adopted only
  when the predicted gain over the interval beats the migration stall; the interval is chosen
  on the first half of the trace from a fixed grid.
- `oracle`: every GPU holding exactly 1/G of each step's routes: no strategy can do better.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from moeload.advise.cost import (
    Calibration,
    ExpertShape,
    copy_time,
    floor_time,
    layer_time,
    migration_time,
    padded_routes,
)
from moeload.errors import InputError
from moeload.placement._placement import slot_gpu

STRATEGIES = ("none", "eplb_static", "eplb_periodic", "ema_migration", "reactive", "forecast", "oracle")


@dataclass
class Setting:
    """What every strategy shares: cluster, shape, calibration, replica slots."""

    num_gpus: int
    num_experts: int
    num_layers: int
    shape: ExpertShape
    cal: Calibration
    num_nodes: int = 1
    num_replicas: int | None = None
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.num_replicas is None:
            self.num_replicas = self.num_experts
        G, E, R = self.num_gpus, self.num_experts, self.num_replicas
        if G < 1 or E % G:
            raise InputError(f"--gpus {G}: the {E} experts of a layer must split evenly over the GPUs")
        if R < E or R % G:
            raise InputError(f"--replicas {R}: must be >= {E} experts and a multiple of --gpus {G}")
        if self.num_nodes < 1 or G % self.num_nodes:
            raise InputError(f"--nodes {self.num_nodes}: must divide --gpus {G}")
        if self.micro_batches < 1:
            raise InputError(f"--micro-batches {self.micro_batches}: must be >= 1")

    def times(self, counts: np.ndarray, phy2log: np.ndarray, share: np.ndarray) -> np.ndarray:
        """`counts: [C, L, E]` under a placement (`phy2log, share: [L, R]`) -> `[C]` seconds of all MoE layers."""
        C, L, _ = counts.shape
        if self.cal.tile:
            per_slot = counts[:, np.arange(L)[:, None], phy2log] * share
            routes = per_slot.reshape(C, L, self.num_gpus, -1).sum(axis=-1)
            gemm = padded_routes(per_slot, self.num_gpus, self.cal.tile, self.micro_batches)
        else:  # no padding: routes per GPU are one batched matmul with the [L, E, G] share matrix
            routes, gemm = (
                np.einsum(
                    "cle,leg->clg", counts, assignment(phy2log, share, self.num_experts, self.num_gpus), optimize=True
                ),
                None,
            )
        return layer_time(routes, self.shape, self.cal, self.num_nodes, self.micro_batches, gemm).sum(axis=-1)

    def migration(self, moved: int) -> float:
        return float(migration_time(np.asarray(moved), self.shape, self.cal, self.num_gpus, self.num_nodes))


@dataclass
class Outcome:
    """One strategy's replay. step_s: [S] seconds of the MoE layers per step (migration included)."""

    name: str
    step_s: np.ndarray
    replans: int = 0
    moved_experts: int = 0
    moved_bytes: int = 0
    extra_memory_bytes: int = 0
    migration_s: float = 0.0
    notes: dict = field(default_factory=dict)


def assignment(phy2log: np.ndarray, share: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """`phy2log, share: [L, R]` -> `[L, E, G]` fraction of expert e's routes that GPU g serves."""
    L, R = phy2log.shape
    out = np.zeros((L, num_experts, num_gpus))
    gpu = np.broadcast_to(slot_gpu(R, num_gpus), (L, R))
    np.add.at(out, (np.broadcast_to(np.arange(L)[:, None], (L, R)), phy2log, gpu), share)
    return out


def gpu_routes(counts: np.ndarray, phy2log: np.ndarray, share: np.ndarray, num_gpus: int) -> np.ndarray:
    """`counts: [C, L, E]`, `phy2log, share: [L, R]` -> `[C, L, G]` routes each GPU serves."""
    C, L, _ = counts.shape
    per_slot = counts[:, np.arange(L)[:, None], phy2log] * share
    return per_slot.reshape(C, L, num_gpus, -1).sum(axis=-1)


def _contiguous(s: Setting) -> tuple[np.ndarray, np.ndarray]:
    phy2log = np.tile(np.arange(s.num_experts), (s.num_layers, 1))
    return phy2log, np.ones(phy2log.shape)


def _plan(weight: np.ndarray, s: Setting) -> tuple[np.ndarray, np.ndarray]:
    from moeload.placement import plan

    w = np.maximum(np.asarray(weight, dtype=np.float64), 0.0) + 1e-9  # all-zero layers stay plannable
    p = plan(w, num_gpus=s.num_gpus, num_replicas=s.num_replicas, policy="eplb")
    return p.phy2log, p.share


def _present(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """`phy2log: [L, R]` -> `[L, G, E]` bool: GPU g holds a copy of expert e."""
    L, R = phy2log.shape
    out = np.zeros((L, num_gpus, num_experts), dtype=bool)
    gpu = slot_gpu(R, num_gpus)
    out[np.arange(L)[:, None], gpu[None, :], phy2log] = True
    return out


def _moves(old: np.ndarray, new: np.ndarray, num_gpus: int, num_experts: int) -> int:
    """Expert copies a GPU must receive to go from `old` to `new` (`[L, R]` phy2log each).

    Order within a GPU is free; a copy already on the GPU does not move.
    """
    return int((_present(new, num_gpus, num_experts) & ~_present(old, num_gpus, num_experts)).sum())


class _Buffer:
    """Counts of the current chunk plus up to `history` steps before it, indexed by global step."""

    def __init__(self, history: int) -> None:
        self.history = history
        self.data: np.ndarray | None = None
        self.start = 0  # global index of data[0]

    def push(self, chunk: np.ndarray, t0: int) -> None:
        if self.data is None:
            self.data, self.start = chunk, t0
            return
        keep = self.data[-self.history :] if self.history else self.data[:0]
        self.data = np.concatenate([keep, chunk])
        self.start = t0 - keep.shape[0]

    def window(self, t: int, w: int) -> np.ndarray:
        """Counts of global steps [max(0, t - w), t)."""
        if self.data is None:
            raise InputError("strategy window asked before any counts arrived")
        lo = max(t - w, self.start)
        return self.data[lo - self.start : t - self.start]


class _Strategy:
    name = ""
    history = 0

    def __init__(self, s: Setting) -> None:
        self.s = s
        self.phy2log, self.share = _contiguous(s)
        self.out = Outcome(self.name, np.zeros(0))
        self._times: list[np.ndarray] = []

    def replan_points(self, t0: int, t1: int) -> list[int]:
        return []

    def decide(self, t: int, buf: _Buffer) -> float:
        """Re-plan at global step t (may change self.phy2log / self.share); returns the stall in seconds."""
        return 0.0

    def adopt(self, phy2log: np.ndarray, share: np.ndarray) -> float:
        moved = _moves(self.phy2log, phy2log, self.s.num_gpus, self.s.num_experts)
        self.phy2log, self.share = phy2log, share
        if moved == 0:
            return 0.0
        stall = self.s.migration(moved)
        self.out.replans += 1
        self.out.moved_experts += moved
        self.out.moved_bytes += moved * self.s.shape.state_bytes
        self.out.migration_s += stall
        extra = (int(self.s.num_replicas or self.s.num_experts) - self.s.num_experts) // self.s.num_gpus
        self.out.extra_memory_bytes = extra * self.s.shape.state_bytes
        return stall

    def run(self, chunk: np.ndarray, t0: int, buf: _Buffer) -> None:
        C = chunk.shape[0]
        times = np.empty(C)
        cuts = [t for t in self.replan_points(t0, t0 + C) if t0 <= t < t0 + C]
        edges = [t0, *cuts, t0 + C]
        for a, b in zip(edges[:-1], edges[1:]):
            stall = 0.0
            if a in cuts:
                stall = self.decide(a, buf) or 0.0
            if b > a:
                times[a - t0 : b - t0] = self.s.times(chunk[a - t0 : b - t0], self.phy2log, self.share)
                times[a - t0] += stall
        self._times.append(times)

    def finish(self) -> Outcome:
        self.out.step_s = np.concatenate(self._times) if self._times else np.zeros(0)
        return self.out


class NoneStrategy(_Strategy):
    name = "none"


class EplbStatic(_Strategy):
    name = "eplb_static"

    def __init__(self, s: Setting, window: int = 1000) -> None:
        super().__init__(s)
        self.window = self.history = window

    def replan_points(self, t0: int, t1: int) -> list[int]:
        return [self.window] if t0 <= self.window < t1 else []

    def decide(self, t: int, buf: _Buffer) -> float:
        return self.adopt(*_plan(buf.window(t, self.window).sum(axis=0), self.s))


class EplbPeriodic(_Strategy):
    name = "eplb_periodic"

    def __init__(self, s: Setting, window: int = 1000, interval: int = 3000) -> None:
        super().__init__(s)
        self.window = self.history = window
        self.interval = interval

    def replan_points(self, t0: int, t1: int) -> list[int]:
        first = max(self.interval, -(-t0 // self.interval) * self.interval)
        return list(range(first, t1, self.interval))

    def decide(self, t: int, buf: _Buffer) -> float:
        return self.adopt(*_plan(buf.window(t, self.window).sum(axis=0), self.s))


def _cv(gpu: np.ndarray) -> np.ndarray:
    """`gpu: [..., G]` -> `[...]` coefficient of variation (0 where idle)."""
    mean = gpu.mean(axis=-1)
    return np.where(mean > 0, gpu.std(axis=-1) / np.where(mean > 0, mean, 1.0), 0.0)


class EmaMigration(_Strategy):
    name = "ema_migration"

    def __init__(self, s: Setting, theta: float = 0.9, every: int = 50, min_cv_drop: float = 0.08) -> None:
        super().__init__(s)
        self.theta, self.every, self.min_cv_drop = theta, every, min_cv_drop
        self.ema: np.ndarray | None = None
        self.seen = 0

    def run(self, chunk: np.ndarray, t0: int, buf: _Buffer) -> None:
        # Update the EMA step by step up to each decision point, then time the segment.
        C = chunk.shape[0]
        times = np.empty(C)
        a = 0
        while a < C:
            t = t0 + a
            b = min(C, a + (self.every - t % self.every))
            stall = 0.0
            if t % self.every == 0 and self.ema is not None and t > 0:
                stall = self._decide()
            times[a:b] = self.s.times(chunk[a:b], self.phy2log, self.share)
            times[a] += stall
            for row in chunk[a:b]:
                self.ema = (
                    row.astype(np.float64) if self.ema is None else self.theta * self.ema + (1 - self.theta) * row
                )
            a = b
        self._times.append(times)

    def _decide(self) -> float:
        if self.ema is None:
            return 0.0
        ema = self.ema[None]
        new_p2l, new_share = _plan(self.ema, self.s)
        cv_now = _cv(gpu_routes(ema, self.phy2log, self.share, self.s.num_gpus))[0]
        cv_new = _cv(gpu_routes(ema, new_p2l, new_share, self.s.num_gpus))[0]
        take = (cv_now - cv_new) >= self.min_cv_drop
        if not take.any():
            return 0.0
        if self.phy2log.shape != new_p2l.shape:  # first plan with replicas: every layer changes width
            return self.adopt(new_p2l, new_share)
        p2l, share = self.phy2log.copy(), self.share.copy()
        p2l[take], share[take] = new_p2l[take], new_share[take]
        return self.adopt(p2l, share)


def reactive_routes(counts: np.ndarray, num_gpus: int, copies_per_gpu: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step duplication of hot experts on the contiguous layout.

    counts: [C, L, E] routes of one micro-batch. Greedy, `copies_per_gpu * G` rounds: the most
    loaded GPU's largest remaining local expert gets a copy on the least loaded GPU that still has
    a free copy slot, and moves enough of its routes there to even the two out.
    Returns (gpu_routes [C, L, G], copies received [C, L, G]).
    """
    C, L, E = counts.shape
    G = num_gpus
    local = counts.reshape(C * L, G, E // G).astype(np.float64)
    load = local.sum(axis=-1)
    got = np.zeros((C * L, G))
    rows = np.arange(C * L)
    for _ in range(copies_per_gpu * G):
        h = load.argmax(axis=1)
        pieces = local[rows, h]
        p = pieces.argmax(axis=1)
        piece = pieces[rows, p]
        masked = np.where(got < copies_per_gpu, load, np.inf)
        masked[rows, h] = np.inf
        c = masked.argmin(axis=1)
        ok = np.isfinite(masked[rows, c])
        x = np.where(ok, np.clip(np.minimum(piece, (load[rows, h] - load[rows, c]) / 2), 0, None), 0.0)
        local[rows, h, p] -= x
        load[rows, h] -= x
        load[rows, c] += x
        got[rows, c] += x > 0
    return load.reshape(C, L, G), got.reshape(C, L, G)


class Reactive(_Strategy):
    name = "reactive"

    def __init__(self, s: Setting, copies_per_gpu: int = 1) -> None:
        super().__init__(s)
        self.copies = copies_per_gpu
        self.out.extra_memory_bytes = copies_per_gpu * 2 * s.shape.weight_bytes

    def run(self, chunk: np.ndarray, t0: int, buf: _Buffer) -> None:
        s = self.s
        mb = chunk / s.micro_batches
        load, got = reactive_routes(mb, s.num_gpus, self.copies)
        # Split groups are not tracked per slot: with a tile, each GPU pays half a tile per group.
        groups = s.num_experts // s.num_gpus + got
        gemm = np.where(load > 0, load + groups * s.cal.tile / 2, 0.0) if s.cal.tile else None
        per_mb = layer_time(load, s.shape, s.cal, s.num_nodes, 1, gemm)
        copies = copy_time(got.max(axis=-1), s.shape, s.cal, s.num_nodes)
        self._times.append((s.micro_batches * (per_mb + copies)).sum(axis=-1))
        self.out.moved_experts += int(got.sum()) * s.micro_batches
        self.out.moved_bytes += int(got.sum()) * s.micro_batches * 2 * s.shape.weight_bytes


class Forecast(_Strategy):
    name = "forecast"

    def __init__(
        self,
        s: Setting,
        interval: int = 500,
        window: int = 200,
        predictor: Callable[[np.ndarray, int], np.ndarray] | None = None,
    ) -> None:
        super().__init__(s)
        self.interval, self.window = interval, window
        self.history = window
        self.predict = predictor or _window_mean

    def replan_points(self, t0: int, t1: int) -> list[int]:
        """The first full window, then every multiple of the interval after it."""
        first = -(-max(t0, self.window + 1) // self.interval) * self.interval
        points = set(range(first, t1, self.interval))
        if t0 <= self.window < t1:
            points.add(self.window)
        return sorted(points)

    def decide(self, t: int, buf: _Buffer) -> float:
        hist = buf.window(t, self.window)
        if hist.shape[0] == 0:
            return 0.0
        weight = self.predict(hist, self.interval)  # [L, E] expected routes per step
        new_p2l, new_share = _plan(weight, self.s)
        w = weight[None]
        now = self.s.times(w, self.phy2log, self.share)[0]
        new = self.s.times(w, new_p2l, new_share)[0]
        cost = self.s.migration(_moves(self.phy2log, new_p2l, self.s.num_gpus, self.s.num_experts))
        if (now - new) * self.interval <= cost:
            return 0.0
        return self.adopt(new_p2l, new_share)


def _window_mean(hist: np.ndarray, horizon: int) -> np.ndarray:
    """SW_Avg: the mean routes of the window, as the forecast of every coming step."""
    return hist.mean(axis=0)


class Oracle(_Strategy):
    name = "oracle"

    def run(self, chunk: np.ndarray, t0: int, buf: _Buffer) -> None:
        s = self.s
        self._times.append(
            floor_time(chunk.sum(axis=-1), s.num_gpus, s.shape, s.cal, s.num_nodes, s.micro_batches).sum(axis=-1)
        )


def build(
    name: str,
    setting: Setting,
    *,
    eplb_window: int = 1000,
    eplb_interval: int = 3000,
    forecast_interval: int = 500,
    forecast_window: int = 200,
    copies_per_gpu: int = 1,
) -> _Strategy:
    """One strategy by its name in `STRATEGIES`."""
    makers: dict[str, Callable[[], _Strategy]] = {
        "none": lambda: NoneStrategy(setting),
        "eplb_static": lambda: EplbStatic(setting, eplb_window),
        "eplb_periodic": lambda: EplbPeriodic(setting, eplb_window, eplb_interval),
        "ema_migration": lambda: EmaMigration(setting),
        "reactive": lambda: Reactive(setting, copies_per_gpu),
        "forecast": lambda: Forecast(setting, forecast_interval, forecast_window),
        "oracle": lambda: Oracle(setting),
    }
    if name not in makers:
        raise InputError(f"strategy: unknown {name!r}; available: {', '.join(STRATEGIES)}")
    return makers[name]()


def run_all(
    chunks: Iterable[np.ndarray],
    strategies: list[_Strategy],
    setting: Setting,
    progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Feed `chunks` (`[C, L, E]` counts, in step order) to every strategy; their outcomes, in order."""
    buf = _Buffer(max([st.history for st in strategies] + [0]))
    t0 = 0
    for chunk in chunks:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 3 or chunk.shape[1:] != (setting.num_layers, setting.num_experts):
            raise InputError(
                f"counts: expected [steps, {setting.num_layers}, {setting.num_experts}], got {chunk.shape}"
            )
        buf.push(chunk, t0)
        for st in strategies:
            st.run(chunk, t0, buf)
        t0 += chunk.shape[0]
        if progress is not None:
            progress(t0)
    return [st.finish() for st in strategies]


def replay(
    chunks: Iterable[np.ndarray],
    setting: Setting,
    *,
    names: Iterable[str] = STRATEGIES,
    progress: Callable[[int], None] | None = None,
    **opts,
) -> dict[str, Outcome]:
    """Replay `chunks` through the named strategies (`opts`: those of `build`)."""
    built = [build(n, setting, **opts) for n in names]
    return {o.name: o for o in run_all(chunks, built, setting, progress)}


def rechunk(blocks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup an iterator of `[b, L, E]` blocks into blocks of `size` steps (last one shorter)."""
    pending: list[np.ndarray] = []
    n = 0
    for b in blocks:
        pending.append(b)
        n += b.shape[0]
        while n >= size:
            cat = np.concatenate(pending)
            yield cat[:size]
            rest = cat[size:]
            pending, n = ([rest] if rest.shape[0] else []), rest.shape[0]
    if n:
        yield np.concatenate(pending)
