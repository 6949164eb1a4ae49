"""The measured workload: the embedded MoE model (optionally with train_long's `GroupedMoE`), its
training step, and the config and device of a run."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

TRAIN_LONG = Path(__file__).resolve().parents[2] / "experiments" / "train_long.py"


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
