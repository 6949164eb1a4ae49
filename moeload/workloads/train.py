"""Training loop of the embedded MoE GPT: AdamW, linear warmup + cosine decay, seedable.

``build_model`` and ``batches`` are public so that callers (tracer tests, benchmarks) can write their
own loops; ``train`` is the ready-made loop with gradient accumulation, optional activation
checkpointing and a progress bar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moeload.errors import InputError
from moeload.workloads.configs import WorkloadConfig, get_config
from moeload.workloads.corpus import batch_iterator, load_corpus, split
from moeload.workloads.model import MoEGPT


@dataclass
class TrainResult:
    """Outcome of ``train``; per-step arrays are ``[steps]`` (means over micro-batches)."""

    config: WorkloadConfig
    model: MoEGPT
    losses: np.ndarray
    """[steps] total loss (LM + aux_coef * aux)."""
    lm_losses: np.ndarray
    """[steps] LM cross-entropy, nats per byte."""
    aux_losses: np.ndarray
    """[steps] sum over MoE layers of the load-balancing loss."""
    wall_s: float
    """Seconds spent in the loop (model building and corpus loading excluded)."""
    tokens: int
    """Tokens processed (steps x micro_batches x batch_size x seq_len)."""

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


def build_model(config: str | WorkloadConfig, seed: int = 0, device: str | torch.device = "cpu") -> MoEGPT:
    """A freshly initialised model; the same seed gives the same weights (global RNG untouched)."""
    cfg = get_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoEGPT(cfg)
    return model.to(device)


def batches(
    config: str | WorkloadConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    split_name: str = "train",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless deterministic batches ``(x: [B, S] int64, y: [B, S] int64)`` from the stdlib corpus."""
    cfg = get_config(config)
    if split_name not in ("train", "val"):
        raise InputError(f"split_name={split_name!r}: expected 'train' or 'val'")
    train_data, val_data = split(load_corpus(), cfg.val_fraction)
    data = train_data if split_name == "train" else val_data
    for x, y in batch_iterator(data, cfg.batch_size, cfg.seq_len, seed):
        yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def make_optimizer(model: MoEGPT, config: WorkloadConfig, total_steps: int):
    """AdamW (no decay on biases, norms) and a LambdaLR scheduler: linear warmup, cosine to ``min_lr_ratio``."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    warmup = config.warmup_steps
    decay_steps = max(config.decay_steps or total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min((step - warmup) / decay_steps, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _progress(enabled: bool, steps: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )


def train(
    config: str | WorkloadConfig,
    *,
    steps: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    micro_batches: int = 1,
    on_step: Callable[[int, Tensor], None] | None = None,
    progress: bool = True,
    checkpoint_activations: bool = False,
    log_every: int = 10,
    model: MoEGPT | None = None,
) -> TrainResult:
    """Train for ``steps`` optimizer steps of ``micro_batches`` accumulated batches each.

    ``on_step(step, loss)`` runs after each optimizer step with the 0-based step index and the
    step's mean total loss as a detached ``[]`` tensor (reading it with ``float`` syncs the device;
    the loop itself syncs only every ``log_every`` steps, for the progress bar). Pass ``model``
    (from ``build_model``) to attach hooks or a tracer before training; otherwise one is built
    from ``seed``. Batches come from ``batches(config, seed)``.
    """
    cfg = get_config(config)
    if steps < 1 or micro_batches < 1 or log_every < 1:
        raise InputError(f"steps={steps}, micro_batches={micro_batches}, log_every={log_every}: must be >= 1")
    device = torch.device(device)
    model = build_model(cfg, seed, device) if model is None else model
    model.train()
    model.checkpoint_activations = checkpoint_activations
    opt, sched = make_optimizer(model, cfg, steps)
    data = batches(cfg, seed, device)
    amp = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda" else nullcontext()
    )
    history = torch.zeros(steps, 3, device=device)  # total, lm, aux
    bar = _progress(progress, steps)
    task = bar.add_task(cfg.name, total=steps, info="") if bar else None
    start = time.perf_counter()
    with bar or nullcontext():
        for step in range(steps):
            for _ in range(micro_batches):
                x, y = next(data)
                with amp:
                    out = model(x, y)
                (out.loss / micro_batches).backward()
                history[step] += torch.stack([out.loss, out.lm_loss, out.aux_loss]).detach() / micro_batches
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if cfg.balance == "bias":
                model.update_bias()  # before on_step: a tracer's step() then records the bias the next step uses
            if on_step is not None:
                on_step(step, history[step, 0])
            if bar and ((step + 1) % log_every == 0 or step + 1 == steps):
                loss, lm, aux = history[step].tolist()
                bar.update(task, completed=step + 1, info=f"loss {loss:.3f} lm {lm:.3f} aux {aux:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    h = history.cpu().numpy().astype(np.float64)
    tokens = steps * micro_batches * cfg.tokens_per_batch
    return TrainResult(cfg, model, h[:, 0], h[:, 1], h[:, 2], wall, tokens)


@torch.no_grad()
def evaluate(model: MoEGPT, *, n_batches: int = 8, seed: int = 0) -> float:
    """Mean validation LM loss (nats per byte) over ``n_batches`` deterministic validation batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = batches(model.config, seed, device, split_name="val")
    total = 0.0
    for _ in range(n_batches):
        x, y = next(data)
        total += float(model(x, y).lm_loss)
    model.train(was_training)
    return total / n_batches
