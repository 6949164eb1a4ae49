"""Shared parts of the expert-parallel tracing scripts (ds_ep_trace.py, mcore_ep_trace.py).

- `SyncGuard`: `torch.cuda.set_sync_debug_mode` switched on only while moeload code runs (the
  tracer's forward hooks and `step()`), so the framework's own syncs are not counted;
- `RefCounts`: the scripts' own per-step reference counts, accumulated on the device;
- `check_and_summarize`: gathers every rank's reference, compares it with the trace (rank 0) and
  builds the JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def base_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="JSON summary path (the trace goes to <out>.trace)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, for a smoke run")
    p.add_argument("--steps", type=int, default=40, help="traced optimizer steps")
    p.add_argument("--baseline-steps", type=int, default=10, help="untraced steps timed first (0: none)")
    p.add_argument("--micro", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch per rank")
    p.add_argument("--flush-every", type=int, default=16)
    p.add_argument("--sync-mode", default="error", choices=["error", "warn", "off"])
    return p


def init(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; selects the GPU."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


class SyncGuard:
    """Context manager: sync debug mode `mode` on ("error" raises on a host-device sync, "warn" warns
    and the warnings are counted); a no-op on CPU or with mode "off"."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode if device.type == "cuda" else "off"
        self.warnings = 0
        self.entered = 0
        self.messages: list[str] = []

    @contextlib.contextmanager
    def __call__(self):
        if self.mode == "off":
            yield
            return
        self.entered += 1
        prev = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(self.mode)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        hits = [f"{x.category.__name__} {x.filename}:{x.lineno}: {x.message}" for x in w if "synchroniz" in str(x.message)]
        self.warnings += len(hits)
        self.messages.extend(m for m in hits if m not in self.messages and len(self.messages) < 5)

    def install(self, tracer_cls: Any) -> None:
        """Guard every forward hook the tracer creates from now on (wraps `_make_hook`)."""
        orig = tracer_cls._make_hook
        guard = self

        def make_hook(tracer, li, spec):
            hook = orig(tracer, li, spec)

            def guarded(module, inputs, output):
                with guard():
                    return hook(module, inputs, output)

            return guarded

        tracer_cls._make_hook = make_hook

    def wrap_step(self, tracer: Any) -> None:
        """Guard `tracer.step()` (the flush: one collective + one async copy)."""
        step = tracer.step

        def guarded_step():
            with self():
                step()

        tracer.step = guarded_step


class RefCounts:
    """Reference routed / kept counts [L, E] of the current step on the device, one row per step kept."""

    def __init__(self, layers: int, experts: int, device: torch.device) -> None:
        self.routed = torch.zeros(layers, experts, dtype=torch.int64, device=device)
        self.kept = torch.zeros_like(self.routed)
        self.tokens = torch.zeros(layers, dtype=torch.int64, device=device)
        self.steps_routed: list[torch.Tensor] = []
        self.steps_kept: list[torch.Tensor] = []
        self.steps_tokens: list[torch.Tensor] = []
        self.enabled = False

    def add_indices(self, li: int, idx: torch.Tensor, which: str = "routed") -> None:
        """idx: any shape of expert ids, -1 = none (ignored)."""
        if not self.enabled:
            return
        E = self.routed.shape[1]
        i = idx.reshape(-1).long()
        i = torch.where(i >= 0, i, E)
        row = torch.zeros(E + 1, dtype=torch.int64, device=i.device).index_add_(0, i, torch.ones_like(i))
        getattr(self, which)[li].add_(row[:E])

    def add_counts(self, li: int, counts: torch.Tensor, which: str = "routed") -> None:
        if self.enabled:
            getattr(self, which)[li].add_(counts.long())

    def add_tokens(self, li: int, n: int) -> None:
        if self.enabled:
            self.tokens[li] += n

    def end_step(self) -> None:
        if self.enabled:
            for name in ("routed", "kept", "tokens"):
                t = getattr(self, name)
                getattr(self, "steps_" + name).append(t.clone())
                t.zero_()

    def stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> routed, kept [S, L, E], tokens [S, L] of this rank, on the host (one copy at the end)."""
        return tuple(torch.stack(getattr(self, "steps_" + n)).cpu().numpy() for n in ("routed", "kept", "tokens"))


def gather(x: np.ndarray, world: int, device: torch.device) -> np.ndarray:
    """[R, *x.shape]: x of every rank."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    outs = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(outs, t)
    return torch.stack(outs).cpu().numpy()


def check_and_summarize(args, ref: RefCounts, tracer: Any, trace_path: str, world: int, device: torch.device,
                        guard: SyncGuard, timing: dict[str, float], framework: dict[str, Any], kept: bool,
                        first_step: int = 0) -> dict | None:
    """Compare the trace with every rank's reference (rank 0 asserts); returns the summary on rank 0.

    first_step: the trace's first step number (the framework's step counter when tracing began)."""
    routed, kept_ref, tokens = ref.stacked()
    all_routed, all_kept, all_tokens = (gather(a, world, device) for a in (routed, kept_ref, tokens))
    if dist.get_rank() != 0:
        return None
    from moeload import open_trace

    t = open_trace(trace_path)
    S = len(ref.steps_routed)
    assert t.steps.tolist() == list(range(first_step, first_step + S)), f"trace steps {t.steps[:5]}... != {first_step}.."
    rc = t.rank_counts()  # [S, R, L, E]
    want = all_routed.transpose(1, 0, 2, 3)
    assert np.array_equal(rc, want), f"per-rank routed counts differ in {int((rc != want).sum())} entries"
    assert np.array_equal(t.counts(), want.sum(1)), "global routed counts differ"
    if kept:
        wk = all_kept.transpose(1, 0, 2, 3)
        assert np.array_equal(t.rank_counts(kind="kept"), wk), "per-rank kept counts differ"
    assert np.array_equal(t.tokens(), all_tokens.sum(0)), "tokens differ"
    assert not tracer.errors and not tracer.disabled_layers, f"tracer errors: {tracer.errors}"
    if guard.mode == "error":
        assert guard.entered > 0
    gl = t.gpu_loads()  # [S, L, G]
    local = t.num_experts // max(1, t.meta["ep_size"])
    want_gl = want.sum(1).reshape(S, len(t.layers), -1, local).sum(-1)
    assert np.array_equal(gl, want_gl), "per-GPU loads differ from contiguous EP placement"
    g = gl.sum(0).astype(np.float64)
    c = t.counts().sum(0).astype(np.float64)
    summary = {
        "ok": True,
        "framework": framework,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": world, "ep_size": t.meta["ep_size"], "args": vars(args),
        "trace": trace_path, "steps": S, "first_step": first_step, "layers": t.layers, "count_kind": t.meta["count_kind"],
        "expert_to_rank": t.meta.get("expert_to_rank"),
        "tokens_per_step": int(t.tokens()[0, 0]),
        "global_counts_total": c.astype(np.int64).tolist(),
        "per_rank_routes_total": rc.sum((0, 3)).tolist(),
        "gpu_loads_total": g.astype(np.int64).tolist(),
        "gpu_max_over_mean": (g.max(-1) / g.mean(-1)).tolist(),
        "expert_max_over_mean": (c.max(-1) / c.mean(-1)).tolist(),
        "kept_fraction": (t.counts(kind="kept").sum() / t.counts().sum()) if kept else None,
        "tracer": {"flushes": tracer.flushes, "collectives": tracer.collectives, "errors": tracer.errors},
        "sync_check": {"mode": guard.mode, "guarded_regions": guard.entered, "sync_warnings": guard.warnings,
                       "sync_warning_messages": guard.messages},
        "timing_ms_per_step": timing,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def fresh_trace_path(out: str, rank: int) -> str:
    """`<out>.trace`, emptied by rank 0 before any rank traces into it (a collective: all ranks call it)."""
    path = out + ".trace"
    if rank == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return path


def timed_steps(n: int, step_fn, device: torch.device) -> float | None:
    """Mean ms per call of step_fn over n calls (synchronizes before and after: outside guarded regions)."""
    if n <= 0:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3
