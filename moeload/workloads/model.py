"""A small GPT-style decoder whose FFNs are Mixture-of-Experts layers.

Pre-LayerNorm blocks with causal self-attention (``scaled_dot_product_attention``); block ``i`` has
an MoE FFN (attribute ``moe``, router at ``blocks.i.moe.router``) when ``(i + 1) % moe_every == 0``
and a dense FFN (attribute ``mlp``) otherwise. Byte vocabulary (256), learned positions, tied
input/output embeddings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moeload.errors import InputError
from moeload.workloads.configs import WorkloadConfig
from moeload.workloads.corpus import VOCAB_SIZE


class RouterOutput(NamedTuple):
    """What a ``TopKRouter`` decided for ``T`` tokens, ``E`` experts, top-``k``."""

    weights: Tensor
    """[T, k] float32, top-k probabilities renormalised to sum to 1 per token."""
    indices: Tensor
    """[T, k] int64, routed expert ids (never -1, also for dropped routes)."""
    kept: Tensor
    """[T, k] bool, False where the route was dropped by expert capacity."""
    aux_loss: Tensor
    """[] float32, Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` (1 when balanced)."""
    probs: Tensor
    """[T, E] float32, full softmax of the gate."""
    counts: Tensor | None = None
    """[E] int64, routes per expert (dropped ones included): the sum over tokens and choices of the
    one-hot the aux loss is computed from, so it costs no extra kernel. With capacity the router keeps
    exactly min(counts[e], C) routes of expert e (queue positions are distinct per expert), which lets
    the tracer count both rows in two kernels."""


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Routes each expert may keep: ``ceil(capacity_factor * T * k / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def _one_hot(indices: Tensor, num_experts: int) -> Tensor:
    """``[...]`` int64 -> ``[..., E]`` int64; unlike ``F.one_hot`` it never reads values on the host."""
    return (indices[..., None] == torch.arange(num_experts, device=indices.device)).long()


def slot_positions(indices: Tensor, num_experts: int) -> Tensor:
    """0-based arrival position of each route in its expert's queue.

    ``indices: [T, k]`` -> ``[T, k]`` int64. Queues fill choice-major, token-minor (GShard): all
    first choices in token order, then all second choices, and so on. No host sync.

    One flat cumsum over an expert-major one-hot ``[E, k*T]``: entry ``(e, n)`` counts the routes of
    experts < e plus those of expert e up to route n, so subtracting the first part leaves the
    position. (A cumsum down the rows of ``[k*T, E]`` gives the same numbers, but CUDA runs it as E
    threads that each walk all k*T rows: ~10 ms per call at 64k routes on an H200.)
    """
    T, k = indices.shape
    if T * k == 0:
        return torch.zeros_like(indices, dtype=torch.int64)
    flat = indices.t().reshape(-1)  # [k*T] choice-major
    onehot = (flat == torch.arange(num_experts, device=flat.device)[:, None]).to(torch.int64)  # [E, k*T]
    running = onehot.view(-1).cumsum(0).view(num_experts, k * T)
    before = running[:, -1] - onehot.sum(1)  # [E] routes of experts < e
    pos = running.gather(0, flat[None]).squeeze(0) - before[flat] - 1  # [k*T]
    return pos.view(k, T).t()


class TopKRouter(nn.Module):
    """Linear gate + softmax + top-k, with optional capacity dropping; never syncs with the host."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: Tensor) -> RouterOutput:
        """Route ``x: [T, H]`` (tokens flattened)."""
        T, E, k = x.shape[0], self.num_experts, self.top_k
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        probs = logits.softmax(-1)
        top, indices = probs.topk(k, dim=-1)  # [T, k]
        weights = top / top.sum(-1, keepdim=True)
        counts = _one_hot(indices, E).sum((0, 1))  # [E] int64
        aux_loss = E * (counts.float() / max(T * k, 1) * probs.mean(0)).sum()
        if self.capacity_factor is None:
            kept = torch.ones_like(indices, dtype=torch.bool)
        else:
            cap = expert_capacity(T, k, E, self.capacity_factor)
            kept = slot_positions(indices, E) < cap
        return RouterOutput(weights, indices, kept, aux_loss, probs, counts)


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # != -1 inside a backward pass


class BiasRouter(TopKRouter):
    """Aux-loss-free router (DeepSeek-V3): top-k of ``probs + expert_bias``, gating weights from the
    unbiased ``probs``; ``update_bias()`` after each optimizer step moves the bias by
    ``bias_update * sign(mean load - load)`` from the routes counted since the last update.

    Buffers: ``expert_bias: [E]`` float32 (what `LoadTracer` records per step, `Trace.router_bias()`),
    ``step_load: [E]`` float32 routes of training forwards since the last update. No host sync.
    """

    expert_bias: Tensor
    step_load: Tensor

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        bias_update: float = 1e-3,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, capacity_factor)
        self.bias_update = bias_update
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("step_load", torch.zeros(num_experts))

    def forward(self, x: Tensor) -> RouterOutput:
        """Route ``x: [T, H]``; ``aux_loss`` is returned for logging only (the model leaves it out)."""
        T, E, k = x.shape[0], self.num_experts, self.top_k
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        probs = logits.softmax(-1)
        indices = (probs.detach() + self.expert_bias).topk(k, dim=-1).indices  # [T, k]
        top = probs.gather(1, indices)
        weights = top / top.sum(-1, keepdim=True)
        counts = _one_hot(indices, E).sum((0, 1))  # [E] int64
        load = counts.float()
        aux_loss = E * (load / max(T * k, 1) * probs.mean(0)).sum()
        if self.training and _graph_task_id() == -1:  # not eval, not an activation-checkpoint recompute
            with torch.no_grad():
                self.step_load.add_(load)
        if self.capacity_factor is None:
            kept = torch.ones_like(indices, dtype=torch.bool)
        else:
            kept = slot_positions(indices, E) < expert_capacity(T, k, E, self.capacity_factor)
        return RouterOutput(weights, indices, kept, aux_loss, probs, counts)

    @torch.no_grad()
    def update_bias(self) -> None:
        self.expert_bias.add_(self.bias_update * torch.sign(self.step_load.mean() - self.step_load))
        self.step_load.zero_()


class Experts(nn.Module):
    """``E`` two-layer GELU FFNs with stacked weights ``w1: [E, H, F]``, ``w2: [E, F, H]``."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` applied to ``x: [n, H]`` -> ``[n, H]`` (reference path, for checks)."""
        return F.gelu(x @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]

    def forward(self, chunks: list[Tensor]) -> list[Tensor]:
        """Expert ``e`` applied to ``chunks[e]: [n_e, H]`` -> ``[n_e, H]``, for all ``E`` experts.

        Weights are split with one ``unbind`` per tensor, so backward writes each stacked gradient
        once (indexing ``w1[e]`` per expert would materialise ``E`` full-size gradients).
        """
        params = zip(self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0))
        return [F.gelu(c @ w1 + b1) @ w2 + b2 for c, (w1, b1, w2, b2) in zip(chunks, params)]


class MoELayer(nn.Module):
    """Router + experts: each kept route adds ``weight * expert(x)``; dropped routes add nothing."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None = None,
        bias_update: float | None = None,
    ) -> None:
        super().__init__()
        self.router = (
            TopKRouter(d_model, num_experts, top_k, capacity_factor)
            if bias_update is None
            else BiasRouter(d_model, num_experts, top_k, capacity_factor, bias_update)
        )
        self.experts = Experts(num_experts, d_model, d_ff)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: [B, S, H]`` -> (``y: [B, S, H]``, ``aux_loss: []``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        r = self.router(flat)
        E, k = self.router.num_experts, self.router.top_k
        dest = torch.where(r.kept, r.indices, E).reshape(-1)  # [T*k], E = dropped
        order = torch.argsort(dest, stable=True)
        sizes = torch.bincount(dest, minlength=E + 1).tolist()  # the one host sync of this layer
        n_kept = sum(sizes[:E])
        token_of = order[:n_kept] // k
        chunks = flat[token_of].split(sizes[:E])
        y = torch.cat(self.experts(list(chunks)))  # [n_kept, H]
        w = r.weights.reshape(-1)[order[:n_kept]].to(y.dtype)
        out = y.new_zeros(flat.shape[0], shape[-1]).index_add_(0, token_of, y * w[:, None])
        return out.view(shape), r.aux_loss


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, H = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, H // self.n_heads).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nh, S, hd]

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, S, H]`` -> ``[B, S, H]``."""
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(x.shape))

    def attention_probs(self, x: Tensor) -> Tensor:
        """Explicit causal attention weights, ``x: [B, S, H]`` -> ``[B, nh, S, S]`` (rows sum to 1)."""
        q, k, _ = self._qkv(x)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        S = x.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
        return scores.float().masked_fill(mask, float("-inf")).softmax(-1)


class Block(nn.Module):
    """Pre-LN transformer block with a dense (``mlp``) or MoE (``moe``) FFN."""

    def __init__(self, cfg: WorkloadConfig, is_moe: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if is_moe:
            self.moe = MoELayer(
                cfg.d_model,
                cfg.expert_width,
                cfg.n_experts,
                cfg.top_k,
                cfg.capacity_factor,
                bias_update=cfg.bias_update if cfg.balance == "bias" else None,
            )
        else:
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.ffn_width),
                nn.GELU(),
                nn.Linear(cfg.ffn_width, cfg.d_model),
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: [B, S, H]`` -> (``x: [B, S, H]``, ``aux_loss: []``, 0 for a dense block)."""
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        if hasattr(self, "moe"):
            y, aux = self.moe(h)
        else:
            y, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + y, aux


class ModelOutput(NamedTuple):
    logits: Tensor
    """[B, S, 256]"""
    loss: Tensor | None
    """[] LM cross-entropy + aux_coef * sum of aux losses (None without targets)."""
    lm_loss: Tensor | None
    """[] LM cross-entropy (None without targets)."""
    aux_loss: Tensor
    """[] sum over MoE layers of the load-balancing losses."""


class MoEGPT(nn.Module):
    """Decoder-only byte-level MoE transformer; ``forward(idx: [B, S], targets: [B, S] | None)``."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        super().__init__()
        self.config = cfg
        self.checkpoint_activations = False
        self.wte = nn.Embedding(VOCAB_SIZE, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        moe = set(cfg.moe_layers)
        self.blocks = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = resid_std if name.endswith(("proj.weight", "mlp.2.weight", "w2")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def embed(self, idx: Tensor) -> Tensor:
        """``idx: [B, S]`` int64 -> ``[B, S, H]``."""
        if idx.shape[1] > self.config.seq_len:
            raise InputError(f"idx: sequence length {idx.shape[1]} > config seq_len {self.config.seq_len}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> ModelOutput:
        x = self.embed(idx)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, use_reentrant=False)
            else:
                x, aux = block(x)
            aux_total = aux_total + aux
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return ModelOutput(logits, None, None, aux_total)
        lm = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1))
        coef = 0.0 if self.config.balance == "bias" else self.config.aux_coef
        return ModelOutput(logits, lm + coef * aux_total, lm, aux_total)

    def routers(self) -> dict[str, TopKRouter]:
        """Module path -> router, in layer order (e.g. ``blocks.3.moe.router``)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, TopKRouter)}

    def update_bias(self) -> None:
        """After an optimizer step: move every BiasRouter's expert bias (aux-loss-free balancing)."""
        for r in self.routers().values():
            if isinstance(r, BiasRouter):
                r.update_bias()
