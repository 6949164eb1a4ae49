"""What the trace writer thread notes for the manifest's `extra`: lost steps, disabled layers (flagged,
NaN, replicas that differ), conservation violations, and the manifest rewrite that records them.
`WriterNotes` is the base of `BlockWriter` (moeload.tracing.flush), which sets these attributes."""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moeload.trace import TraceWriter
from moeload.trace.manifest import MANIFEST_NAME, write_json_atomic
from moeload.tracing.block import DISABLED_ERROR, FLAG_COL, NAN_COL, NAN_REASON, REASONS, Layout
from moeload.tracing.conservation import check_conservation
from moeload.tracing.ranks import RankLayout

VIOLATIONS_CAP = 100


class WriterNotes:
    """The writer's notes and the manifest rewrite; the attributes are set by `BlockWriter.__init__`."""

    layout: Layout
    rank_layout: RankLayout | None
    writer: TraceWriter | None
    on_error: Callable[[str], None]
    notes: Callable[[], dict[str, Any]]
    top_k: list[int]
    exact: list[bool]
    disabled: dict[str, dict[str, Any]]
    nan_layers: queue.SimpleQueue[tuple[int, int, list[int]]]
    dropped_blocks: int
    micro_lost: list[dict[str, Any]]
    lost_steps: list[dict[str, Any]]
    checked_blocks: int
    violations: list[dict[str, Any]]
    violations_total: int
    _dropped_before: int
    _open_violations: dict[tuple, tuple[int, int | None]]
    _warned_conservation: bool
    _manifest_failing: bool
    _part_failing: bool
    _lock: threading.Lock
    _written_notes: dict[str, Any]
    _dirty: bool

    def _lose(self, split: str, first: int, last: int, reason: str) -> None:
        """Note steps first..last of `split` as lost; merges with the previous range of the same reason."""
        with self._lock:
            prev = next((e for e in reversed(self.lost_steps) if e.get("split") == split), None)
            if prev is not None and prev.get("reason") == reason and prev.get("last") == first - 1:
                prev["last"] = last
            else:
                self.lost_steps.append({"first": first, "last": last, "split": split, "reason": reason})
            self._dirty = True

    def lose_block(self, first: int, last: int, reason: str) -> None:
        """Note steps first..last of every recorded split as lost (a block that never reaches the disk)."""
        for split in ("train", "eval") if self.layout.eval_routed is not None else ("train",):
            self._lose(split, first, last, reason)

    def _supersede(self, first: int) -> None:
        """This session starts at step `first` (a resumed run): readers ignore what earlier sessions wrote
        from there on, so their lost steps from there on are no longer missing (called before any loss
        of this session)."""
        with self._lock:
            out = [e if e["last"] < first else {**e, "last": first - 1} for e in self.lost_steps if e["first"] < first]
            if out != self.lost_steps:
                self.lost_steps = out
                self._dirty = True

    def _note_replicas(self, bad: list[tuple[int, int, int]], steps: np.ndarray) -> None:
        """Layers whose declared tensor-parallel replica saw other tokens than its primary: disabled (the
        counts left out were not copies), warned once."""
        assert self.rank_layout is not None  # the caller checks it
        for s, r, li in bad:
            name = self.layout.layers[li]
            if name in self.disabled:
                continue
            p = int(self.rank_layout.primary[r])
            self.disabled[name] = {
                "step": int(steps[s]),
                "ranks": [r],
                "reason": f"rank {r}'s counts differ from rank {p}'s, of which it was declared a "
                "tensor-parallel replica (sequence parallel? then do not pass tp_group); "
                f"only rank {p}'s are recorded",
            }
            self._dirty = True
            warnings.warn(
                f"moeload: layer {name!r}, step {int(steps[s])}: {self.disabled[name]['reason']}",
                RuntimeWarning,
                stacklevel=2,
            )

    def _note_disabled(self, a: np.ndarray, steps: np.ndarray) -> None:
        """a: [S, R, P, L, W] host block; steps: [S]. Notes each layer disabled (FLAG_COL) or showing NaN
        router probabilities (NAN_COL, train or eval) in `disabled` as {"step", "ranks", "reason"}; a layer
        first seen with NaN goes to `nan_layers` ((layer index, step, ranks)) for the tracer's main thread,
        which removes its hook (hooks are not removed from this thread)."""
        lay = self.layout
        nan = a[:, :, lay.routed, :, NAN_COL]
        if lay.eval_routed is not None:
            nan = nan + a[:, :, lay.eval_routed, :, NAN_COL]
        flags = a[:, :, lay.routed, :, FLAG_COL]
        found = [
            (s, r, li, REASONS.get(int(flags[s, r, li]), REASONS[DISABLED_ERROR]))
            for s, r, li in zip(*np.nonzero(flags))
        ]
        found += [(s, r, li, NAN_REASON) for s, r, li in zip(*np.nonzero(nan > 0))]
        new_nan: dict[int, dict[str, Any]] = {}
        for s, r, li, reason in sorted(found, key=lambda f: (f[0], f[1])):
            name = lay.layers[li]
            entry = self.disabled.get(name)
            if entry is None:
                entry = self.disabled[name] = {"step": int(steps[s]), "ranks": [], "reason": reason}
                if reason == NAN_REASON:
                    new_nan[li] = entry
            if int(r) not in entry["ranks"]:
                entry["ranks"].append(int(r))
        for li, entry in new_nan.items():
            self.nan_layers.put((li, entry["step"], list(entry["ranks"])))

    def _check(self, a: np.ndarray, steps: np.ndarray, rank_rows: bool) -> None:
        """a: [S, R, P, L, W] host block; steps: [S]. Violations go to `violations` (runs of steps merged)."""
        found = check_conservation(a, self.layout, self.top_k, self.exact)
        first = None
        with self._lock:
            self.checked_blocks += 1
            for li, si, q, problem, detail in sorted(found, key=lambda f: (f[0], f[2], f[3], f[1])):
                step, rank = int(steps[si]), int(q) if rank_rows else None
                key = (li, rank, problem)
                last, idx = self._open_violations.get(key, (None, None))
                if last != step - 1:
                    self.violations_total += 1
                    idx = None
                    if len(self.violations) < VIOLATIONS_CAP:
                        idx = len(self.violations)
                        self.violations.append(
                            {
                                "layer": self.layout.layers[li],
                                "first": step,
                                "last": step,
                                "rank": rank,
                                "problem": f"{problem} ({detail} at step {step})",
                            }
                        )
                elif idx is not None:
                    self.violations[idx]["last"] = step
                self._open_violations[key] = (step, idx)
                first = first or f"layer {self.layout.layers[li]!r} at step {step}: {problem} ({detail})"
        if first is not None and not self._warned_conservation:
            self._warned_conservation = True
            warnings.warn(
                f"moeload: conservation check failed on {first}; flagged in the manifest's extra.conservation "
                "(later violations are recorded there, not warned about); nothing is dropped",
                RuntimeWarning,
                stacklevel=2,
            )

    def _flush_notes(self) -> dict[str, Any]:
        with self._lock:
            return {
                "lost_steps": copy.deepcopy(self.lost_steps),
                "dropped_blocks": self._dropped_before + self.dropped_blocks,
                **({"micro_lost": copy.deepcopy(self.micro_lost)} if self.micro_lost else {}),
                "conservation": {
                    "checked_blocks": self.checked_blocks,
                    "violations": copy.deepcopy(self.violations),
                    "violations_total": self.violations_total,
                },
            }

    def note_changed(self) -> None:
        """The caller's notes (`notes()`) changed: the manifest is rewritten after the next block or at close."""
        self._dirty = True

    def update_manifest(self) -> None:
        """Write the manifest now where its notes changed (also done after every block and at close)."""
        self._update_manifest()

    def _update_manifest(self) -> str | None:
        """Write the manifest where its notes changed; where that fails, retry after the next block / at close.
        -> None, or the failure (`_os_reason`)."""
        if self.writer is None:
            return None
        notes = {**self.notes(), **({"disabled_layers": self.disabled} if self.disabled else {}), **self._flush_notes()}
        if _unchecked(notes) == _unchecked(self._written_notes) and not self._dirty:
            return None  # a new checked_blocks count alone waits for the next write (at the latest, close)
        m = self.writer.manifest
        m.extra.update(notes)
        path = Path(self.writer.path) / MANIFEST_NAME
        try:
            write_json_atomic(path, m.to_dict())
        except OSError as e:
            _remove(path.with_name(f".{path.name}.tmp"))
            self._dirty = True
            if not self._manifest_failing and not self._part_failing:  # not the fault just reported
                self._manifest_failing = True
                self.on_error(
                    f"writing {path} failed ({type(e).__name__}: {e.strerror or e}); "
                    "retried after the next block and at close"
                )
            return _os_reason(e)
        self._manifest_failing = False
        self._written_notes = copy.deepcopy(notes)
        self._dirty = False
        return None


def _os_reason(e: OSError) -> str:
    """How a write failed, for the manifest's notes: "OSError: [Errno 28] No space left on device"."""
    return f"{type(e).__name__}: " + (f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e))


def _remove(tmp: Path) -> None:
    """Remove a temporary file left by a failed write, where the file system lets us."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _unchecked(notes: dict[str, Any]) -> dict[str, Any]:
    c = notes.get("conservation")
    return {**notes, "conservation": {**c, "checked_blocks": None}} if isinstance(c, dict) else notes
