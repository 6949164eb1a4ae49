"""Train the embedded MoE GPT with DeepSpeed MoE layers (expert parallel = all ranks), traced by moeload.

    torchrun --nproc_per_node 2 experiments/train_ds.py --config experiments/gpt3-small-moe/config.json \
        --seed 0 --out runs/gpt3-small-moe-s0.moeload --time-budget 420

Every FFN of an MoE block is a `deepspeed.moe.layer.MoE` with `ep_size = world size`, so each GPU
holds E / world experts and the per-GPU loads in the trace are real. Training stops at
`--max-steps` or when `--time-budget` seconds of training have passed (the LR schedule is laid out
over `--max-steps`). After training, `--overhead-blocks` pairs of `--overhead-steps` steps are run
alternately with and without a second LoadTracer (interleaved, same model, same machine) to measure
the tracer's overhead; the numbers go to `<out>.json`. Also runs on CPU with gloo (`--device cpu`)
at tiny sizes, which is how it is tested before GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moeload.tracing import LoadTracer
from moeload.workloads import batches
from moeload.workloads.configs import WorkloadConfig
from moeload.workloads.model import MoEGPT


class DSMoEFFN(nn.Module):
    """Adapter from DeepSpeed's MoE (returns y, l_aux, exp_counts) to the workload block's (y, aux)."""

    def __init__(self, cfg: WorkloadConfig, ep_size: int, capacity_factor: float, drop_tokens: bool) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        F = cfg.expert_width
        expert = nn.Sequential(nn.Linear(cfg.d_model, F), nn.GELU(), nn.Linear(F, cfg.d_model))
        self.moe = MoE(hidden_size=cfg.d_model, expert=expert, num_experts=cfg.n_experts, ep_size=ep_size,
                       k=cfg.top_k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                       drop_tokens=drop_tokens)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = self.moe(x)
        return y, l_aux


def build(cfg: WorkloadConfig, ds: dict, world: int, seed: int, device: torch.device) -> MoEGPT:
    torch.manual_seed(seed)  # same non-expert weights on every rank
    model = MoEGPT(cfg)
    for block in model.blocks:
        if getattr(block, "moe", None) is not None:
            block.moe = DSMoEFFN(cfg, world, ds.get("capacity_factor", 1.0), ds.get("drop_tokens", True))
    model = model.to(device)
    for m in model.modules():
        if hasattr(m, "set_deepspeed_parallelism"):
            m.set_deepspeed_parallelism()
    rank = dist.get_rank()
    with torch.no_grad():  # different expert weights per rank (each holds other experts)
        g = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank + 1)
        for p in model.parameters():
            if not getattr(p, "allreduce", True):
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return model


def shared_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated on every rank (DeepSpeed marks expert parameters allreduce=False)."""
    return [p for p in model.parameters() if getattr(p, "allreduce", True)]


def allreduce_grads(params: list[nn.Parameter], world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="trace directory (rank 0 writes it)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds of training")
    ap.add_argument("--overhead-blocks", type=int, default=6)
    ap.add_argument("--overhead-steps", type=int, default=50)
    ap.add_argument("--override", action="append", default=[], help="key=value workload override (tests)")
    a = ap.parse_args()

    if Path(a.out).exists():
        raise SystemExit(f"{a.out}: already exists; a new run must not append to another run's trace "
                         "(remove it, or pick another --out)")
    spec = json.loads(Path(a.config).read_text())
    overrides = dict(spec["workload"])
    for kv in a.override:
        k, v = kv.split("=", 1)
        overrides[k] = type(overrides.get(k, 0))(v) if k in overrides else int(v)
    base = overrides.pop("base")
    max_steps = a.max_steps or spec["max_steps"]
    cfg = WorkloadConfig.from_name(base, decay_steps=max_steps, **overrides)
    ds = spec.get("deepspeed", {})

    import deepspeed

    deepspeed.init_distributed("nccl" if a.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    model = build(cfg, ds, world, a.seed, device)
    params = shared_params(model)
    from moeload.workloads.train import make_optimizer

    opt, sched = make_optimizer(model, cfg, max_steps)
    data = batches(cfg, seed=a.seed * 1000 + rank, device=device)

    def train_step() -> torch.Tensor:
        x, y = next(data)
        out = model(x, y)
        out.loss.backward()
        allreduce_grads(params, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return out.lm_loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    name = Path(a.config).parent.name
    tracer = LoadTracer(model, a.out, flush_every=spec.get("flush_every", 100),
                        model_name=f"{name} (DeepSpeed MoE, ep_size={world}, seed {a.seed})",
                        tokens_per_step=cfg.batch_size * cfg.seq_len * world,
                        extra={"experiment": name, "seed": a.seed, "config": spec})
    losses, marks = [], []
    sync()
    t0 = time.perf_counter()
    stop = torch.zeros(1, device=device)
    with tracer:
        for step in range(max_steps):
            losses.append(train_step())
            tracer.step()
            if step % 50 == 49:  # a collective decides when to stop, so all ranks stop together
                stop.fill_(float(time.perf_counter() - t0 > a.time_budget))
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                marks.append((step + 1, time.perf_counter() - t0))
                if rank == 0 and step % 500 == 499:
                    print(f"[{name} s{a.seed}] step {step + 1} loss {float(losses[-1]):.3f} "
                          f"{(step + 1) / (time.perf_counter() - t0):.2f} steps/s", flush=True)
                if stop.item():
                    break
    sync()
    train_s = time.perf_counter() - t0
    steps_done = len(losses)

    # tracer overhead: interleaved blocks with and without a (second, throw-away) tracer
    tmp = Path(tempfile.mkdtemp(prefix="moeload-overhead-"))
    times = {"traced": [], "untraced": []}
    for b in range(2 * a.overhead_blocks):
        traced = b % 2 == (b // 2) % 2  # ABBA order cancels slow drifts
        tr = LoadTracer(model, tmp / f"b{b}.moeload", flush_every=a.overhead_steps) if traced else None
        if tr is not None:
            tr.start()
        sync()
        t = time.perf_counter()
        for _ in range(a.overhead_steps):
            train_step()
            if tr is not None:
                tr.step()
        sync()
        times["traced" if traced else "untraced"].append((time.perf_counter() - t) / a.overhead_steps)
        if tr is not None:
            tr.close()
    shutil.rmtree(tmp, ignore_errors=True)
    if rank == 0:
        tr_ms = 1e3 * np.asarray(times["traced"])
        un_ms = 1e3 * np.asarray(times["untraced"])
        summary = {
            "experiment": name, "seed": a.seed, "world_size": world, "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "steps": steps_done, "train_s": train_s, "steps_per_s": steps_done / train_s,
            "tokens_per_step": cfg.batch_size * cfg.seq_len * world,
            "loss_first": float(torch.stack(losses[:20]).mean()), "loss_last": float(torch.stack(losses[-20:]).mean()),
            "overhead": {"traced_ms": tr_ms.tolist(), "untraced_ms": un_ms.tolist(),
                         "overhead_pct": float(100 * (tr_ms.mean() / un_ms.mean() - 1))},
            "tracer_errors": tracer.errors, "config": spec,
        }
        Path(str(a.out).rstrip("/") + ".json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("experiment", "seed", "steps", "train_s", "steps_per_s")}
                         | {"overhead_pct": summary["overhead"]["overhead_pct"]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
