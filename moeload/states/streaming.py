"""Causal, step-by-step state detection for use during training."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from moeload.errors import InputError
from moeload.states._input import LoadInput, _from_array
from moeload.states.base import confirmed_end, hysteresis, verdict
from moeload.states.drift import DriftTest
from moeload.states.window import WindowRule


class StateEvent(NamedTuple):
    """A layer changed state at `step` (the first step with the new label)."""

    layer: int
    step: int
    stable: bool


class StreamingDetector:
    """Feed proportions (or integer counts) block by block; never looks ahead.

    With the same causal parameters, the labels equal `states.detect(...).labels` on the whole
    run (tested). The window rule's default reference here is "noise" (the offline default
    "late" needs the end of the run); it needs routed assignments: feed integer counts or pass
    tokens= to `update`. top_k: [L] or int, used by the noise reference.
    """

    def __init__(self, method: str = "window", top_k: Any = 1, **params: Any) -> None:
        from moeload.states import get

        if method == "window":
            params.setdefault("reference", "noise")
        rule = get(method, **params).fit()
        if not isinstance(rule, (WindowRule, DriftTest)) or not rule.causal:
            raise InputError(
                f"method={method!r} with {params} looks ahead (reference='late', center=True or pelt); "
                "use method='window' with reference='noise' or a number, or method='test'"
            )
        self.rule: WindowRule | DriftTest = rule
        self.method = method
        self._top_k = top_k
        self._hist = rule.window_ - 1 if isinstance(rule, WindowRule) else 2 * rule.window_ - 1
        self._buf: np.ndarray | None = None
        self._buf_n: np.ndarray | None = None
        self._n_seen = 0
        self._labels: list[np.ndarray] = []
        self._steps: list[np.ndarray] = []
        self._state: np.ndarray | None = None
        self._count: np.ndarray | None = None
        self._ratio: np.ndarray | None = None
        self.stable_since: np.ndarray | None = None
        self.events: list[StateEvent] = []
        self._tail_f: np.ndarray | None = None  # [<= confirm, L] statistic of the last steps (window rule)
        self._tail_t: np.ndarray | None = None  # [<= confirm, L] its entry threshold

    @property
    def labels_so_far(self) -> np.ndarray:
        """[n, L] bool labels of every step fed so far."""
        return np.concatenate(self._labels) if self._labels else np.zeros((0, 0), dtype=bool)

    @property
    def steps_so_far(self) -> np.ndarray:
        """[n] step numbers fed so far."""
        return np.concatenate(self._steps) if self._steps else np.zeros(0, dtype=np.int64)

    def _started(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(state [L] bool, evidence count [L], stable_since [L]), set by the first `update`."""
        if self._state is None or self._count is None or self.stable_since is None:
            raise InputError("StreamingDetector: no data yet; call update() first")
        return self._state, self._count, self.stable_since

    @property
    def is_stable(self) -> np.ndarray:
        """[L] current state per layer."""
        return self._started()[0].copy()

    @property
    def boundaries(self) -> np.ndarray:
        """[L] first step of the confirmed stable phase per layer, -1 = "not stable yet". The window
        rule confirms as `states.detect` does (`base.confirmed_end` over the steps fed so far); other
        methods report `stable_since`."""
        state, _, since = self._started()
        rule = self.rule
        if not isinstance(rule, WindowRule) or rule.confirm_ == 0:
            return since.copy()
        tail_f, tail_t = self._tail_f, self._tail_t
        if tail_f is None or tail_t is None:  # kept by every update of the window rule
            raise InputError("StreamingDetector: no data yet; call update() first")
        n = len(tail_f)
        run = np.zeros(len(state), dtype=np.int64)
        steps = self.steps_so_far
        for li in np.flatnonzero(state):
            run[li] = self._n_seen - int(np.searchsorted(steps, since[li]))
        dec = rule.max_decline_ if rule.stat_ == "range" else 1 - (1 - rule.max_decline_) ** 2
        ok = confirmed_end(run, tail_f, tail_t, rule.confirm_, rule.min_under_, dec) if n else run < 0
        return np.where(ok, since, -1)

    @property
    def verdicts(self) -> list[str]:
        """[L] "stable from step N" or "not stable yet", from `boundaries`."""
        return [verdict(b) for b in self.boundaries]

    @property
    def model_verdict(self) -> str:
        """The whole model: "stable from step N" (the latest layer boundary) or "not stable yet"."""
        b = self.boundaries
        return verdict(int(b.max()) if (b >= 0).all() else -1)

    def update(self, p_block: Any, steps: Any = None, tokens: Any = None) -> list[StateEvent]:
        """p_block: [t, L, E] proportions or integer counts (t may be 1); steps: [t] step numbers
        (default: continue from the last one); tokens: [t] or [t, L] routed assignments.
        Returns the state changes this block caused."""
        blk = np.asarray(p_block)
        if blk.ndim == 2:
            blk = blk[None]
        inp = _from_array(blk, "p_block", None, tokens)
        t, L, E = inp.p.shape
        if (inp.experts < E).any():  # a block cannot tell padding from a column without tokens yet
            raise InputError("p_block: NaN expert columns (padding) are not supported when streaming; pass 0 for them")
        if self._buf is None:
            self._buf = np.zeros((0, L, E))
            self._buf_n = None if inp.assignments is None else np.zeros((0, L))
            self._state = np.zeros(L, dtype=bool)
            self._count = np.zeros(L, dtype=np.int64)
            self._ratio = np.full(L, np.nan)
            self.stable_since = np.full(L, -1, dtype=np.int64)
            self._next_step = 0
        elif self._buf.shape[1:] != (L, E):
            raise InputError(f"p_block: layers/experts {(L, E)} differ from earlier blocks {self._buf.shape[1:]}")
        if steps is None:
            st = np.arange(self._next_step, self._next_step + t, dtype=np.int64)
        else:
            st = np.asarray(steps, dtype=np.int64).reshape(-1)
            if len(st) != t or (np.diff(st) <= 0).any() or (self._n_seen and st[0] < self._next_step):
                raise InputError(f"steps: expected {t} increasing step numbers after {self._next_step - 1}, got {st}")
        self._next_step = int(st[-1]) + 1
        if (self._buf_n is None) != (inp.assignments is None) and self._n_seen:
            raise InputError("p_block: give routed assignments (counts or tokens=) in every block or in none")
        p_all = np.concatenate([self._buf, inp.p])
        n_all = None if inp.assignments is None else np.concatenate([self._buf_n, inp.assignments])
        h = len(self._buf)
        top_k = np.broadcast_to(np.asarray(self._top_k, dtype=np.int64), (L,))
        full = LoadInput(p_all, np.arange(len(p_all)), n_all, top_k, np.full(L, E, np.int64), None, False)
        rule = self.rule
        if isinstance(rule, WindowRule):
            fluct, noise = rule.statistic(p_all, full, n_all)
            thr = rule.threshold(fluct, noise)
            codes = rule.codes(fluct, thr)[h:]
            c = rule.confirm_

            def tail(old: np.ndarray | None, new: np.ndarray) -> np.ndarray:
                """The last `confirm` rows of old + new (none when confirm = 0)."""
                return (new if old is None else np.concatenate([old, new]))[-c:] if c else new[:0]

            self._tail_f, self._tail_t = tail(self._tail_f, fluct[h:]), tail(self._tail_t, thr[h:])
        else:
            codes, ratio = rule.evidence(p_all, full.experts, offset=self._n_seen - h)
            codes = codes[h:]
        state, count, since = self._started()
        labels = np.empty((t, L), dtype=bool)
        new_events = []
        for li in range(L):
            prev = state[li]
            labels[:, li], state[li], count[li] = hysteresis(codes[:, li], rule.min_run_, bool(prev), int(count[li]))
            seq = np.concatenate([[prev], labels[:, li]])
            for j in np.flatnonzero(seq[1:] != seq[:-1]):
                new_events.append(StateEvent(li, int(st[j]), bool(labels[j, li])))
                since[li] = st[j] if labels[j, li] else -1
        self.events.extend(new_events)
        self._labels.append(labels)
        self._steps.append(st)
        self._n_seen += t
        keep = min(self._hist, len(p_all))
        self._buf = p_all[len(p_all) - keep :]
        self._buf_n = None if n_all is None else n_all[len(n_all) - keep :]
        return new_events
