"""Step and layer selections of trace reads: the recorded steps and layers that a `steps=` or
`layers=` argument picks (see `Trace`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeload.errors import InputError, TraceFormatError
from moeload.trace.index import TraceIndex

StepSel = None | slice | range | tuple[int, int] | Sequence[int] | np.ndarray
LayerSel = None | int | str | Sequence[int | str] | np.ndarray


class TraceSelection(TraceIndex):
    """The step and layer selections every read of `Trace` goes through."""

    def _select_steps(self, steps: StepSel, split: str) -> tuple[np.ndarray, np.ndarray]:
        all_steps, owner = self._owner.get(split, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if steps is None:
            self._touch(split)
            keep = np.ones(len(all_steps), bool)
        elif isinstance(steps, (tuple, slice)):
            if isinstance(steps, tuple) and len(steps) != 2:
                raise InputError(f"{self.path}: steps=(start, stop) needs 2 step numbers, got {len(steps)}")
            start, stop, stride = (steps.start, steps.stop, steps.step) if isinstance(steps, slice) else (*steps, None)
            start, stop, stride = (None if v is None else self._index_arg("steps", v) for v in (start, stop, stride))
            if stride is not None and stride < 1:
                raise InputError(f"{self.path}: steps slice stride must be a positive integer, got {stride}")
            self._touch(split, lo=-np.inf if start is None else start, hi=np.inf if stop is None else stop - 1)
            keep = np.ones(len(all_steps), bool)
            if start is not None:
                keep &= all_steps >= start
            if stop is not None:
                keep &= all_steps < stop
            if stride is not None and stride > 1:  # step numbers start, start + stride, ... (start 0 if None)
                keep &= (all_steps - (start or 0)) % stride == 0
        else:
            want = self._step_array(steps)
            self._touch(split, want)
            missing = np.setdiff1d(want, all_steps)
            if len(missing):
                raise TraceFormatError(
                    f"{self.path}: step(s) {missing[:5].tolist()} not recorded (have {len(all_steps)} steps"
                    + (f", {all_steps[0]}..{all_steps[-1]})" if len(all_steps) else ")")
                )
            idx = np.searchsorted(all_steps, want)
            return all_steps[idx], owner[idx]
        return all_steps[keep], owner[keep]

    def _index_arg(self, what: str, v: Any) -> int:
        """A step or layer number given by the caller: a Python or NumPy integer; bool, float (2.7 is not
        truncated to 2) and anything else raise InputError."""
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{self.path}: {what} must be integers, got {v!r} ({type(v).__name__})")
        return int(v)

    def _step_array(self, steps: Any) -> np.ndarray:
        """Explicit step numbers (a range, sequence or array of integers) -> [n] int64."""
        if isinstance(steps, range):
            return np.arange(steps.start, steps.stop, steps.step, dtype=np.int64)
        try:
            a = np.asarray(steps)
        except (ValueError, TypeError):
            raise InputError(f"{self.path}: steps must be step numbers (integers)") from None
        if a.size == 0:
            return np.zeros(0, np.int64)
        flat = a.reshape(-1)
        if a.dtype.kind == "O":  # mixed types, or Python integers too large for int64
            bad = next((x for x in flat if isinstance(x, bool) or not isinstance(x, (int, np.integer))), None)
            if bad is None:
                raise InputError(f"{self.path}: steps beyond int64 (got {max(flat)})")
            raise InputError(f"{self.path}: steps must be integers, got {bad!r} ({type(bad).__name__})")
        if a.dtype.kind not in "iu":
            raise InputError(f"{self.path}: steps must be integers, got {flat[0]!r} ({a.dtype})")
        if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise InputError(f"{self.path}: steps beyond int64 (got {a.max()})")
        return flat.astype(np.int64)

    def layer_ids(self, layers: LayerSel = None) -> np.ndarray:
        """[L'] layer ids (positions in `layers`) of a layer selection: ids, module paths, or None (all);
        InputError with one line for a name or id the trace does not hold."""
        return self._select_layers(layers)

    def select_steps(self, steps: StepSel = None, split: str = "train") -> np.ndarray:
        """[S'] the recorded step numbers a step selection picks (the rows every read with that `steps`
        returns), without reading counts; InputError / TraceFormatError as the reads raise them."""
        return self._select_steps(steps, split)[0].copy()

    def _select_layers(self, layers: LayerSel) -> np.ndarray:
        if layers is None:
            return np.arange(self.num_layers)
        if isinstance(layers, (int, np.integer, str, float, np.floating)):
            layers = [layers]
        out = []
        for x in layers:
            if isinstance(x, str):
                if x not in self.manifest.layers:
                    raise TraceFormatError(f"{self.path}: no layer named {x!r}; layers are {self.layers}")
                out.append(self.manifest.layers.index(x))
            else:
                i = self._index_arg("layers", x)
                if not -self.num_layers <= i < self.num_layers:
                    raise TraceFormatError(f"{self.path}: layer index {i} out of range (trace has {self.num_layers})")
                out.append(i % self.num_layers)
        return np.asarray(out, dtype=np.int64)
