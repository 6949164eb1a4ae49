"""Step time of the embedded MoE workload with and without LoadTracer, measured in the same run.

Two identical models (same seed, same batches, same optimizer) are stepped alternately in blocks of
``--block`` steps, in ABBA order: one has a LoadTracer attached, the other has none. Every step is timed on its own
(``torch.cuda.synchronize`` before and after on CUDA, for both arms alike), so machine noise hits
both arms equally and the overhead is a mean of paired differences:

    overhead % = mean(t_traced - t_plain) / mean(t_plain) * 100, with a 95 % t-interval.

``--mode compiled`` (or ``--compile``) measures ``torch.compile``d models (whole model; the
backward and the optimizer step stay eager), ``--mode both`` eager and compiled in one run (each
round runs both modes, each mode its ABBA pair). Compiled arms live in two worker processes, one
per arm, so that each has its own dynamo cache: dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards``), and two instances of one model class compiled
in one process share compiled code, so whichever arm compiles first decides whether the other runs
the hooks (a traced arm compiled second records zeros). The traced arm's tracer is attached before
``torch.compile``. The ``--warmup`` steps, which compile, run in both workers at once and are not
timed; then the workers step in turn, one at a time, and time their own steps. In ``--mode both``
the eager arms are in the same workers (eager models never enter dynamo). ``--mode eager`` runs
both arms in this process, as before.

Each worker reports its dynamo statistics (graphs compiled, graph breaks and their reasons,
recompiles and their guard failures, before and after the warm-up). Each traced arm's counts are
checked exactly: every step, every traced layer, ``tokens = tokens per step`` and
``sum of counts = tokens x top_k``; a failed check is printed and the exit code is 1. The
tracer's flushes (every ``--flush-every`` steps) fall inside the timed steps. Writes
``tracer_overhead_<config>_<device>[_compiled|_both].json`` and ``.png`` to ``--out``.

Experts (``--experts``). ``loop``: the workload's `MoELayer` (per-expert chunks of data-dependent
size, one host sync per layer); under dynamo every new pattern of chunk sizes recompiles until
``recompile_limit`` (8) sends the layer back to eager, so a compiled run of it measures a mix.
``grouped``: `experiments/train_long.py`'s `GroupedMoE` (imported, not copied): an
``[E, capacity, H]`` dispatch buffer (capacity factor ``--capacity-factor``, default train_long's
1.25, overflow dropped; the trace's routed counts are unaffected) and two batched GEMMs, static
shapes, so dynamo compiles once; its router (with the tracer's hook) runs eagerly (train_long's
`route`), as in train_long's compiled runs. Default (``auto``): ``grouped`` for ``--mode compiled``
and for both modes of ``--mode both``, ``loop`` for ``--mode eager``. Any compile or recompile
during the measured steps, or any frame hitting the recompile limit, fails the run (JSON
``failed``, a banner on stdout, exit code 1).

Time. A progress line and the JSON so far (``"complete": false``) every ``--save-every`` seconds,
so a run killed from outside leaves what it measured; SIGTERM (``timeout``) writes it too.
``--budget-s`` caps each mode's measured seconds (a mode over it stops at the end of a round, the
others go on); ``--deadline-s`` stops every mode once that many seconds have passed since the start
(also right after a slow warm-up). Either way the tracers are then closed, the steps run are
checked, and the result says ``"complete": false`` with ``stopped`` per mode (exit code 3 if
nothing failed).

    python benchmarks/tracer_overhead.py --device cpu --config cpu-demo --steps 60
    python benchmarks/tracer_overhead.py --device cuda --config gpt3-small-moe --steps 300 --block 4 --warmup 10
    python benchmarks/tracer_overhead.py --device cuda --steps 400 --block 4 --warmup 10 --mode both --deadline-s 520
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ARMS = ("traced", "plain")


TRAIN_LONG = Path(__file__).resolve().parents[1] / "experiments" / "train_long.py"


def train_long():
    """experiments/train_long.py as a module (its `GroupedMoE`, `CAPACITY_FACTOR`)."""
    mod = sys.modules.get("train_long")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == TRAIN_LONG:
        return mod
    spec = importlib.util.spec_from_file_location("train_long", TRAIN_LONG)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_long"] = mod  # dynamo looks its disabled `route` up by module name
    spec.loader.exec_module(mod)
    return mod


def build(cfg, device: torch.device, steps: int, seed: int, experts: str = "loop"):
    """The workload model from `seed`; experts "grouped": each MoE FFN replaced by train_long's
    `GroupedMoE` on the same router and expert weights (static shapes)."""
    from moeload.workloads import build_model
    from moeload.workloads.train import make_optimizer

    model = build_model(cfg, seed, "cpu")
    if experts == "grouped":
        grouped = train_long().GroupedMoE
        for block in model.blocks:
            if hasattr(block, "moe"):
                block.moe = grouped(block.moe.router, block.moe.experts)
    model = model.to(device)
    model.train()
    opt, sched = make_optimizer(model, cfg, steps)
    return model, opt, sched


def make_step(cfg, model, opt, sched, device: torch.device, micro: int):
    """model: the module or its torch.compile wrapper (called for the forward only)."""
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()

    def step(batch_list) -> None:
        for x, y in batch_list:
            with amp:
                out = model(x, y)
            (out.loss / micro).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def hook_cost(hooked, bare, x: torch.Tensor, device: torch.device, rounds: int = 30, calls: int = 50) -> dict:
    """Per-forward cost of the tracer's hook: the same router forward with and without it, interleaved.

    hooked, bare: routers with identical weights, `hooked` under a running LoadTracer; x: [T, H].
    """
    per = {"hooked": [], "bare": []}
    with torch.no_grad():
        for r in range(rounds):
            for name, mod in [("hooked", hooked), ("bare", bare)][:: 1 if r % 2 == 0 else -1]:
                dt = timed(lambda mod=mod: [mod(x) for _ in range(calls)], device)
                per[name].append(dt / calls)
    h, b = np.median(per["hooked"]), np.median(per["bare"])
    return {"router_forward_us": float(1e6 * b), "hook_us": float(1e6 * (h - b)), "rounds": rounds, "calls": calls}


def summarize(traced: np.ndarray, plain: np.ndarray) -> dict:
    """traced, plain: [n] paired step times (s) -> means, medians, overhead % with a 95 % t-interval."""
    from scipy import stats

    d = traced - plain
    n = len(d)
    base = plain.mean()
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "n_pairs": n,
        "traced_mean_s": float(traced.mean()),
        "plain_mean_s": float(base),
        "traced_median_s": float(np.median(traced)),
        "plain_median_s": float(np.median(plain)),
        "overhead_pct": float(100 * d.mean() / base),
        "overhead_ci95_pct": [float(100 * (d.mean() - half) / base), float(100 * (d.mean() + half) / base)],
        "overhead_median_pct": float(100 * (np.median(traced) - np.median(plain)) / np.median(plain)),
    }


def check_counts(trace, steps: int, tokens_per_step: int, top_k: int) -> list[str]:
    """Failures of the exact-count check of one trace: every step recorded; per step and layer,
    tokens = tokens_per_step and the routed counts sum to tokens_per_step * top_k."""
    if len(trace.steps) != steps:
        return [f"{len(trace.steps)} steps recorded, {steps} run"]
    tok, cnt = trace.tokens(), trace.counts().sum(-1)  # [S, L], [S, L]
    bad = []
    for what, got, want in (("tokens", tok, tokens_per_step), ("sum of counts", cnt, tokens_per_step * top_k)):
        wrong = np.argwhere(got != want)
        if len(wrong):
            s, li = wrong[0]
            bad.append(f"{what} != {want} at {len(wrong)} of {got.size} (step, layer); first: step {s}, layer "
                       f"{trace.layers[li]!r}: {int(got[s, li])}")
    return bad


class DynamoLog:
    """Dynamo's counters and recompile messages of this process (one arm per process)."""

    def __init__(self) -> None:
        self.recompiles: list[str] = []
        torch._logging.set_logs(recompiles=True)
        log = logging.getLogger("torch._dynamo.guards.__recompiles")
        log.propagate = False  # collected here, not printed
        self.limits: list[str] = []  # "hit config.recompile_limit": that frame runs eager from then on
        self._handlers = [(log, _Collect(self.recompiles)),
                          (logging.getLogger("torch._dynamo.convert_frame"), _Collect(self.limits, "torch._dynamo hit config."))]
        for logger, handler in self._handlers:
            logger.addHandler(handler)
        self.marks: dict[str, dict] = {}

    def detach(self) -> None:
        """Stop collecting; dynamo's logging as it was (for a DynamoLog in a process that goes on)."""
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        self._handlers[0][0].propagate = True
        torch._logging.set_logs()

    def compiles(self) -> int:
        """Graphs compiled plus recompiles so far (a step that changes it compiled something)."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]) + len(self.recompiles)

    def mark(self, name: str) -> None:
        from torch._dynamo.utils import counters

        self.marks[name] = {
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": len(self.recompiles),
            "recompile_limit_hits": len(self.limits),
        }

    def report(self) -> dict:
        from torch._dynamo.utils import counters

        reasons = {k.split("\n")[0]: int(v) for k, v in counters["graph_break"].items()}
        w = self.marks.get("after_warmup", {}).get("recompiles", 0)
        return {"at": self.marks, "graph_break_reasons": reasons, "recompile_limit_hits": [_brief(m) for m in self.limits],
                "recompile_reasons": {"warmup": [_brief(r) for r in self.recompiles[:w][:8]],
                                      "measured": [_brief(r) for r in self.recompiles[w:][:8]]}}


def _brief(message: str) -> str:
    """A dynamo recompile message -> "function file:line: first failed guard"."""
    lines = [ln.strip() for ln in message.splitlines()]
    if lines[0].startswith("torch._dynamo hit config."):  # recompile limit: "function: ...", "last reason: ..."
        return " ".join(lines[:3])[:300]
    where = lines[0].removeprefix("Recompiling function ")
    guard = next((ln[2:] for ln in lines[1:] if ln.startswith("- ")), "")
    return f"{where}: {guard}"[:300]


class _Collect(logging.Handler):
    def __init__(self, into: list[str], prefix: str = "") -> None:
        super().__init__(logging.DEBUG)
        self.into, self.prefix = into, prefix

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.into.append(message)


class Arm:
    """One arm ("traced" or "plain") in this process: per mode ("eager", "compiled") a model built
    from the same seed, its optimizer and step function; the traced arm's tracers (attached before
    torch.compile) write to `tmp`. The batches are made here, from the seed, before any timing."""

    def __init__(self, name: str, args, cfg, device: torch.device, modes: list[str], tmp: str) -> None:
        from moeload import LoadTracer
        from moeload.workloads import batches

        self.name, self.args, self.cfg, self.device, self.tmp = name, args, cfg, device, Path(tmp)
        total = args.warmup + args.steps
        data = batches(cfg, args.seed, device)
        self.steps_data = [[next(data) for _ in range(args.micro_batches)] for _ in range(total)]
        self.checksum = int(sum(int(x.sum()) for b in self.steps_data for x, _ in b))
        self.models, self.steps, self.tracers = {}, {}, {}
        for mode in modes:
            model, opt, sched = build(cfg, device, total, args.seed, args.experts)
            if name == "traced":
                self.tracers[mode] = LoadTracer(model, self.tmp / f"{name}_{mode}.moeload", flush_every=args.flush_every).start()
            fwd = torch.compile(model, backend=args.backend) if mode == "compiled" else model
            self.models[mode] = model
            self.steps[mode] = make_step(cfg, fwd, opt, sched, device, args.micro_batches)
        self.dynamo = DynamoLog() if "compiled" in modes else None
        self.ran: dict[str, int] = {}  # mode -> steps run (they run in order from 0)

    def run(self, mode: str, idxs: list[int]) -> dict:
        """Steps `idxs` of `mode`, each timed alone -> {"times": [len(idxs)] seconds, "compiled": steps of
        `idxs` in which dynamo compiled or recompiled something}."""
        step, tracer = self.steps[mode], self.tracers.get(mode)

        def one(j: int) -> None:
            step(self.steps_data[j])
            if tracer is not None:
                tracer.step()

        out, hot = [], []
        limits = len(self.dynamo.limits) if self.dynamo is not None else 0
        for j in idxs:
            before = self.dynamo.compiles() if self.dynamo is not None else 0
            out.append(timed(lambda j=j: one(j), self.device))
            self.ran[mode] = j + 1
            if self.dynamo is not None and self.dynamo.compiles() != before:
                hot.append(j)
        hits = [_brief(m) for m in self.dynamo.limits[limits:]] if self.dynamo is not None else []
        return {"times": out, "compiled": hot, "limit_hits": hits}

    def mark(self, name: str) -> None:
        if self.dynamo is not None:
            self.dynamo.mark(name)

    def finish(self) -> dict:
        """Closes the tracers -> {"checks": {mode: [failures]}, "trace_bytes", "hook_timing", "dynamo"}."""
        from moeload import LoadTracer, open_trace

        self.mark("end")
        out: dict = {"checks": {}, "trace_bytes": {}, "hook_timing": None,
                     "dynamo": self.dynamo.report() if self.dynamo is not None else None}
        if self.dynamo is not None:
            self.dynamo.detach()
        for mode, tracer in self.tracers.items():
            tracer.close()
            t = open_trace(tracer.path)
            out["checks"][mode] = [f"tracer error: {e}" for e in tracer.errors] + check_counts(
                t, self.ran.get(mode, 0), self.cfg.tokens_per_batch * self.args.micro_batches, self.cfg.top_k)
            out["trace_bytes"][mode] = t.size_bytes
        if "eager" in self.tracers:  # the hook's cost per gate forward, apart from the noise of whole steps
            model = self.models["eager"]
            name = next(iter(model.routers()))
            bare = copy.deepcopy(model.routers()[name])  # no hooks: the tracer is closed
            with warnings.catch_warnings():  # in --mode both the compiled twin's code objects are in dynamo's
                warnings.simplefilter("ignore")  # cache, which start() reads as this model compiled; timing is over
                probe = LoadTracer(model, sink=lambda block: None, flush_every=10**6).start()
            with torch.no_grad():
                x = model.blocks[self.cfg.moe_layers[0]].ln2(model.embed(self.steps_data[0][0][0])).reshape(-1, self.cfg.d_model)
            out["hook_timing"] = hook_cost(model.routers()[name], bare, x, self.device, rounds=self.args.hook_rounds)
            probe.close()
        return out


def setup(args) -> tuple:
    from moeload.workloads import get_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cfg = get_config(args.config or ("cpu-demo" if device.type == "cpu" else "gpt3-small-moe"))
    if args.capacity_factor is not None or (args.experts == "grouped" and cfg.capacity_factor is None):
        cfg = cfg.replace(capacity_factor=args.capacity_factor or train_long().CAPACITY_FACTOR)
    return cfg, device


def _serve(conn, name: str, argv: list[str], modes: list[str], tmp: str) -> None:
    """A worker process holding one arm: answers ("run", mode, idxs), ("mark", name), ("finish",)."""
    try:
        args = parse(argv)
        cfg, device = setup(args)
        arm = Arm(name, args, cfg, device, modes, tmp)
        conn.send(("ok", arm.checksum))
        while True:
            cmd, *rest = conn.recv()
            if cmd == "run":
                conn.send(("ok", arm.run(*rest)))
            elif cmd == "mark":
                conn.send(("ok", arm.mark(*rest)))
            else:
                conn.send(("ok", arm.finish()))
                return
    except BaseException as e:  # report to the parent, which stops the run
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class RemoteArm:
    """An Arm in a worker process (spawned: its own dynamo cache, CUDA context and allocator)."""

    def __init__(self, name: str, argv: list[str], modes: list[str], tmp: str) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, argv, modes, tmp), daemon=True)
        self.proc.start()

    def send(self, *cmd) -> None:
        self.conn.send(cmd)

    def recv(self):
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise SystemExit(f"{self.name} worker died (exit code {self.proc.exitcode})")
        status, value = self.conn.recv()
        if status == "error":
            raise SystemExit(f"{self.name} worker failed: {value}")
        return value

    def call(self, *cmd):
        self.send(*cmd)
        return self.recv()

    def run(self, mode: str, idxs: list[int]) -> dict:
        return self.call("run", mode, idxs)

    def mark(self, name: str) -> None:
        self.call("mark", name)

    def finish(self) -> dict:
        out = self.call("finish")
        self.proc.join(60)
        return out


class Progress:
    """What the run has measured so far; filled in by `interleave`, read by the partial saves."""

    def __init__(self, modes: list[str]) -> None:
        self.times: dict = {m: {a: [] for a in ARMS} for m in modes}  # mode -> arm -> [steps] seconds
        self.compiled: dict = {m: set() for m in modes}  # mode -> steps in which a worker compiled or recompiled
        self.spent = dict.fromkeys(modes, 0.0)  # mode -> seconds in its measured steps
        self.stopped: dict[str, str] = {}  # mode -> why it stopped before --steps pairs
        self.phases: dict[str, float] = {}

    def pairs(self, mode: str) -> int:
        return min(len(t) for t in self.times[mode].values())


def _say_limits(mode: str, name: str, d: dict) -> None:
    for hit in d["limit_hits"]:
        print(f"!! [{mode}] the {name} arm: {hit} -- that frame runs eagerly from now on (this run will fail)", flush=True)


def interleave(arms: dict, modes: list[str], args, total: int, prog: Progress, tick, t_start: float) -> None:
    """Untimed warm-up steps [0, warmup) of every mode (in all arms at once with worker processes),
    then steps [warmup, total) in rounds of `args.block` steps: each mode, each arm, ABBA (the first
    arm and the first mode swap every round), into `prog`. A mode whose measured steps took
    `args.budget_s` stops at the end of a round, every mode once `args.deadline_s` have passed since
    `t_start`; `tick()` after each round (progress lines, partial saves)."""

    def past_deadline() -> bool:
        late = bool(args.deadline_s) and time.perf_counter() - t_start >= args.deadline_s
        for mode in modes:
            if late and mode not in prog.stopped:
                prog.stopped[mode] = (f"--deadline-s {args.deadline_s:g} reached after {prog.pairs(mode)} of "
                                      f"{args.steps} pairs")
                print(f"!! [{mode}] stopped: {prog.stopped[mode]}", flush=True)
        return late

    warm = list(range(args.warmup))
    parallel = args.mode != "eager"
    for mode in modes:
        print(f"[{mode}] warm-up: {len(warm)} steps per arm{' (they compile)' if mode == 'compiled' else ''}", flush=True)
        t0 = time.perf_counter()
        if parallel:
            for a in arms.values():
                a.send("run", mode, warm)
            done = [a.recv() for a in arms.values()]
        else:
            done = [a.run(mode, warm) for a in arms.values()]
        for name, d in zip(arms, done):
            prog.compiled[mode].update(d["compiled"])
            _say_limits(mode, name, d)
        dt = time.perf_counter() - t0
        prog.phases[f"warmup_{mode}_s"] = dt
        print(f"[{mode}] warm-up done in {dt:.0f} s", flush=True)
        if past_deadline():
            break
    for a in arms.values():
        a.mark("after_warmup")
    if len(prog.stopped) == len(modes):
        return
    t0 = time.perf_counter()
    for r, start in enumerate(range(args.warmup, total, args.block)):
        idxs = list(range(start, min(start + args.block, total)))
        for mode in modes if r % 2 == 0 else modes[::-1]:
            if mode in prog.stopped:
                continue
            if args.budget_s and prog.spent[mode] >= args.budget_s:
                prog.stopped[mode] = (f"--budget-s {args.budget_s:g} spent ({prog.spent[mode]:.0f} s) after "
                                      f"{prog.pairs(mode)} of {args.steps} pairs")
                print(f"!! [{mode}] stopped: {prog.stopped[mode]}", flush=True)
                continue
            t1 = time.perf_counter()
            for name in ARMS if r % 2 == 0 else ARMS[::-1]:  # ABBA: neither arm always runs first
                d = arms[name].run(mode, idxs)
                prog.times[mode][name] += d["times"]
                if d["compiled"]:
                    print(f"!! [{mode}] the {name} arm compiled or recompiled in measured step(s) {d['compiled']}: "
                          "the measured steps are not one compiled graph set (this run will fail)", flush=True)
                prog.compiled[mode].update(d["compiled"])
                _say_limits(mode, name, d)
            prog.spent[mode] += time.perf_counter() - t1
        prog.phases["measured_s"] = time.perf_counter() - t0
        tick()
        if past_deadline() or len(prog.stopped) == len(modes):
            break


def figure(traced: np.ndarray, plain: np.ndarray, summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(1e3 * plain, ".", ms=3, label="without tracer")
    a.plot(1e3 * traced, ".", ms=3, label="with tracer")
    a.set_xlabel("measured step (pairs in order)")
    a.set_ylabel("step time (ms)")
    a.legend()
    d = 100 * (traced - plain) / plain.mean()
    b.hist(d, bins=min(40, max(5, len(d) // 4)), color="gray")
    b.axvline(summary["overhead_pct"], color="k", label=f"mean {summary['overhead_pct']:+.2f} %")
    lo, hi = summary["overhead_ci95_pct"]
    b.axvspan(lo, hi, color="C1", alpha=0.3, label=f"95 % CI [{lo:+.2f}, {hi:+.2f}] %")
    b.set_xlabel("paired difference (% of mean plain step)")
    b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="workload config (default: cpu-demo on cpu, gpt3-small-moe on cuda)")
    ap.add_argument("--mode", default=None, choices=["eager", "compiled", "both"], help="default: eager")
    ap.add_argument("--compile", action="store_true", help="same as --mode compiled")
    ap.add_argument("--steps", type=int, default=60, help="measured steps per arm (and mode)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps per arm first (they compile)")
    ap.add_argument("--block", type=int, default=1, help="steps of one arm before switching to the other")
    ap.add_argument("--flush-every", type=int, default=100)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--hook-rounds", type=int, default=30, help="rounds of the per-gate-forward hook timing (eager)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts", default="auto", choices=["auto", "loop", "grouped"],
                    help="MoE FFN: the workload's per-expert loop, or train_long's GroupedMoE (static shapes); "
                         "auto: grouped where a mode compiles, else loop")
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="router capacity factor (default: the config's; for grouped experts without one, 1.25)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: same dynamo, quick, for tests)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="seconds of measured steps per mode; a mode over it stops (0: no limit)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="seconds since the start after which every mode stops measuring (0: none); then the "
                         "tracers close and counts are checked (allow ~30 s before a hard limit)")
    ap.add_argument("--save-every", type=float, default=30.0, help="seconds between progress lines and partial JSON saves")
    ap.add_argument("--out", default="docs/figures/")
    args = ap.parse_args(argv)
    if args.compile and args.mode not in (None, "compiled"):
        ap.error(f"--compile with --mode {args.mode}: give one of them")
    args.mode = "compiled" if args.compile else (args.mode or "eager")
    if args.experts == "auto":
        args.experts = "loop" if args.mode == "eager" else "grouped"
    bad = [f"{k} {v}" for k, v in (("--steps", args.steps), ("--block", args.block), ("--save-every", args.save_every))
           if v <= 0] + [f"{k} {v}" for k, v in (("--warmup", args.warmup), ("--budget-s", args.budget_s),
                                                                        ("--deadline-s", args.deadline_s)) if v < 0]
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        bad.append(f"--capacity-factor {args.capacity_factor}")
    if bad:
        ap.error(f"{', '.join(bad)}: out of range (steps, block, save-every > 0; warmup, budget-s, deadline-s >= 0; "
                 "capacity factor > 0)")
    return args


class Interrupted(Exception):
    pass


def _interrupt(signum, frame):  # SIGTERM (timeout, a scheduler) -> the partial result is written
    raise Interrupted(f"killed by signal {signum}")


def _save(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def compose(args, cfg, modes: list[str], prog: Progress, done: dict | None, dev_name: str, wall: float,
            error: str | None) -> dict:
    """The result so far: per mode the paired summary, and with `done` (the arms' finish reports) the count
    checks, hook timing and dynamo statistics; "failed" lists count, compile and recompile failures."""
    hooks = done["traced"]["hook_timing"] if done else None
    per_mode, failures = {}, []
    for mode in modes:
        n = prog.pairs(mode)
        traced, plain = (np.asarray(prog.times[mode][a][:n]) for a in ("traced", "plain"))
        s = summarize(traced, plain) if n >= 2 else {"n_pairs": n}
        if mode == "eager" and hooks is not None and n >= 2:
            s["hook_us_per_gate_forward"] = hooks["hook_us"]
            s["hook_estimate_pct"] = float(
                100 * hooks["hook_us"] * 1e-6 * len(cfg.moe_layers) * args.micro_batches / s["plain_median_s"])
        # steps in which either arm compiled: their pairs hold compile time, so the steady state leaves them out
        hot = sorted(j for j in prog.compiled[mode] if j >= args.warmup)
        keep = np.ones(n, bool)
        keep[[j - args.warmup for j in hot if j - args.warmup < n]] = False
        if hot and keep.sum() > 1:
            s["steady"] = {"pairs_left_out": int(n - keep.sum()), "steps_left_out": hot,
                           **summarize(traced[keep], plain[keep])}
        if hot:
            failures.append(f"{mode}: dynamo compiled or recompiled in {len(hot)} measured steps (first: {hot[:5]}); "
                            "the measured steps must all run the graphs compiled in the warm-up")
        check = done["traced"]["checks"][mode] if done else None
        failures += [f"{mode}: {f}" for f in check or []]
        per_mode[mode] = {"summary": s, "counts_exact": None if check is None else not check,
                          "count_check_failures": check, "compiled_steps_measured": hot,
                          "trace_bytes": done["traced"]["trace_bytes"][mode] if done else None,
                          "traced_s": traced.tolist(), "plain_s": plain.tolist()}
    dynamo = {name: d["dynamo"] for name, d in done.items()} if done and "compiled" in modes else None
    for name, d in (dynamo or {}).items():
        w, e = d["at"]["after_warmup"], d["at"]["end"]
        if e["recompiles"] > w["recompiles"]:
            failures.append(f"compiled: {e['recompiles'] - w['recompiles']} recompiles in the {name} worker while measured: "
                            + "; ".join(d["recompile_reasons"]["measured"][:2]))
        failures += [f"compiled: {name} worker: {hit}" for hit in d["recompile_limit_hits"]]
    complete = error is None and not prog.stopped and done is not None
    result = {
        "complete": complete,
        "stopped": dict(prog.stopped),
        "error": error,
        "config": cfg.name,
        "device": args.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "expert_ffn": args.experts,
        "capacity_factor": cfg.capacity_factor,
        "backend": args.backend if "compiled" in modes else None,
        "arms_in": "this process" if args.mode == "eager" else "one worker process per arm",
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "budget_s": args.budget_s,
        "deadline_s": args.deadline_s,
        "flush_every": args.flush_every,
        "micro_batches": args.micro_batches,
        "tokens_per_step": cfg.tokens_per_batch * args.micro_batches,
        "moe_layers": len(cfg.moe_layers),
        "experts": cfg.n_experts,
        **prog.phases,
        "mode_s": dict(prog.spent),
        "wall_s": wall,
        "hook_timing": hooks,
        "dynamo": dynamo,
        "modes": per_mode,
    }
    if args.mode == "eager":  # the keys of earlier runs' files
        m = per_mode["eager"]
        result.update(trace_bytes=m["trace_bytes"], summary=m["summary"], traced_s=m["traced_s"], plain_s=m["plain_s"])
    if failures:
        result["failed"] = failures
    return result


def say_progress(prog: Progress, modes: list[str], args, t_start: float) -> None:
    for mode in modes:
        n = prog.pairs(mode)
        tail = ""
        if n >= 2:
            s = summarize(*(np.asarray(prog.times[mode][a][:n]) for a in ("traced", "plain")))
            lo, hi = s["overhead_ci95_pct"]
            tail = f": {s['overhead_pct']:+.2f} % (95 % CI {lo:+.2f} .. {hi:+.2f})"
        eta = f", ~{prog.spent[mode] / n * (args.steps - n):.0f} s to go" if n and mode not in prog.stopped else ""
        print(f"[{mode}] {n}/{args.steps} pairs in {prog.spent[mode]:.0f} s{eta}{tail}; "
              f"{time.perf_counter() - t_start:.0f} s since start", flush=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    from moeload.errors import InputError

    try:
        cfg, device = setup(args)
    except InputError as e:  # one line, exit code 2 (as argparse)
        print(f"tracer_overhead: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    modes = ["eager", "compiled"] if args.mode == "both" else [args.mode]
    total = args.warmup + args.steps
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    stem = f"tracer_overhead_{cfg.name}_{args.device}" + ("" if args.mode == "eager" else f"_{args.mode}")
    json_path = out_dir / f"{stem}.json"
    print(f"config {cfg.name}, device {args.device} ({dev_name}), torch {torch.__version__}, mode {args.mode}, experts "
          f"{args.experts} (capacity factor {cfg.capacity_factor}), {args.steps} pairs per mode in blocks of {args.block}, "
          f"warm-up {args.warmup}, budget {args.budget_s or 'none'} s per mode, deadline {args.deadline_s or 'none'} s; "
          f"partial results in {json_path}", flush=True)
    prog = Progress(modes)
    t_start = time.perf_counter()
    last_save = [t_start]
    done, error = None, None

    def tick() -> None:
        if time.perf_counter() - last_save[0] >= args.save_every:
            last_save[0] = time.perf_counter()
            say_progress(prog, modes, args, t_start)
            _save(json_path, compose(args, cfg, modes, prog, None, dev_name, last_save[0] - t_start, None))

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.mode == "eager":  # both arms in this process
                arms: dict = {name: Arm(name, args, cfg, device, modes, tmp) for name in ARMS}
                checksums = {name: a.checksum for name, a in arms.items()}
            else:  # one worker process per arm
                arms = {name: RemoteArm(name, argv, modes, tmp) for name in ARMS}
                checksums = {name: a.recv() for name, a in arms.items()}
            if len(set(checksums.values())) != 1:
                raise SystemExit(f"the arms' batches differ (token sums {checksums})")
            prog.phases["setup_s"] = time.perf_counter() - t_start
            interleave(arms, modes, args, total, prog, tick, t_start)
            wall = time.perf_counter() - t_start
            print(f"measured in {wall:.0f} s; closing the tracers, checking counts{', timing the hook' if 'eager' in modes else ''}",
                  flush=True)
            done = {name: a.finish() for name, a in arms.items()}
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        error = f"{type(e).__name__}: {e}"
        wall = time.perf_counter() - t_start
        _save(json_path, compose(args, cfg, modes, prog, None, dev_name, wall, error))
        say_progress(prog, modes, args, t_start)
        raise SystemExit(f"stopped: {error}\n  what was measured: {json_path} (\"complete\": false)") from e
    finally:
        signal.signal(signal.SIGTERM, previous)

    result = compose(args, cfg, modes, prog, done, dev_name, wall, None)
    _save(json_path, result)
    report(result, modes, args, cfg, total, out_dir, stem)
    return result


def report(result: dict, modes: list[str], args, cfg, total: int, out_dir: Path, stem: str) -> None:
    """The figure of the last mode and the printed summary."""
    per_mode, hooks = result["modes"], result["hook_timing"]
    s0 = per_mode[modes[-1]]["summary"]
    if s0["n_pairs"] >= 2:
        title = (f"LoadTracer overhead, {cfg.name} on {result['device_name']}, {modes[-1]}, flush_every={args.flush_every}: "
                 f"{s0['overhead_pct']:+.2f} % (95 % CI {s0['overhead_ci95_pct'][0]:+.2f} .. {s0['overhead_ci95_pct'][1]:+.2f})")
        figure(np.asarray(per_mode[modes[-1]]["traced_s"]), np.asarray(per_mode[modes[-1]]["plain_s"]), s0, title,
               out_dir / f"{stem}.png")
    print(f"config {cfg.name}, device {args.device} ({result['device_name']}), torch {torch.__version__}, mode {args.mode} "
          f"(arms in {result['arms_in']}), experts {args.experts}, flush_every {args.flush_every}")
    spent = {k.removesuffix("_s").replace("_", " "): v for k, v in result.items()
             if k.endswith("_s") and k not in ("wall_s", "budget_s", "deadline_s") and isinstance(v, float)}
    print("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in {**spent, "all": result["wall_s"]}.items()))
    for mode in modes:
        s = per_mode[mode]["summary"]
        print(f" {mode}: {s['n_pairs']} step pairs" + (f" (stopped: {result['stopped'][mode]})" if mode in result["stopped"] else ""))
        if s["n_pairs"] < 2:
            continue
        print(f"  without tracer: mean {1e3 * s['plain_mean_s']:.2f} ms, median {1e3 * s['plain_median_s']:.2f} ms")
        print(f"  with tracer:    mean {1e3 * s['traced_mean_s']:.2f} ms, median {1e3 * s['traced_median_s']:.2f} ms")
        print(f"  overhead: {s['overhead_pct']:+.2f} % (95 % CI {s['overhead_ci95_pct'][0]:+.2f} .. "
              f"{s['overhead_ci95_pct'][1]:+.2f} %), medians {s['overhead_median_pct']:+.2f} %")
        if "steady" in s:
            st = s["steady"]
            print(f"  without the {st['pairs_left_out']} pairs in which an arm compiled (steps {st['steps_left_out'][:6]}"
                  f"{' ...' if len(st['steps_left_out']) > 6 else ''}): {st['overhead_pct']:+.2f} % (95 % CI "
                  f"{st['overhead_ci95_pct'][0]:+.2f} .. {st['overhead_ci95_pct'][1]:+.2f} %), medians "
                  f"{st['overhead_median_pct']:+.2f} %, plain median {1e3 * st['plain_median_s']:.2f} ms")
        steps_run = args.warmup + s["n_pairs"]
        print(f"  counts exact: {'yes' if per_mode[mode]['counts_exact'] else 'NO'} "
              f"({steps_run} steps x {len(cfg.moe_layers)} layers: tokens = {result['tokens_per_step']}, "
              f"sum of counts = tokens x top_k {cfg.top_k})")
        if mode == "eager" and hooks is not None:
            print(f"  hook: {hooks['hook_us']:.1f} us per gate forward (router forward {hooks['router_forward_us']:.1f} us) "
                  f"x {len(cfg.moe_layers)} MoE layers = {s['hook_estimate_pct']:.3f} % of a median plain step")
    if result["dynamo"] is not None:
        for name, d in result["dynamo"].items():
            w, e = d["at"]["after_warmup"], d["at"]["end"]
            print(f" dynamo, {name} worker: {w['graphs']} graphs, {w['graph_breaks']} graph breaks, {w['recompiles']} "
                  f"recompiles in the warm-up; {e['graphs'] - w['graphs']} graphs, {e['graph_breaks'] - w['graph_breaks']} "
                  f"graph breaks, {e['recompiles'] - w['recompiles']} recompiles while measured; "
                  f"{e['recompile_limit_hits']} frames hit the recompile limit (run eager from then on)")
            for reason, n in d["graph_break_reasons"].items():
                print(f"    graph break x{n}: {reason}")
            for hit in d["recompile_limit_hits"]:
                print(f"    {hit}")
            for phase, reasons in d["recompile_reasons"].items():
                for reason in reasons:
                    print(f"    recompile ({phase}): {reason}")
    print(f"  wrote {out_dir / stem}.json and .png")
    if result.get("failed"):
        print("!" * 72 + "\nFAILED: counts not exact, or dynamo compiled while measured\n" +
              "\n".join(f"  {f}" for f in result["failed"]) + "\n" + "!" * 72, flush=True)
    if not result["complete"]:
        print("INCOMPLETE: " + "; ".join(f"{m}: {r}" for m, r in result["stopped"].items()), flush=True)


def exit_code(result: dict) -> int:
    """1: a check failed; 3: nothing failed but a mode stopped before --steps pairs; 0: complete."""
    return 1 if result.get("failed") else 0 if result["complete"] else 3


if __name__ == "__main__":
    sys.exit(exit_code(main()))
