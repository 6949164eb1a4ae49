"""LoadTracer and torch.compile: layer names without compiled wrappers' segments, finding modules that
ran compiled, the dynamo reset at start(), and the checks for steps (and gates) where no hook ran."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moeload.errors import first_line
from moeload.tracing.block import TOKENS_COL
from moeload.tracing.tracer_state import TracerState

_cache_entries: Callable[[Any], list[Any]] | None
try:  # private, present since torch 2.1: the compiled code dynamo holds for one code object
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as _cache_entries
except ImportError:  # pragma: no cover - torch builds without dynamo
    _cache_entries = None
NO_FORWARD_CAP = 100
"""Ranges of steps without gate forwards kept in `extra.no_forward_steps`; later ones are only counted."""


class CompileChecks(TracerState):
    """The part of LoadTracer that deals with code dynamo compiled before or after the hooks."""

    def _reset_compiled(self) -> None:
        """Dynamo does not call forward hooks added after it compiled a module's code (it does not
        guard on hooks, `torch._dynamo.config.skip_nnmodule_hook_guards`): where it already holds
        compiled code for the model or a module around a gate, reset it, so the next call recompiles
        with the hooks in. The reset is global (`torch.compiler.reset()`): every compiled function
        of this process recompiles at its next call."""
        found = compiled_modules(self.model, [s.module for s in self.specs])
        if not found:
            return
        try:
            torch.compiler.reset()
        except Exception as e:  # tracing never breaks training: the step checks still flag zero-forward steps
            warnings.warn(
                f"moeload: torch.compiler.reset() failed ({type(e).__name__}: {first_line(e, 160)}); hooks "
                f"added after {found[0]!r} was compiled may not run",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.dynamo_reset = {"step": self.step_count, "modules": found[:8]}
        shown = ", ".join(repr(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        warnings.warn(
            f"moeload: {shown} had been compiled and run before the tracer attached, so dynamo would not "
            "call its hooks; called torch.compiler.reset() (every compiled function in this process "
            "recompiles once at its next call). To avoid it, create the tracer before compiling",
            RuntimeWarning,
            stacklevel=3,
        )

    def _check_forwards(self) -> None:
        """At step(): note a step in which no gate's hook ran (a model or step function compiled
        before the tracer attached, which start() cannot see; warned once, `extra.no_forward_steps`)."""
        if self._compiled_layers:  # compiled hooks count on the device; a graph that runs calls them
            return
        n = sum(self._calls)
        if n != self._calls_at_step:
            self._calls_at_step = n
            return
        if self._live is not None:  # no eager hook ran: did compiled ones? (one host read, once)
            ran = (self._live[..., TOKENS_COL].sum(0) > 0).tolist()
            self._compiled_layers.update(li for li, r in enumerate(ran) if r)
            if self._compiled_layers:
                return
        step = self.step_count
        runs = self._no_forward_steps
        if runs and runs[-1][1] == step - 1:
            runs[-1][1] = step
            return
        if len(runs) == NO_FORWARD_CAP:  # the first ranges say what happened; the total stays exact
            self._no_forward_more += 1
            return
        runs.append([step, step])
        if len(runs) == 1:
            warnings.warn(
                f"moeload: step {step}: no forward of any of the {len(self.local_layers)} traced gates was seen, so "
                "its counts are zero. If the model (or the training step) was compiled and run before the "
                "tracer attached, dynamo does not call hooks added later: create the tracer before "
                "compiling, or call torch.compiler.reset() after creating it (manifest "
                "extra.no_forward_steps)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_silent(self) -> None:
        """At the first flush: gates whose hook never ran in the block (while steps passed) are listed in
        `extra.disabled_layers` with the reason, warned once."""
        if self._silent_checked or self._slot == 0:
            return
        self._silent_checked = True
        quiet = [li for li, n in enumerate(self._calls) if n == 0 and li not in self._compiled_layers]
        if quiet and self._live is not None and self._buf is not None:  # in-graph hooks count on the device (one read)
            tokens = self._buf[: self._slot, :, :, TOKENS_COL].sum((0, 1)).tolist()
            self._compiled_layers.update(li for li in quiet if tokens[li] > 0)
        last = self.step_count - 1
        others = "no other gate ran either" if not (any(self._calls) or self._compiled_layers) else "other gates ran"
        reason = (
            f"no forward seen in steps {self._first_step}..{last} ({others}; compiled before the tracer "
            "attached? create the tracer before compiling or call torch.compiler.reset())"
        )
        for li in quiet:
            if li not in self._compiled_layers:
                self._silent[self.local_layers[li]] = {"step": self._first_step, "ranks": [self.rank], "reason": reason}
        if self._silent:
            names = list(self._silent)
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            warnings.warn(
                f"moeload: {len(names)} of {len(self.local_layers)} traced gates ({shown}) {reason}; listed in the "
                "manifest's extra.disabled_layers",
                RuntimeWarning,
                stacklevel=3,
            )


def plain_name(path: str) -> str:
    """A module path without the `_orig_mod` segments that `torch.compile` wrappers add, so a layer has the
    same name in eager and compiled models (whole-model or per-block compile)."""
    return ".".join(p for p in path.split(".") if p != "_orig_mod")


def compiled_modules(model: nn.Module, gates: Sequence[nn.Module]) -> list[str]:
    """Paths (plain names, "<model>" for `model` itself) of the modules on the way from `model` to each gate, the gates
    included, whose forward code dynamo holds compiled code for (it ran compiled: `torch.compile(m)`,
    `m.compile()`, per-block compile), or, where that cannot be read, that are compiled wrappers."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled in this process
        return []
    paths = {id(m): p for p, m in model.named_modules()}
    on_path: set[str] = set()
    for g in gates:
        if id(g) in paths:
            parts = paths[id(g)].split(".") if paths[id(g)] else []
            on_path.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    found = []
    for p, m in model.named_modules():
        name = plain_name(p) or "<model>"
        if p in on_path and name not in found and _ran_compiled(m):
            found.append(name)
    return found


def _ran_compiled(m: nn.Module) -> bool:
    wrapper = (
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
    )
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    if _cache_entries is None or code is None:
        return wrapper
    try:
        return len(_cache_entries(code)) > 0
    except Exception:  # a private API that changed: fall back to what can be seen
        return wrapper
