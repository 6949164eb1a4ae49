"""Online re-placement: at each flushed block, forecast expert loads and suggest a new placement.

::

    tracer = LoadTracer(model, "runs/exp1.moeload", flush_every=100)
    planner = OnlinePlanner(tracer, num_gpus=8, num_replicas=16, out_dir="runs/exp1.plans")
    with tracer:
        ...                                   # plan-000000199.json etc. appear in out_dir

At every block the planner (on the tracer's writer thread, NumPy only) feeds the global counts to a
causal `states.StreamingDetector` and the block's proportions to a predictor, forecasts the next
`horizon` steps, plans a placement for the forecast mean with a `placement.plan` policy, and
compares the predicted imbalance of that plan with the current one (at first: contiguous, expert e
on GPU e // (E / G)) under the forecast. When the gain passes the threshold it writes
`plan-{step:09d}.json` (step: the block's last step; the plan is meant for the steps after it),
logs one line on the `moeload.online` logger, and keeps the new plan as the current one. Nothing
is moved: a framework, or a person, acts on the file (or on `planner.current`).

Thresholds (one of them): `min_gain` (default 0.05): relative drop of the predicted max/mean GPU
load, ``1 - after / before`` with max/mean averaged over the horizon and over layers; or
`min_cv_drop` (Ascend MindSpeed's rule of thumb, 0.08): absolute drop of the predicted coefficient
of variation (std / mean) of the GPU loads, averaged the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from moeload.errors import InputError

if TYPE_CHECKING:
    from moeload.placement import Placement
    from moeload.predictors import Predictor
    from moeload.states import StreamingDetector
    from moeload.tracing.block import FlushedBlock
    from moeload.tracing.tracer import LoadTracer

log = logging.getLogger("moeload.online")


class OnlinePlanner:
    """Turns flushed blocks into re-placement plans; a LoadTracer sink (attached when `tracer` is given).

    tracer: attach to it with `add_sink` (layer names, top-k and rank come from it; only rank 0
    writes files; every rank decides the same); without one, call `feed(steps, counts)` yourself or
    pass the planner as a `sink`. num_gpus: GPUs of one expert-parallel group; num_replicas:
    physical expert slots per layer (default E, no redundant experts); predictor: a spec of
    `predictors.from_spec` (a name, a (name, hyper) pair or an instance; refitted on the first
    block); detector: a
    causal `StreamingDetector` (default: method "window", reference "noise", `window` steps);
    policy / policy_options: of `placement.plan`; horizon: forecast steps; min_gain / min_cv_drop:
    the threshold (see the module docstring); out_dir: where plans are written (None: none
    written, decisions still kept); layers, top_k: without a tracer (default "layer{i}", 1);
    max_history: steps the predictor keeps (older ones are dropped by refitting on the recent ones).

    `history`: one dict per block (step, gain, imbalance / cv before and after, replanned, file).
    `current`: the current `Placement` (None before the first block). `state_dict()` /
    `load_state_dict()` carry the current plan and the history over a restart; the detector and
    the predictor start again from the next block. Errors never reach training: the first one is
    warned about, kept in `error`, and disables the planner.
    """

    def __init__(
        self,
        tracer: LoadTracer | None = None,
        *,
        num_gpus: int,
        num_replicas: int | None = None,
        predictor: str | Predictor = "sw_avg",
        detector: StreamingDetector | None = None,
        policy: str = "eplb",
        policy_options: dict[str, Any] | None = None,
        horizon: int = 100,
        min_gain: float | None = None,
        min_cv_drop: float | None = None,
        out_dir: str | os.PathLike | None = None,
        window: int = 100,
        layers: Sequence[str] | None = None,
        top_k: int | Sequence[int] | None = None,
        max_history: int = 2000,
    ) -> None:
        import moeload.placement as placement
        import moeload.predictors as predictors
        import moeload.states as states

        if min_gain is not None and min_cv_drop is not None:
            raise InputError("OnlinePlanner: give min_gain or min_cv_drop, not both")
        self.criterion = "cv" if min_cv_drop is not None else "gain"
        self.threshold = float(min_cv_drop if min_cv_drop is not None else 0.05 if min_gain is None else min_gain)
        if not np.isfinite(self.threshold) or self.threshold < 0:
            raise InputError(
                f"OnlinePlanner: {'min_cv_drop' if self.criterion == 'cv' else 'min_gain'}={self.threshold}: must be >= 0"
            )
        for name, v in (("num_gpus", num_gpus), ("horizon", horizon), ("window", window), ("max_history", max_history)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"OnlinePlanner: {name}={v!r}: expected a positive integer")
        if policy not in placement.available():
            raise InputError(f"OnlinePlanner: policy={policy!r}: unknown; available: {placement.available()}")
        predictor = predictors.from_spec(predictor, "OnlinePlanner: predictor")
        self.num_gpus, self.num_replicas = int(num_gpus), num_replicas
        self.policy, self.policy_options = policy, dict(policy_options or {})
        self.horizon, self.max_history = int(horizon), int(max_history)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.rank = 0
        self.layers = None if layers is None else [str(x) for x in layers]
        self.top_k = top_k
        self.num_experts: int | None = None
        if tracer is not None:
            E = set(tracer.manifest.experts_per_layer)  # the trace's layers (every pipeline stage's)
            if len(E) > 1:
                raise InputError(
                    f"OnlinePlanner: layers have different expert counts {sorted(E)}; one plan needs one E"
                )
            self.layers, self.num_experts, self.rank = list(tracer.layers), E.pop(), tracer.rank
            self.top_k = (
                list(cast(list[int], tracer.manifest.top_k)) if top_k is None else top_k
            )  # a checked manifest's list
            self._check_sizes(self.num_experts)
        self._predictor_proto = copy.deepcopy(predictor)
        if detector is None:
            detector = states.StreamingDetector("window", top_k=1 if self.top_k is None else self.top_k, window=window)
        elif not isinstance(detector, states.StreamingDetector):
            raise InputError(
                f"OnlinePlanner: detector must be a moeload.states.StreamingDetector, got {type(detector).__name__}"
            )
        self._detector_proto = copy.deepcopy(detector)
        self.history: list[dict[str, Any]] = []
        self.current: Placement | None = None
        self.current_file: str | None = None
        self.error: str | None = None
        self.plans_written = 0
        self._reset_models()
        if tracer is not None:
            tracer.add_sink(self)

    # ---- setup ------------------------------------------------------------------------------------
    def _reset_models(self) -> None:
        self.predictor = copy.deepcopy(self._predictor_proto)
        self.detector = copy.deepcopy(self._detector_proto)
        self._fitted = False
        self._last_valid: np.ndarray | None = None  # [L, E] last row with tokens, per layer
        self.last_step: int | None = None

    def _check_sizes(self, E: int) -> None:
        R = E if self.num_replicas is None else self.num_replicas
        if E % self.num_gpus or R % self.num_gpus or R < E:
            raise InputError(
                f"OnlinePlanner: num_gpus={self.num_gpus}, num_replicas={R} for {E} experts: num_gpus must divide "
                "both (the starting contiguous plan puts E / num_gpus experts on each GPU) and num_replicas >= E"
            )

    # ---- input ------------------------------------------------------------------------------------
    def __call__(self, block: FlushedBlock) -> None:
        """Sink for LoadTracer: plan on each "train" block; never raises (first error -> warning, disabled)."""
        if self.error is not None or block.split != "train":
            return
        try:
            self.feed(block.steps, np.asarray(block.routed).sum(axis=1))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"moeload: online planner disabled after an error at steps {block.steps[0]}..{block.steps[-1]} "
                f"({self.error}); training continues",
                RuntimeWarning,
                stacklevel=2,
            )

    def feed(self, steps: Any, counts: Any) -> dict[str, Any]:
        """One block: steps [S] increasing step numbers, counts [S, L, E] global (token, expert) counts
        (a zero row = a layer without tokens that step). Returns the decision (also in `history`).
        Steps at or before the last one fed (a resumed run replaying steps) restart the detector
        and the predictor. Bad input raises InputError."""
        c = np.asarray(counts)
        st = np.asarray(steps, dtype=np.int64).reshape(-1)
        if c.ndim != 3 or c.dtype.kind not in "iu" or len(st) != c.shape[0] or c.shape[0] == 0:
            raise InputError(
                f"feed: counts must be integer [S, L, E] with S = len(steps) = {len(st)}, got {c.dtype} {c.shape}"
            )
        if (c < 0).any() or (np.diff(st) <= 0).any():
            raise InputError("feed: counts must be >= 0 and steps strictly increasing")
        S, L, E = c.shape
        if self.layers is None:
            self.layers = [f"layer{i}" for i in range(L)]
        if len(self.layers) != L or (self.num_experts is not None and E < self.num_experts):
            raise InputError(
                f"feed: counts have {L} layers x {E} experts, the planner expects {len(self.layers)} x {self.num_experts}"
            )
        if self.num_experts is None:
            self._check_sizes(E)
            self.num_experts = E
        c = c[..., : self.num_experts]
        if self.last_step is not None and st[0] <= self.last_step:
            log.info(
                "moeload: steps restart at %d (last seen %d): detector and predictor start again", st[0], self.last_step
            )
            self._reset_models()
        self.detector.update(c, steps=st)
        p = self._proportions(c)
        self._fit(p)
        self.last_step = int(st[-1])
        return self._decide(st, c)

    def _proportions(self, c: np.ndarray) -> np.ndarray:
        """[S, L, E] counts -> proportions; rows without tokens take the last row with tokens of
        that layer (NaN until a layer has had one)."""
        tot = c.sum(-1, keepdims=True)
        p = np.where(tot > 0, c / np.maximum(tot, 1), np.nan)
        for t in range(len(p)):
            if self._last_valid is not None:
                p[t] = np.where(np.isnan(p[t]), self._last_valid, p[t])
            ok = ~np.isnan(p[t]).any(-1)
            self._last_valid = (
                p[t].copy() if self._last_valid is None else np.where(ok[:, None], p[t], self._last_valid)
            )
        return p

    def _fit(self, p: np.ndarray) -> None:
        if not self._fitted:
            self.predictor.fit(p)
            self._fitted = True
            return
        self.predictor.update(p)
        if self.predictor.history_.shape[0] > 2 * self.max_history:
            self.predictor.fit(self.predictor.history_[-self.max_history :])

    # ---- decision ---------------------------------------------------------------------------------
    def _decide(self, st: np.ndarray, c: np.ndarray) -> dict[str, Any]:
        import moeload.placement as placement

        forecast = self.predictor.predict(self.horizon)  # [H, L, E]
        weight = forecast.mean(axis=0)  # [L, E]
        E = self.num_experts
        if self.current is None:
            self.current = placement.plan(weight, self.num_gpus, E, policy="contiguous")
            self.current_file = "contiguous"
        R = E if self.num_replicas is None else self.num_replicas
        new = placement.plan(weight, self.num_gpus, R, policy=self.policy, **self.policy_options)
        before, after = self.current.evaluate(forecast), new.evaluate(forecast)  # gpu_load [H, L, G]
        imb_b, imb_a = before.imbalance.mean(0), after.imbalance.mean(0)  # [L]
        cv_b, cv_a = _cv(before.gpu_load).mean(0), _cv(after.gpu_load).mean(0)  # [L]
        gain = float(1.0 - imb_a.mean() / imb_b.mean())
        score = gain if self.criterion == "gain" else float(cv_b.mean() - cv_a.mean())
        step = int(st[-1])
        decision: dict[str, Any] = {
            "step": step,
            "first_step": int(st[0]),
            "gain": gain,
            "cv_drop": float(cv_b.mean() - cv_a.mean()),
            "imbalance_before": float(imb_b.mean()),
            "imbalance_after": float(imb_a.mean()),
            "cv_before": float(cv_b.mean()),
            "cv_after": float(cv_a.mean()),
            "stable_layers": int(self.detector.is_stable.sum()),
            "replanned": score >= self.threshold and score > 0,
            "file": None,
        }
        if decision["replanned"]:
            scale = c.sum(-1).mean(0)  # [L] (token, expert) assignments per step in this block
            doc = self._document(
                step,
                new,
                before.gpu_load.mean(0) * scale[:, None],
                after.gpu_load.mean(0) * scale[:, None],
                imb_b,
                imb_a,
                cv_b,
                cv_a,
                decision,
            )
            if self.out_dir is not None and self.rank == 0:
                decision["file"] = self._write(step, doc)
            self.current, self.current_file = new, decision["file"] or f"plan at step {step}"
            self.plans_written += 1
            states_ = self.detector.is_stable
            log.info(
                "moeload: step %d: re-placement %s (%s), predicted max/mean GPU load %.3f -> %.3f (gain %.1f%%), "
                "cv %.3f -> %.3f, %d/%d layers stable",
                step,
                decision["file"] or "(not written)",
                self.policy,
                decision["imbalance_before"],
                decision["imbalance_after"],
                100 * gain,
                decision["cv_before"],
                decision["cv_after"],
                int(states_.sum()),
                len(states_),
            )
        self.history.append(decision)
        return decision

    def _document(
        self,
        step: int,
        new: Placement,
        load_b: np.ndarray,
        load_a: np.ndarray,
        imb_b: np.ndarray,
        imb_a: np.ndarray,
        cv_b: np.ndarray,
        cv_a: np.ndarray,
        decision: dict[str, Any],
    ) -> dict[str, Any]:
        since = self.detector.stable_since
        stable = self.detector.is_stable
        assert self.layers is not None and since is not None  # set by feed() and the detector's update
        return {
            "step": step,
            "layers": list(self.layers),
            "num_gpus": self.num_gpus,
            "num_replicas": new.num_replicas,
            "policy": self.policy,
            "policy_options": _jsonable(self.policy_options),
            "predictor": {
                "name": self.predictor.name or type(self.predictor).__name__,
                "params": _jsonable(self.predictor.get_params()),
            },
            "horizon": self.horizon,
            "criterion": {
                "name": "min_gain" if self.criterion == "gain" else "min_cv_drop",
                "threshold": self.threshold,
            },
            "previous_plan": self.current_file,
            "phy2log": new.phy2log.tolist(),
            "log2phy": new.log2phy.tolist(),
            "replica_counts": new.replica_counts.tolist(),
            "predicted": {
                "gpu_load_before": load_b.tolist(),
                "gpu_load_after": load_a.tolist(),
                "imbalance_before": imb_b.tolist(),
                "imbalance_after": imb_a.tolist(),
                "cv_before": cv_b.tolist(),
                "cv_after": cv_a.tolist(),
                "mean_imbalance_before": decision["imbalance_before"],
                "mean_imbalance_after": decision["imbalance_after"],
                "gain": decision["gain"],
                "cv_drop": decision["cv_drop"],
            },
            "states": [
                {"layer": name, "state": "stable" if s else "transient", "stable_since": int(n) if s else None}
                for name, s, n in zip(self.layers, stable, since)
            ],
        }

    def _write(self, step: int, doc: dict[str, Any]) -> str:
        from moeload.trace.manifest import write_json_atomic

        assert self.out_dir is not None  # the caller checks it
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"plan-{step:09d}.json"
        write_json_atomic(self.out_dir / name, doc)
        return name

    # ---- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The current plan, the decisions so far and the last step seen (JSON-friendly)."""
        cur = None
        if self.current is not None:
            cur = {
                "phy2log": self.current.phy2log.tolist(),
                "share": self.current.share.tolist(),
                "num_gpus": self.current.num_gpus,
                "num_experts": self.current.num_experts,
                "policy": self.current.policy,
                "file": self.current_file,
            }
        return {
            "current": cur,
            "history": copy.deepcopy(self.history),
            "plans_written": self.plans_written,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`: the current plan and history; the detector and predictor start again."""
        from moeload.placement import Placement

        if not isinstance(state, dict) or "history" not in state:
            raise InputError(
                f"OnlinePlanner.load_state_dict: expected a dict from state_dict(), got {type(state).__name__}"
            )
        cur = state.get("current")
        self.current, self.current_file = None, None
        if cur is not None:
            phy2log = np.asarray(cur["phy2log"], dtype=np.int64)
            if cur["num_gpus"] != self.num_gpus or (
                self.num_experts is not None and cur["num_experts"] != self.num_experts
            ):
                raise InputError(
                    f"OnlinePlanner.load_state_dict: saved plan is for {cur['num_gpus']} GPUs x "
                    f"{cur['num_experts']} experts, this planner has {self.num_gpus} x {self.num_experts}"
                )
            self.current = Placement(
                phy2log,
                np.asarray(cur["share"], dtype=np.float64),
                int(cur["num_gpus"]),
                np.zeros((phy2log.shape[0], int(cur["num_experts"]))),
                cur["policy"],
            )
            self.current_file = cur.get("file")
        self.history = copy.deepcopy(list(state["history"]))
        self.plans_written = int(state.get("plans_written", 0))
        self._reset_models()


def _cv(gpu_load: np.ndarray) -> np.ndarray:
    """Coefficient of variation over the last axis of `gpu_load: [..., G]` -> [...] (0 where all idle)."""
    mean = gpu_load.mean(-1)
    return np.where(mean > 0, gpu_load.std(-1) / np.where(mean > 0, mean, 1.0), 0.0)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, (bool, int, float, str, type(None), list, dict)) else repr(v) for k, v in params.items()
    }


__all__ = ["OnlinePlanner"]
