"""Long single-GPU runs of the embedded MoE GPT with grouped expert GEMMs, traced by moeload.

    python experiments/train_long.py --config small --balance aux --seed 0 --steps 10000 \
        --out runs/small-aux-s0 --device cuda
    bash experiments/run_long.sh runs/small-aux-s0 --config small --balance aux --seed 0 --steps 10000

One process, one device. The model is `moeload.workloads.MoEGPT` (byte vocabulary, stdlib corpus)
with each MoE FFN replaced by `GroupedMoE`: routes are dispatched to an ``[E, capacity, H]`` buffer
(capacity factor 1.25, GShard queue order, overflow dropped) and the experts run as two batched
GEMMs (``torch.baddbmm``), so a layer is a few large kernels and never syncs with the host.
bf16 autocast on CUDA, fused AdamW, linear warmup then cosine to 10 % of the peak over exactly
``--steps``. Balancing (``--balance``):

``aux``   Switch/GShard loss ``E * sum_e f_e * P_e`` per MoE layer, coefficient 0.01.
``bias``  aux-loss-free (DeepSeek-V3): experts are selected by ``scores + expert_bias``, gating
          weights come from the unbiased scores, and after every optimizer step
          ``bias_e += u * sign(mean_load - load_e)`` with ``u = 1e-3``; no aux loss (it is computed
          and logged only).

``--out DIR`` (must not exist) receives ``trace.moeload`` (LoadTracer, flush_every 100),
``summary.json`` (rewritten every 500 steps with ``"status": "running"``, at the end ``"done"``, or
the error that stopped the run) and, for ``bias``, ``router_bias.npz``: ``bias [N, L, E]`` float32
snapshots every 100 steps, ``after_step [N]`` (0-based step whose update was the last applied) and
``layers [L]`` (trace layer names). Progress goes to stdout every 100 steps.

Speed (issue 16). Routers, queue positions and capacity drops are moeload's (`slot_positions` is one
flat cumsum since 2026-12-04; before, a cumsum down the rows of a ``[2T, E]`` one-hot ran on CUDA as
one thread per expert and cost more than half of each step). ``--compile`` (default on CUDA where
triton is installed) compiles each block with ``Module.compile()`` after the tracer attached; the
router and its tracer hook always run eagerly (`route`). ``--bench N`` times N steps after
``--bench-warmup`` steps for each of ``--bench-modes`` (default eager, compile) in one process and
prints steps/s, tokens/s and how many leading steps of each mode's trace equal the first mode's:

    PYTHONPATH=$PWD python3 experiments/train_long.py --config small --bench 90 --out /tmp/b
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters

from moeload import open_trace
from moeload.tracing import LoadTracer
from moeload.workloads.configs import WorkloadConfig
from moeload.workloads.corpus import load_corpus, split
from moeload.workloads.model import (
    BiasRouter,
    Experts,
    MoEGPT,
    RouterOutput,
    TopKRouter,
    expert_capacity,
    slot_positions,
)

CAPACITY_FACTOR = 1.25
BIAS_UPDATE = 1e-3
SHAPES = {
    "small": dict(name="gpt3-small-moe", n_layers=12, d_model=768, n_heads=12, n_experts=16, moe_every=2,
                  expert_d_ff=3072, lr=6e-4),
    "medium": dict(name="gpt3-medium-moe", n_layers=24, d_model=1024, n_heads=16, n_experts=128, moe_every=2,
                   expert_d_ff=512, lr=3e-4),
    "tiny": dict(name="tiny", n_layers=2, d_model=64, n_heads=4, n_experts=4, moe_every=1, expert_d_ff=128,
                 lr=3e-3),
}
BENCH_MODES = ("eager", "compile")
"""eager: the model as built; compile: its blocks compiled (routers and hooks eager)."""


@torch.compiler.disable
def route(router: nn.Module, positions: Callable[[Tensor, int], Tensor], flat: Tensor, capacity: int
          ) -> tuple[RouterOutput, Tensor]:
    """``router(flat)`` and the dispatch slot of every route, ``[T, k]`` int64 (``E * capacity`` = dropped),
    always eager: dynamo cannot trace ``torch._C._current_graph_task_id()`` (the tracer's hook and
    `BiasRouter` call it), and the hook must run for every training forward."""
    r = router(flat)
    pos = positions(r.indices, router.num_experts)  # [T, k]
    return r, torch.where(r.kept, r.indices * capacity + pos, router.num_experts * capacity)


class GroupedMoE(nn.Module):
    """Router + stacked experts run as batched GEMMs over an ``[E, capacity, H]`` dispatch buffer.

    Route ``(t, j)`` of a kept token goes to slot ``indices[t, j] * C + position`` (GShard order, as
    the router's ``kept``); dropped routes point at one extra zero row, so they add nothing.
    ``positions``: the queue position of each route, moeload's `slot_positions` (the router's own order).
    """

    def __init__(self, router: TopKRouter, experts: Experts,
                 positions: Callable[[Tensor, int], Tensor] = slot_positions) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.positions = positions

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: [B, S, H]`` -> (``y: [B, S, H]``, ``aux_loss: []``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        T, H = flat.shape
        E, k = self.router.num_experts, self.router.top_k
        C = expert_capacity(T, k, E, self.router.capacity_factor)
        r, slot = route(self.router, self.positions, flat, C)  # [T, k]
        trash = E * C
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            flat = flat.to(torch.bfloat16)  # the dispatch moves bf16 rows, as the GEMMs read them
        token_of_slot = torch.full((E * C + 1,), T, dtype=torch.long, device=x.device)
        token_ids = torch.arange(T, device=x.device)[:, None].expand(T, k)
        token_of_slot.scatter_(0, slot.reshape(-1), token_ids.reshape(-1))  # [E*C + 1], T = empty slot
        padded = torch.cat([flat, flat.new_zeros(1, H)])  # [T + 1, H]
        xin = padded.index_select(0, token_of_slot[:trash]).view(E, C, H)  # backward: one index_add_
        ex = self.experts
        h = F.gelu(torch.baddbmm(ex.b1[:, None, :], xin, ex.w1))  # [E, C, F]
        y = torch.baddbmm(ex.b2[:, None, :], h, ex.w2)  # [E, C, H]
        y = torch.cat([y.reshape(E * C, H), y.new_zeros(1, H)])  # [E*C + 1, H]
        picked = y.index_select(0, slot.reshape(-1)).view(T, k, H)
        out = (picked * r.weights.to(y.dtype)[..., None]).sum(1)  # [T, H]
        return out.view(shape), r.aux_loss


def make_config(shape: str, balance: str, seq_len: int, batch: int, lr: float | None, expert_ff: int | None,
                warmup: int, steps: int) -> WorkloadConfig:
    s = dict(SHAPES[shape])
    if expert_ff:
        s["expert_d_ff"] = expert_ff
    if lr is not None:
        s["lr"] = lr
    return WorkloadConfig(**s, top_k=2, capacity_factor=CAPACITY_FACTOR, seq_len=seq_len, batch_size=batch,
                          warmup_steps=warmup, decay_steps=steps - warmup, aux_coef=0.01 if balance == "aux" else 0.0,
                          amp=True)


def build_model(cfg: WorkloadConfig, balance: str, seed: int, device: torch.device) -> MoEGPT:
    """MoEGPT initialised from ``seed`` with every MoE FFN a `GroupedMoE` (same weights as the original);
    for ``bias``, moeload's `BiasRouter` (DeepSeek-V3 update) on the same gate."""
    torch.manual_seed(seed)
    model = MoEGPT(cfg)
    for block in model.blocks:
        old = getattr(block, "moe", None)
        if old is None:
            continue
        router = old.router
        if balance == "bias":
            router = BiasRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.capacity_factor, BIAS_UPDATE)
            router.gate = old.router.gate
        block.moe = GroupedMoE(router, old.experts)
    return model.to(device)


def compile_blocks(model: MoEGPT) -> None:
    """``Module.compile()`` each block in place (module names unchanged); the routers stay eager (`route`).
    Call after the tracer attached. A frame that fails to compile runs eagerly (dynamo's suppress_errors,
    a warning): the counts stay exact, only the speed is lost (see ``compiled_graphs`` in the summary)."""
    torch._dynamo.config.suppress_errors = True
    for block in model.blocks:
        block.compile(dynamic=False)


def make_optimizer(model: nn.Module, cfg: WorkloadConfig, steps: int, fused: bool):
    """AdamW (no decay on biases, norms), warmup then cosine reaching ``min_lr_ratio`` at the last step."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, fused=fused)
    w, last = cfg.warmup_steps, steps - 1

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        t = min((step - w) / max(last - w, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batch_stream(cfg: WorkloadConfig, seed: int, device: torch.device):
    """Endless ``(x: [B, S], y: [B, S])`` int64 random windows of the train split, copied without a host sync."""
    data, _ = split(load_corpus(), cfg.val_fraction)
    rng = np.random.default_rng(seed)
    offs = np.arange(cfg.seq_len + 1)
    pin = device.type == "cuda"
    while True:
        starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
        w = torch.from_numpy(data[starts[:, None] + offs])  # [B, S + 1] uint8
        w = w.pin_memory().to(device, non_blocking=True).long() if pin else w.long()
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def val_loss(model: MoEGPT, cfg: WorkloadConfig, device: torch.device, amp, n_batches: int = 8) -> float:
    """Mean LM loss (nats per byte) over ``n_batches`` fixed validation windows (eval mode: not traced, no bias
    update; compiled blocks run eagerly, so eval mode compiles nothing)."""
    _, data = split(load_corpus(), cfg.val_fraction)
    rng = np.random.default_rng(12345)
    model.eval()
    total = 0.0
    with torch.compiler.set_stance("force_eager"):
        for _ in range(n_batches):
            starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch_size)
            w = torch.from_numpy(data[starts[:, None] + np.arange(cfg.seq_len + 1)]).to(device).long()
            with amp:
                total += float(model(w[:, :-1], w[:, 1:]).lm_loss)
    model.train()
    return total / n_batches


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "medium", "tiny"], default="small")
    ap.add_argument("--tiny", action="store_true", help="= --config tiny: 2 layers (both MoE), 4 experts, d 64 (CPU tests)")
    ap.add_argument("--balance", choices=["aux", "bias"], default="aux")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="steps of the run and its LR schedule (required without "
                    "--bench; with it, default 10000: the bench trains the first steps of that schedule)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (64 x 512 = 32,768 tokens)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: small 6e-4, medium 3e-4)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--expert-ff", type=int, default=None, help="expert FFN width (default: small 3072, medium 512)")
    ap.add_argument("--out", required=True, help="run directory; must not exist")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile each block after the tracer attached (routers stay eager); default: on for CUDA "
                         "where triton is installed, off on CPU")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--summary-every", type=int, default=500)
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: warn about every host sync in steps 3-9 (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--bench", type=int, default=None, metavar="N",
                    help="time N steps after --bench-warmup steps for each of --bench-modes; writes OUT/<mode>/trace.moeload "
                         "and OUT/bench.json, no summary or validation")
    ap.add_argument("--bench-warmup", type=int, default=10, help="untimed steps before the N (compile happens here)")
    ap.add_argument("--bench-modes", default=",".join(BENCH_MODES),
                    help=f"comma-separated, from {', '.join(BENCH_MODES)} (keep compile last: a tracer attached after "
                         "compiled code ran resets dynamo)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.config = "tiny"
    if a.bench is not None:
        modes = a.bench_modes.split(",")
        if a.bench < 1 or a.bench_warmup < 0 or not modes or any(m not in BENCH_MODES for m in modes):
            ap.error(f"--bench {a.bench} --bench-warmup {a.bench_warmup} --bench-modes {a.bench_modes}: need N >= 1, "
                     f"warm-up >= 0, modes from {', '.join(BENCH_MODES)}")
        a.bench_modes = modes
        a.steps = 10000 if a.steps is None else a.steps
        if a.steps < a.bench + a.bench_warmup:
            ap.error(f"--steps {a.steps}: the bench trains {a.bench_warmup} + {a.bench} steps of the schedule")
    if a.steps is None:
        ap.error("--steps is required (unless --bench)")
    if a.steps < 1 or not 0 < a.warmup < a.steps:
        ap.error(f"--steps {a.steps} --warmup {a.warmup}: need 0 < warmup < steps")
    if Path(a.out).exists():
        ap.error(f"--out {a.out}: already exists; a new run must not append to another run's trace")
    return a


def _terminate(signum, frame):  # SIGTERM -> the finally blocks run: tracer flushed, summary written
    raise SystemExit(f"killed by signal {signum}")


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def default_compile(device: torch.device) -> bool:
    """On for CUDA where triton (inductor's GPU code generator) is installed, else off."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


class Trainer:
    """One traced run: model, fused AdamW + schedule, data, tracer; `step()` trains one optimizer step and
    keeps ``history [steps, 3]`` (loss, lm, aux) on the device (no host sync)."""

    def __init__(self, a: argparse.Namespace, cfg: WorkloadConfig, device: torch.device, trace: Path,
                 provenance: dict, compile_: bool) -> None:
        cuda = device.type == "cuda"
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg, a.balance, a.seed, device)
        self.model.train()
        self.routers = list(self.model.routers().values())
        self.bias_routers = [r for r in self.routers if isinstance(r, BiasRouter)]
        self.opt, self.sched = make_optimizer(self.model, cfg, a.steps, fused=cuda)
        self.data = batch_stream(cfg, a.seed, device)
        self.amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        self.tracer = LoadTracer(self.model, trace, flush_every=100,
                                 model_name=f"{cfg.name} ({a.balance} balancing, grouped experts, seed {a.seed})",
                                 tokens_per_step=cfg.batch_size * cfg.seq_len, extra=provenance)
        self.tracer.start()
        if compile_:
            compile_blocks(self.model)  # after the tracer's hooks are installed
        self.history = torch.zeros(a.steps, 3, device=device)  # loss, lm, aux

    def step(self, step: int) -> None:
        x, y = next(self.data)
        with self.amp:
            o = self.model(x, y)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        for r in self.bias_routers:
            r.update_bias()
        self.tracer.step()
        self.history[step] = torch.stack([o.loss.detach(), o.lm_loss.detach(), o.aux_loss.detach()])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def provenance_of(a: argparse.Namespace, argv: list[str] | None, cfg: WorkloadConfig, device: torch.device,
                  run: str) -> dict:
    cuda = device.type == "cuda"
    return {
        "experiment": "train_long", "run": run, "argv": sys.argv if argv is None else argv, "args": vars(a),
        "config": dataclasses.asdict(cfg), "balance": a.balance, "bias_update": BIAS_UPDATE if a.balance == "bias" else None,
        "capacity_factor": CAPACITY_FACTOR, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "tokens_per_step": cfg.batch_size * cfg.seq_len,
    }


def leading_equal_steps(a: Path, b: Path) -> int:
    """Number of leading steps whose routed and kept counts are equal in traces a and b."""
    ta, tb = open_trace(a), open_trace(b)
    n = min(len(ta.steps), len(tb.steps))
    same = np.ones(n, bool)
    for kind in ("routed", "kept"):
        same &= (ta.counts(kind=kind)[:n] == tb.counts(kind=kind)[:n]).all(axis=(1, 2))
    return int(n if same.all() else same.argmin())


def bench(a: argparse.Namespace, argv: list[str] | None, cfg: WorkloadConfig, device: torch.device) -> None:
    """For each mode: a fresh traced run (same seed) of warm-up + N steps; prints and writes steps/s, tokens/s."""
    out = Path(a.out)
    out.mkdir(parents=True)
    tokens = cfg.batch_size * cfg.seq_len
    results: dict[str, dict] = {}
    for mode in a.bench_modes:
        run = f"{cfg.name} {a.balance} s{a.seed} bench {mode}"
        torch.compiler.reset()  # this run's tracer attaches before any compiled code runs
        counters.clear()
        t0 = time.perf_counter()
        tr = Trainer(a, cfg, device, out / mode / "trace.moeload", provenance_of(a, argv, cfg, device, run),
                     compile_=mode == "compile")
        try:
            for step in range(a.bench_warmup):
                tr.step(step)
            tr.sync()
            t1 = time.perf_counter()
            for step in range(a.bench_warmup, a.bench_warmup + a.bench):
                tr.step(step)
            tr.sync()
            t2 = time.perf_counter()
            lm = tr.history[a.bench_warmup + a.bench - 1, 1].item()
        finally:
            tr.tracer.close()
        secs = t2 - t1
        results[mode] = {"steps_per_s": a.bench / secs, "tokens_per_s": a.bench * tokens / secs, "timed_steps": a.bench,
                         "timed_s": secs, "warmup_steps": a.bench_warmup, "setup_and_warmup_s": t1 - t0,
                         "lm_loss_last": lm, "tracer_errors": list(tr.tracer.errors),
                         "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                         "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
        first = a.bench_modes[0]
        if mode != first:
            results[mode][f"leading_steps_equal_to_{first}"] = leading_equal_steps(out / first / "trace.moeload",
                                                                                    out / mode / "trace.moeload")
        print(f"[bench {mode}] setup + {a.bench_warmup} warm-up steps {t1 - t0:.1f} s; {a.bench} steps {secs:.2f} s: "
              f"{a.bench / secs:.2f} steps/s, {a.bench * tokens / secs:,.0f} tokens/s, lm loss {lm:.4f}", flush=True)
        del tr
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    report = {"config": cfg.name, "balance": a.balance, "tokens_per_step": tokens, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "modes": results}
    write_json(out / "bench.json", report)
    print(json.dumps({m: {k: v for k, v in r.items() if k not in ("tracer_errors", "warmup_steps", "timed_steps")}
                      for m, r in results.items()}), flush=True)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cfg = make_config(a.config, a.balance, a.seq_len, a.batch, a.lr, a.expert_ff, a.warmup, a.steps)
    device = setup_device(a.device)
    cuda = device.type == "cuda"
    if a.compile is None:
        a.compile = default_compile(device)
    if a.bench is not None:
        bench(a, argv, cfg, device)
        return
    out = Path(a.out)
    out.mkdir(parents=True)
    signal.signal(signal.SIGTERM, _terminate)

    run = f"{cfg.name} {a.balance} s{a.seed}"
    provenance = provenance_of(a, argv, cfg, device, run)
    tr = Trainer(a, cfg, device, out / "trace.moeload", provenance, a.compile)
    model, sched, tracer, history = tr.model, tr.sched, tr.tracer, tr.history
    tokens_per_step = provenance["tokens_per_step"]
    print(f"[{run}] {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(tr.routers)} MoE layers, "
          f"{tokens_per_step} tokens/step, {a.steps} steps, device {provenance['gpu']}"
          f"{', blocks compiled' if a.compile else ''}", flush=True)

    snaps: list[np.ndarray] = []
    snap_steps: list[int] = []
    state = {"done": 0, "status": "running", "val": None}
    rates: list[list[float]] = []  # [step, steps/s over the interval before it]
    t0 = time.perf_counter()
    last = (0, t0)

    def summary() -> dict:
        n = state["done"]
        secs = state.get("train_s") or time.perf_counter() - t0
        h = history[:n].cpu().double().numpy()
        block = [float(h[i : i + 100, 1].mean()) for i in range(0, n, 100)]
        return {**provenance, "status": state["status"], "steps": n, "steps_planned": a.steps, "seconds": secs,
                "steps_per_s": n / secs if secs > 0 else None, "lm_loss_first20": h[:20, 1].tolist(),
                "lm_loss_last20": h[-20:, 1].tolist(), "loss_first20": h[:20, 0].tolist(),
                "loss_last20": h[-20:, 0].tolist(), "aux_last20": h[-20:, 2].tolist(),
                "lm_loss_per_100": block, "val_lm_loss": state["val"], "rates": list(rates),
                "lr_last": sched.get_last_lr()[0], "tracer_errors": list(tracer.errors),
                "compiled_graphs": counters["stats"]["unique_graphs"] if a.compile else None}

    def snapshot(step: int) -> None:
        snaps.append(torch.stack([r.expert_bias for r in tr.bias_routers]).float().cpu().numpy())
        snap_steps.append(step)
        tmp = out / "router_bias.tmp.npz"
        np.savez(tmp, bias=np.stack(snaps), after_step=np.asarray(snap_steps, np.int64), layers=np.asarray(tracer.layers))
        os.replace(tmp, out / "router_bias.npz")

    try:
        for step in range(a.steps):
            if a.sync_debug and cuda and step in (2, 9):
                torch.cuda.set_sync_debug_mode("warn" if step == 2 else "default")
            tr.step(step)
            state["done"] = step + 1
            n = step + 1
            if a.compile and n == 1:
                print(f"[{run}] compiled {counters['stats']['unique_graphs']} graphs, "
                      f"{sum(counters['graph_break'].values())} graph breaks (the eager router calls)", flush=True)
            if tr.bias_routers and (n % 100 == 0 or n == a.steps):
                snapshot(step)
            if n % a.log_every == 0 or n == a.steps:
                loss, lm, aux = history[step].tolist()
                now = time.perf_counter()
                rate = (n - last[0]) / (now - last[1])
                last = (n, now)
                rates.append([n, rate])
                eta = (a.steps - n) / (n / (now - t0))
                print(f"[{run}] step {n}/{a.steps} loss {loss:.4f} lm {lm:.4f} aux {aux:.3f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {rate:.2f} steps/s ETA {eta / 60:.1f} min", flush=True)
            if n % a.summary_every == 0:
                write_json(out / "summary.json", summary())
        tr.sync()
        state["train_s"] = time.perf_counter() - t0  # the summary's seconds count training only
        state["val"] = val_loss(model, cfg, device, tr.amp)
        state["status"] = "done"
        print(f"[{run}] validation lm loss {state['val']:.4f}", flush=True)
    except BaseException as e:
        state["status"] = f"stopped: {type(e).__name__}: {e}"
        raise
    finally:
        tracer.close()
        s = summary()
        write_json(out / "summary.json", s)
        print(json.dumps({k: s[k] for k in ("run", "status", "steps", "seconds", "steps_per_s")}), flush=True)


if __name__ == "__main__":
    main()
