"""Tracer-independent views of one forward pass: expert counts and attention weights."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor

from moeload.errors import InputError
from moeload.workloads.model import Block, MoEGPT, RouterOutput, TopKRouter


def reference_counts(model: MoEGPT, tokens: Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-router routed and kept expert counts of one forward of ``tokens: [B, S]`` (or ``[S]``).

    Returns ``{module path: (routed [E] int64, kept [E] int64)}`` in layer order, read directly from
    each ``RouterOutput`` (own hooks, no tracer). Per layer ``routed.sum() == B * S * top_k``.
    Runs under ``no_grad``; the model's train/eval mode is left as it is.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    routers = {n: m for n, m in model.named_modules() if isinstance(m, TopKRouter)}
    found: dict[str, list[Tensor]] = {n: [] for n in routers}

    def hook(name: str):
        def fn(module: TopKRouter, args, out: RouterOutput) -> None:
            E = module.num_experts
            routed = torch.bincount(out.indices.reshape(-1), minlength=E)
            kept = torch.bincount(out.indices[out.kept], minlength=E)
            found[name].append(torch.stack([routed, kept]))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in routers.items()]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, parts in found.items():
        both = torch.stack(parts).sum(0).cpu().numpy().astype(np.int64)
        result[name] = (both[0], both[1])
    return result


def attention_maps(model: MoEGPT, tokens: Tensor) -> Tensor:
    """Attention weights of every head for one sequence ``tokens: [S]`` -> ``[layers, heads, S, S]``.

    Computed explicitly (softmax of masked scores) in eval mode under ``no_grad``; rows sum to 1 and
    entries above the diagonal are 0. The model's previous mode is restored.
    """
    if tokens.dim() == 2:
        if tokens.shape[0] != 1:
            raise InputError(f"tokens: expected one sequence [S], got shape {tuple(tokens.shape)}")
        tokens = tokens[0]
    was_training = model.training
    model.eval()
    maps = []
    try:
        with torch.no_grad():
            x = model.embed(tokens[None])
            for block in cast("list[Block]", model.blocks):  # MoEGPT builds its ModuleList of Blocks
                maps.append(block.attn.attention_probs(block.ln1(x))[0])
                x, _ = block(x)
    finally:
        model.train(was_training)
    return torch.stack(maps)
