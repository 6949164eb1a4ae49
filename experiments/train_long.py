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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeload.tracing import LoadTracer
from moeload.workloads.configs import WorkloadConfig
from moeload.workloads.corpus import load_corpus, split
from moeload.workloads.model import BiasRouter, Experts, MoEGPT, TopKRouter, expert_capacity, slot_positions

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


class GroupedMoE(nn.Module):
    """Router + stacked experts run as batched GEMMs over an ``[E, capacity, H]`` dispatch buffer.

    Route ``(t, j)`` of a kept token goes to slot ``indices[t, j] * C + position`` (GShard order, as
    the router's ``kept``); dropped routes point at one extra zero row, so they add nothing.
    """

    def __init__(self, router: TopKRouter, experts: Experts) -> None:
        super().__init__()
        self.router = router
        self.experts = experts

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: [B, S, H]`` -> (``y: [B, S, H]``, ``aux_loss: []``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        r = self.router(flat)
        T, H = flat.shape
        E, k = self.router.num_experts, self.router.top_k
        C = expert_capacity(T, k, E, self.router.capacity_factor)
        pos = slot_positions(r.indices, E)  # [T, k]
        trash = E * C
        slot = torch.where(r.kept, r.indices * C + pos, trash)  # [T, k]
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
    """MoEGPT initialised from ``seed`` with every MoE FFN a `GroupedMoE` (same weights as the original)."""
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
    """Mean LM loss (nats per byte) over ``n_batches`` fixed validation windows (eval mode: not traced, no bias update)."""
    _, data = split(load_corpus(), cfg.val_fraction)
    rng = np.random.default_rng(12345)
    model.eval()
    total = 0.0
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
    ap.add_argument("--config", choices=["small", "medium"], default="small")
    ap.add_argument("--tiny", action="store_true", help="2 layers (both MoE), 4 experts, d 64: CPU tests")
    ap.add_argument("--balance", choices=["aux", "bias"], default="aux")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (64 x 512 = 32,768 tokens)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default: small 6e-4, medium 3e-4)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--expert-ff", type=int, default=None, help="expert FFN width (default: small 3072, medium 512)")
    ap.add_argument("--out", required=True, help="run directory; must not exist")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (tracer attached first)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--summary-every", type=int, default=500)
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: warn about every host sync in steps 3-9 (torch.cuda.set_sync_debug_mode)")
    a = ap.parse_args(argv)
    if a.steps < 1 or not 0 < a.warmup < a.steps:
        ap.error(f"--steps {a.steps} --warmup {a.warmup}: need 0 < warmup < steps")
    if Path(a.out).exists():
        ap.error(f"--out {a.out}: already exists; a new run must not append to another run's trace")
    return a


def _terminate(signum, frame):  # SIGTERM -> the finally blocks run: tracer flushed, summary written
    raise SystemExit(f"killed by signal {signum}")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    shape = "tiny" if a.tiny else a.config
    cfg = make_config(shape, a.balance, a.seq_len, a.batch, a.lr, a.expert_ff, a.warmup, a.steps)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(a.out)
    out.mkdir(parents=True)
    signal.signal(signal.SIGTERM, _terminate)

    model = build_model(cfg, a.balance, a.seed, device)
    model.train()
    routers = list(model.routers().values())
    bias_routers = [r for r in routers if isinstance(r, BiasRouter)]
    opt, sched = make_optimizer(model, cfg, a.steps, fused=cuda)
    data = batch_stream(cfg, a.seed, device)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    run = f"{cfg.name} {a.balance} s{a.seed}"
    provenance = {
        "experiment": "train_long", "run": run, "argv": sys.argv if argv is None else argv, "args": vars(a),
        "config": dataclasses.asdict(cfg), "balance": a.balance, "bias_update": BIAS_UPDATE if a.balance == "bias" else None,
        "capacity_factor": CAPACITY_FACTOR, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "tokens_per_step": tokens_per_step,
    }
    tracer = LoadTracer(model, out / "trace.moeload", flush_every=100,
                        model_name=f"{cfg.name} ({a.balance} balancing, grouped experts, seed {a.seed})",
                        tokens_per_step=tokens_per_step, extra=provenance)
    tracer.start()
    fwd = torch.compile(model) if a.compile else model  # after the tracer's hooks are installed
    print(f"[{run}] {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(routers)} MoE layers, "
          f"{tokens_per_step} tokens/step, {a.steps} steps, device {provenance['gpu']}", flush=True)

    history = torch.zeros(a.steps, 3, device=device)  # loss, lm, aux
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
                "lr_last": sched.get_last_lr()[0], "tracer_errors": list(tracer.errors)}

    def snapshot(step: int) -> None:
        snaps.append(torch.stack([r.expert_bias for r in bias_routers]).float().cpu().numpy())
        snap_steps.append(step)
        tmp = out / "router_bias.tmp.npz"
        np.savez(tmp, bias=np.stack(snaps), after_step=np.asarray(snap_steps, np.int64), layers=np.asarray(tracer.layers))
        os.replace(tmp, out / "router_bias.npz")

    try:
        for step in range(a.steps):
            if a.sync_debug and cuda and step in (2, 9):
                torch.cuda.set_sync_debug_mode("warn" if step == 2 else "default")
            x, y = next(data)
            with amp:
                o = fwd(x, y)
            o.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for r in bias_routers:
                r.update_bias()
            tracer.step()
            history[step] = torch.stack([o.loss.detach(), o.lm_loss.detach(), o.aux_loss.detach()])
            state["done"] = step + 1
            n = step + 1
            if bias_routers and (n % 100 == 0 or n == a.steps):
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
        if cuda:
            torch.cuda.synchronize(device)
        state["train_s"] = time.perf_counter() - t0  # the summary's seconds count training only
        state["val"] = val_loss(model, cfg, device, amp)
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
