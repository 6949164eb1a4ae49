"""The two arms: `Arm` (models, steps and tracers of one arm in this process) and `RemoteArm` (an
Arm in a spawned worker process, with its own dynamo cache)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import traceback
import warnings
from pathlib import Path

import torch

from .counts import check_counts
from .dynamo_log import DynamoLog, brief
from .options import parse
from .timing import hook_cost, timed
from .workload import build, make_step, setup

ARMS = ("traced", "plain")


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
        hits = [brief(m) for m in self.dynamo.limits[limits:]] if self.dynamo is not None else []
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
