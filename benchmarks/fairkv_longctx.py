"""Ada-KV per-KV-head budgets at long context, from a GQA byte-level decoder trained here.

Model: a byte-level decoder (vocab 256) on the offline corpus (`moeload.workloads.corpus`: the
Python stdlib sources, NUL-separated files), written here because the embedded `MoEGPT` has learned
positions and no GQA. Pre-RMSNorm blocks, grouped-query attention (default 32 query heads, 8 KV
heads, head dim 128; q/k/v map d_model to heads x head_dim), rotary positions (RoPE, base
--rope-theta), a dense GELU FFN (no MoE), untied output head. Because positions are rotary, the
same weights run at contexts beyond the training length (--seq-len); how well is shown by the
`tail_loss` of each context (bytes the model predicts at the end of each prompt). Training: bf16
autocast, SDPA with is_causal and enable_gqa (flash where it runs; probed first, see `sdpa`), fused
AdamW, linear warmup then cosine decay over the --minutes of wall time (or --steps).

Budgets: for --prompts prompts of the validation split (each starts at a file boundary and runs
through consecutive files; context N is its first N bytes) and each context N in --contexts, one
forward pass records, per layer, the softmax attention of the last --window queries (the
observation window of SnapKV / Ada-KV) over the prefix keys, computed from q and k per KV group
(never the S x S matrix). Scores follow Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction
by Adaptive Budget Allocation for Efficient LLM Inference", arXiv 2407.11550) with its GQA support
(the `test_gqa_support` branch of github.com/FFY0/AdaKV): mean over the window queries, then over
the query heads of each KV group; then max-pooling over key positions (--pool, 7 as in
`AdaptiveSnapKVCluster`; 0 disables it). The window's own keys are kept by every head and not
counted. The allocation is `moeload.placement.adakv_budgets` (floor alpha, then one top-k across the
layer's heads; its docstring states the rule): each layer keeps --budget keys per KV head on average
(a number, or a percentage of the context; several, comma-separated, share one scoring pass; default
2048 and 20%). Budgets of the untrained model (same seed, before training) at the first context are
a control: they show what training, not the architecture, made uneven.

Writes to --out: budgets_ctx{N}.npy [L, H_kv] (first --budget, mean over prompts; accepted by
`fairkv_decode.py --budgets`), budgets_ctx{N}_per_prompt.npy [P, L, H_kv] (int64), the same pair as
budgets_ctx{N}_{pct20,b1024,...}[_per_prompt].npy for the other --budget specs, fairkv_longctx.json
(provenance, losses, per-context statistics) and fairkv_longctx_budgets.png. A context that runs out
of GPU memory is reported and skipped; the JSON is written in any case.

    PYTHONPATH=$PWD python3 benchmarks/fairkv_longctx.py --minutes 5 --out $OUT          # one H200
    PYTHONPATH=$PWD python3 benchmarks/fairkv_longctx.py --tiny --device cpu --out /tmp/flc  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAIRKV = ("FairKV (Zhao et al., arXiv 2502.15804) observes that uneven per-head KV budgets from "
          "per-head compression (e.g. Ada-KV) overburden some tensor-parallel GPUs while others stay underused; "
          "its abstract reports that FairKV (Fair-Copying) increases throughput by 1.66x over standard TP "
          "(LLaMA 70B, Mistral 24B).")
ADAKV = ("Ada-KV (Feng et al., arXiv 2407.11550) allocates per-head budgets because attention concentration "
         "differs across heads: concentrated heads need few keys, dispersed heads many.")
NOT_PLOTTED = "Per-head budget numbers from either paper are not plotted: none were verified here."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and contexts for a CPU smoke run")
    ap.add_argument("--minutes", type=float, help="training wall time (default 5; --tiny 1/3)")
    ap.add_argument("--steps", type=int, default=0, help="stop training after this many steps too (0: time only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=0, help="dense FFN width (0: 4 * d_model)")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--seq-len", type=int, default=8192, help="training sequence length (bytes)")
    ap.add_argument("--batch", type=int, default=8, help="training sequences per step")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=40, help="linear warmup steps")
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--contexts", default="16384,32768,65536,131072", help="comma-separated context lengths")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (distinct runs of the validation split)")
    ap.add_argument("--window", type=int, default=32, help="observation window: last queries scored")
    ap.add_argument("--budget", default="2048,20%",
                    help="mean keys per KV head: integers or percentages of the context, comma-separated; "
                         "the first gives budgets_ctx{N}.npy, the others budgets_ctx{N}_{tag}.npy")
    ap.add_argument("--alpha", type=float, default=0.2, help="Ada-KV safeguard floor fraction")
    ap.add_argument("--pool", type=int, default=7, help="max-pool kernel over key scores (odd; 0: none)")
    ap.add_argument("--tail", type=int, default=1024, help="bytes at the end of each prompt whose loss is reported")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.d_model, args.ffn = 2, 64, 128
        args.q_heads, args.kv_heads, args.head_dim = 16, 8, 16
        args.seq_len, args.batch, args.warmup, args.val_batches, args.tail = 128, 4, 5, 2, 64
        if args.contexts == ap.get_default("contexts"):
            args.contexts = "256,512"
        if args.budget == ap.get_default("budget"):  # 20% of 224 or 480 keys
            args.budget = "20%"
    if args.minutes is None:
        args.minutes = 1 / 3 if args.tiny else 5.0
    args.ffn = args.ffn or 4 * args.d_model
    args.contexts = sorted({int(c) for c in str(args.contexts).split(",") if c.strip()})
    for name, ok in (("--q-heads", args.q_heads % args.kv_heads == 0), ("--head-dim", args.head_dim % 2 == 0),
                     ("--contexts", bool(args.contexts) and min(args.contexts) > args.window + 1),
                     ("--pool", args.pool == 0 or args.pool % 2 == 1), ("--prompts", args.prompts >= 1),
                     ("--minutes", args.minutes > 0 or args.steps > 0), ("--window", args.window >= 1)):
        if not ok:
            ap.error(f"{name}: not usable (q/kv heads {args.q_heads}/{args.kv_heads}, head dim {args.head_dim}, "
                     f"contexts {args.contexts}, window {args.window}, pool {args.pool}, prompts {args.prompts})")
    args.budgets = [b.strip() for b in str(args.budget).split(",") if b.strip()]
    try:
        if not args.budgets:
            raise ValueError("no budget given")
        for spec in args.budgets:
            budget_per_head(spec, min(args.contexts) - args.window)
    except ValueError as e:
        ap.error(f"--budget: {e}")
    return args


def budget_per_head(spec: str, keys: int) -> int:
    """Mean keys per head for `keys` scored keys: `spec` "2048" or "20%" -> int in [1, keys]."""
    s = str(spec).strip()
    try:
        b = round(float(s[:-1]) / 100 * keys) if s.endswith("%") else int(s)
    except ValueError:
        raise ValueError(f"{spec!r}: expected an integer or a percentage like 20%") from None
    if b < 1:
        raise ValueError(f"{spec!r} gives {b} keys per head, expected >= 1")
    return min(b, keys)


# ------------------------------------------------------------------------------------------ model


def build_model(args, torch):
    nn, F = torch.nn, torch.nn.functional

    def rope(x, cos, sin):
        """x: [B, H, S, D] -> same, rotated (half-split convention) in x's dtype; cos, sin: [S, D/2]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.hq, self.hkv, self.hd = args.q_heads, args.kv_heads, args.head_dim
            self.q = nn.Linear(args.d_model, self.hq * self.hd, bias=False)
            self.kv = nn.Linear(args.d_model, 2 * self.hkv * self.hd, bias=False)
            self.proj = nn.Linear(self.hq * self.hd, args.d_model, bias=False)
            self.sdpa = {"gqa": True, "flash": False}

        def qkv(self, x, cos, sin):
            """x: [B, S, d] -> q [B, Hq, S, D], k, v [B, Hkv, S, D] (q, k rotated)."""
            b, s, _ = x.shape
            q = self.q(x).view(b, s, self.hq, self.hd).transpose(1, 2)
            k, v = self.kv(x).view(b, s, 2, self.hkv, self.hd).unbind(2)
            return rope(q, cos, sin), rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

        def attend(self, q, k, v):
            g = self.hq // self.hkv
            if g > 1 and not self.sdpa["gqa"]:
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            kw = {"enable_gqa": True} if g > 1 and self.sdpa["gqa"] else {}
            if self.sdpa["flash"]:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)

        def forward(self, x, cos, sin, window: int = 0):
            q, k, v = self.qkv(x, cos, sin)
            y = self.proj(self.attend(q, k, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
            return y, (window_scores(torch, q, k, window) if window else None)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(args.d_model), nn.RMSNorm(args.d_model)
            self.attn = Attention()
            self.ffn = nn.Sequential(nn.Linear(args.d_model, args.ffn, bias=False), nn.GELU(),
                                     nn.Linear(args.ffn, args.d_model, bias=False))

        def forward(self, x, cos, sin, window: int = 0):
            y, scores = self.attn(self.n1(x), cos, sin, window)
            x = x + y
            return x + self.ffn(self.n2(x)), scores

    class Decoder(nn.Module):
        """Byte decoder; forward(idx: [B, S]) -> hidden [B, S, d] and per-layer window scores."""

        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(256, args.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
            self.norm = nn.RMSNorm(args.d_model)
            self.head = nn.Linear(args.d_model, 256, bias=False)
            inv = args.rope_theta ** (-torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
            self.register_buffer("inv_freq", inv, persistent=False)  # float64: angles exact enough at 128k
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * args.layers) if name.endswith(("proj.weight", "ffn.2.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def rotary(self, s: int):
            ang = torch.arange(s, device=self.inv_freq.device, dtype=torch.float64)[:, None] * self.inv_freq
            return ang.cos().float(), ang.sin().float()  # [S, D/2] each

        def forward(self, idx, window: int = 0):
            cos, sin = self.rotary(idx.shape[1])
            x, scores = self.wte(idx), []
            for blk in self.blocks:
                x, sc = blk(x, cos, sin, window)
                scores.append(sc)
            return self.norm(x), scores

        def loss(self, idx, targets):
            h, _ = self(idx)
            return F.cross_entropy(self.head(h).float().view(-1, 256), targets.reshape(-1))

    return Decoder()


def window_scores(torch, q, k, window: int):
    """Ada-KV scores of the prefix keys: `q: [1, Hq, S, D]`, `k: [1, Hkv, S, D]` -> `[Hkv, S - window]` float32.

    Softmax attention of the last `window` queries (causal within the window) over all S keys, in
    float32, one KV group at a time; mean over the window queries and the group's query heads, for
    the S - window keys before the window.
    """
    hq, s, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = k.shape[1]
    g = hq // hkv
    qw = q[0, :, s - window:].float()  # [Hq, w, D]
    qpos = torch.arange(s - window, s, device=q.device)
    future = torch.arange(s, device=q.device)[None, :] > qpos[:, None]  # [w, S]
    out = torch.empty(hkv, s - window, device=q.device, dtype=torch.float32)
    with torch.autocast(q.device.type, enabled=False):  # float32 logits, not bf16
        for h in range(hkv):
            logits = (qw[h * g:(h + 1) * g] @ k[0, h].float().T) * d ** -0.5  # [G, w, S]
            p = logits.masked_fill_(future, float("-inf")).softmax(-1)
            out[h] = p[..., : s - window].mean((0, 1))
    return out


def probe_sdpa(torch, device, args) -> dict:
    """Pick the SDPA path training uses: flash with enable_gqa, flash on repeated KV, or the default."""
    F = torch.nn.functional
    g = args.q_heads // args.kv_heads
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, args.q_heads, 256, args.head_dim, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(1, args.kv_heads, 256, args.head_dim, device=device, dtype=dt, requires_grad=True)
    tried = []
    for flash, gqa in ((True, True), (True, False), (False, True), (False, False)):
        if flash and device.type != "cuda":
            continue
        try:
            kk = k if gqa or g == 1 else k.repeat_interleave(g, 1)
            kw = {"enable_gqa": True} if gqa and g > 1 else {}
            if flash:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    F.scaled_dot_product_attention(q, kk, kk, is_causal=True, **kw).sum().backward()
            else:
                F.scaled_dot_product_attention(q, kk, kk, is_causal=True, **kw).sum().backward()
            return {"flash": flash, "gqa": gqa, "rejected": tried}
        except Exception as e:  # an unsupported backend / argument raises RuntimeError (or another type)
            tried.append(f"flash={flash} enable_gqa={gqa}: {str(e).splitlines()[0][:160]}")
    raise SystemExit("no SDPA path runs here: " + "; ".join(tried))


# ------------------------------------------------------------------------------------------ data


def corpus_splits():
    from moeload.workloads.corpus import load_corpus, split
    tokens = load_corpus()
    train, val = split(tokens)
    return tokens, train, val


def prompt_starts(tokens, val, length: int, count: int) -> list[dict]:
    """Up to `count` distinct starts of `length`-byte prompts in `val`, each at a file boundary, spread out."""
    from moeload.workloads.corpus import SEPARATOR, stdlib_files, stdlib_root
    bounds = np.flatnonzero(val == SEPARATOR) + 1
    fits = bounds[bounds + length <= len(val)]
    if not len(fits):
        raise SystemExit(f"context {length}: the validation split ({len(val)} bytes) holds no such prompt")
    targets = np.linspace(0, len(val) - length, count)
    starts = sorted({int(fits[np.argmin(np.abs(fits - t))]) for t in targets})
    first_file = int(np.count_nonzero(tokens[: len(tokens) - len(val)] == SEPARATOR))  # index of val's first file
    root = stdlib_root()
    names = [f.relative_to(root).as_posix() for f in stdlib_files(root)]
    out = []
    for s in starts:
        i = first_file + int(np.count_nonzero(val[:s] == SEPARATOR))
        n = int(np.count_nonzero(val[s:s + length] == SEPARATOR))
        out.append({"start": s, "first_file": names[i] if i < len(names) else None, "files": n + 1})
    return out


# ------------------------------------------------------------------------------------------ train


def train(model, args, torch, device, train_data, val_data) -> dict:
    from moeload.workloads.corpus import sample_batch
    rng = np.random.default_rng(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), **fused)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget_s, min_lr = args.minutes * 60, 0.1 * args.lr
    losses, log, step = [], [], 0
    tok_step = args.batch * args.seq_len
    model.train()
    start = last = time.perf_counter()
    last_step = 0
    while True:
        now = time.perf_counter()
        elapsed = now - start
        if (args.minutes > 0 and elapsed >= budget_s) or (args.steps and step >= args.steps):
            break
        frac = max(elapsed / budget_s if args.minutes > 0 else 0.0, step / args.steps if args.steps else 0.0)
        lr = (args.lr * (step + 1) / args.warmup if step < args.warmup
              else min_lr + (args.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = sample_batch(train_data, args.batch, args.seq_len, rng)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with amp:
            loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        step += 1
        if step == 1 or time.perf_counter() - last >= 20:
            cur = float(losses[-1])  # syncs
            t = time.perf_counter()
            tps = round((step - last_step) * tok_step / max(t - last, 1e-9)) if step > 1 else None
            log.append({"step": step, "loss": round(cur, 4), "tokens_per_s": tps, "lr": lr,
                        "elapsed_s": round(t - start, 1)})
            print(f"step {step:6d}  loss {cur:.4f}  {'-' if tps is None else f'{tps:,}'} tokens/s  lr {lr:.2e}  "
                  f"{t - start:6.1f} s", flush=True)
            last, last_step = t, step
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    loss_list = [round(float(v), 4) for v in torch.stack(losses).cpu()] if losses else []
    val = validation_loss(model, args, torch, device, val_data, amp)
    print(f"trained {step} steps, {step * tok_step:,} tokens in {wall:.0f} s "
          f"({step * tok_step / max(wall, 1e-9):,.0f} tokens/s); final loss "
          f"{np.mean(loss_list[-10:]) if loss_list else float('nan'):.4f}, val loss {val:.4f} nats/byte", flush=True)
    return {"steps": step, "tokens": step * tok_step, "wall_s": round(wall, 2), "minutes": args.minutes,
            "tokens_per_s": round(step * tok_step / max(wall, 1e-9)), "losses": loss_list, "log": log,
            "final_loss_mean10": float(np.mean(loss_list[-10:])) if loss_list else None,
            "val_loss": val, "epochs_of_train_split": step * tok_step / len(train_data)}


def validation_loss(model, args, torch, device, val_data, amp) -> float:
    from moeload.workloads.corpus import sample_batch
    rng = np.random.default_rng(args.seed + 1)
    model.eval()
    total = 0.0
    with torch.inference_mode(), amp:
        for _ in range(args.val_batches):
            x, y = sample_batch(val_data, args.batch, args.seq_len, rng)
            total += float(model.loss(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)))
    return total / args.val_batches


# ------------------------------------------------------------------------------------------ budgets


def prompt_scores(model, args, torch, device, ids: np.ndarray) -> tuple[np.ndarray, float]:
    """Scores `[L, H_kv, N - window]` float64 of one prompt `ids: [N]`, and the loss on its last --tail bytes."""
    F = torch.nn.functional
    idx = torch.from_numpy(ids.astype(np.int64))[None].to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), amp:
        h, scores = model(idx, window=args.window)
        tail = min(args.tail, idx.shape[1] - 1)
        tail_loss = float(F.cross_entropy(model.head(h[0, -tail - 1:-1]).float(), idx[0, -tail:]))
        del h
        sc = torch.stack(scores)  # [L, Hkv, T]
        if args.pool:
            sc = F.max_pool1d(sc, args.pool, stride=1, padding=args.pool // 2)
    return sc.double().cpu().numpy(), tail_loss


def allocate(scores: np.ndarray, per_head: int, alpha: float) -> np.ndarray:
    """Ada-KV budgets `[L, H]` int64 from window-mean scores `scores: [L, H, T]`
    (`moeload.placement.heads.adakv_allocate`, the allocation step of `adakv_budgets`)."""
    from moeload.placement.heads import adakv_allocate

    return adakv_allocate(scores, total=per_head * scores.shape[1], alpha=alpha)


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative `x: [n]` (0: all equal, (n-1)/n: one holds everything)."""
    v = np.sort(np.asarray(x, dtype=np.float64))
    n, tot = len(v), v.sum()
    return float(2 * np.sum(np.arange(1, n + 1) * v) / (n * tot) - (n + 1) / n) if tot > 0 else 0.0


def layer_stats(budgets: np.ndarray) -> dict:
    """Per-layer statistics of `budgets: [L, H]`: lists of length L, plus their means over layers."""
    b = np.asarray(budgets, dtype=np.float64)
    top = max(1, math.ceil(b.shape[1] / 4))
    mean = b.mean(1)
    per = {
        "max": b.max(1), "mean": mean, "max_over_mean": b.max(1) / mean, "min_over_mean": b.min(1) / mean,
        "cv": b.std(1) / mean, "gini": np.array([gini(r) for r in b]),
        "top25_share": np.sort(b, 1)[:, -top:].sum(1) / b.sum(1),
    }
    out: dict = {k: [round(float(x), 4) for x in v] for k, v in per.items()}
    out["over_layers"] = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
    return out


def tp_imbalance(budgets: np.ndarray) -> dict:
    """Max / mean rank load (mean over layers) of standard TP and FairKV plans of `budgets: [L, H]`."""
    from moeload.placement import head_placement_table
    heads = budgets.shape[1]
    tps = tuple(t for t in (2, 4, 8) if heads % t == 0 and t <= heads)
    if not tps:
        return {}
    table = head_placement_table(budgets.astype(np.float64), tps, exact_time_limit=None)
    return {str(tp): {r.strategy: round(float(r.imbalance_mean), 4) for r in table[table.tp == tp].itertuples()}
            for tp in tps}


def consistency(per_prompt: np.ndarray) -> float | None:
    """Mean pairwise Pearson correlation across prompts of the per-head budgets (does the skew stay with the heads?)."""
    p = per_prompt.reshape(per_prompt.shape[0], -1).astype(np.float64)
    if p.shape[0] < 2 or np.any(p.std(1) == 0):
        return None
    c = np.corrcoef(p)
    return round(float(c[np.triu_indices_from(c, 1)].mean()), 4)


def context_budgets(model, args, torch, device, val, prompts: list[dict], n: int) -> tuple[dict, list[float]]:
    """Per-prompt budgets `[P, L, H_kv]` int64 at context `n` for each --budget spec, and each prompt's tail loss."""
    out: dict[str, list[np.ndarray]] = {spec: [] for spec in args.budgets}
    tails = []
    for p in prompts:
        scores, tail = prompt_scores(model, args, torch, device, val[p["start"]:p["start"] + n])
        for spec in args.budgets:
            out[spec].append(allocate(scores, budget_per_head(spec, n - args.window), args.alpha))
        tails.append(round(tail, 4))
    return {spec: np.stack(v) for spec, v in out.items()}, tails


def file_tag(spec: str) -> str:
    """File name part of a budget spec: "20%" -> "pct20", "1024" -> "b1024"."""
    return f"pct{spec.rstrip('%')}" if spec.endswith("%") else f"b{spec}"


def summarise(per_prompt: np.ndarray, n: int, args, spec: str) -> dict:
    mean = per_prompt.mean(0)
    return {"budget": spec, "keys_scored": n - args.window, "budget_per_head": budget_per_head(spec, n - args.window),
            "total_per_layer": int(per_prompt[0, 0].sum()), "stats_of_mean": layer_stats(mean),
            "stats_per_prompt_mean": {k: round(float(np.mean([layer_stats(b)["over_layers"][k] for b in per_prompt])), 4)
                                      for k in layer_stats(mean)["over_layers"]},
            "prompt_consistency_r": consistency(per_prompt)}


# ------------------------------------------------------------------------------------------ figure


def figure(results: dict, arrays: dict, control: np.ndarray | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = sorted(arrays)
    if not ctxs:
        return
    floor_ratio = results["config"]["alpha"]  # the floor floor(alpha * B / H) over the mean B / H
    fig, axes = plt.subplots(2, len(ctxs), figsize=(3.6 * len(ctxs) + 0.6, 7.4), squeeze=False)
    for j, n in enumerate(ctxs):
        per_prompt = arrays[n].astype(np.float64)  # [P, L, H]
        mean = per_prompt.mean(0)
        ax = axes[0, j]
        ranks = np.arange(1, mean.shape[1] + 1)
        for layer, row in enumerate(mean):
            ax.plot(ranks, np.sort(row)[::-1] / row.mean(), marker="o", ms=3, lw=1.2, label=f"layer {layer}")
        if control is not None and j == 0:
            c = control.mean(0)
            for layer, row in enumerate(c):
                ax.plot(ranks, np.sort(row)[::-1] / row.mean(), color="0.5", ls="--", lw=0.8,
                        label="untrained (control)" if layer == 0 else None)
        ax.axhline(1.0, color="k", lw=0.7)
        ax.axhline(floor_ratio, color="k", lw=0.7, ls=":", label="floor (alpha)" if j == 0 else None)
        st = results["contexts"][str(n)]
        label = f"{n // 1024}k" if n >= 1024 else str(n)
        ax.set_title(f"{label} ctx, {st['budget_per_head']} keys/head\n"
                     f"max/mean {st['stats_of_mean']['over_layers']['max_over_mean']:.2f}, "
                     f"CV {st['stats_of_mean']['over_layers']['cv']:.2f}", fontsize=9)
        ax.set_xlabel("KV head (sorted by budget)")
        if j == 0:
            ax.set_ylabel("budget / layer mean (mean over prompts)")
            ax.legend(fontsize=6)
        ax2 = axes[1, j]
        norm = per_prompt / per_prompt.mean(2, keepdims=True)  # [P, L, H]
        ax2.boxplot([norm[:, layer].ravel() for layer in range(norm.shape[1])], showfliers=True)
        ax2.axhline(1.0, color="k", lw=0.7)
        ax2.set_xticks(np.arange(1, norm.shape[1] + 1), [str(i) for i in range(norm.shape[1])])
        ax2.set_xlabel("layer")
        if j == 0:
            ax2.set_ylabel("per-prompt budget / layer mean")
    cfg = results["config"]
    caption = (f"Ada-KV budgets (window {cfg['window']}, max-pool {cfg['pool']}, alpha {cfg['alpha']}, GQA: mean over "
               f"{cfg['q_heads'] // cfg['kv_heads']} query heads per KV head) of a {cfg['layers']}-layer byte decoder "
               f"({cfg['q_heads']} q / {cfg['kv_heads']} KV heads, RoPE, trained {results['train'].get('steps', '?')} steps "
               f"at {cfg['seq_len']} bytes), {len(results.get('prompts', []))} stdlib prompts. "
               f"1.0 = uniform (standard TP balanced). {FAIRKV} {ADAKV} {NOT_PLOTTED}")
    fig.text(0.01, 0.005, caption, fontsize=6.5, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def run(args, results: dict, write) -> None:
    import torch

    from moeload import placement  # noqa: F401  (fail before training if its dependencies are missing)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device; use --device cpu (with --tiny for a smoke run)")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokens, train_data, val = corpus_splits()
    prompts = prompt_starts(tokens, val, max(args.contexts), args.prompts)
    results["prompts"] = prompts  # context N of a prompt is its first N bytes (shorter contexts are prefixes)
    results["sdpa"] = sdpa = probe_sdpa(torch, device, args)
    model = build_model(args, torch).to(device)
    for m in model.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = sdpa
    results["config"]["params"] = sum(p.numel() for p in model.parameters())
    print(f"model: {results['config']['params'] / 1e6:.1f} M params, {args.layers} layers, d_model {args.d_model}, "
          f"{args.q_heads} q / {args.kv_heads} KV heads x {args.head_dim}; SDPA flash={sdpa['flash']} "
          f"enable_gqa={sdpa['gqa']}; {len(prompts)} prompts; device {results['device']}", flush=True)

    arrays: dict[int, np.ndarray] = {}
    control = None
    n0 = args.contexts[0]
    try:  # untrained control at the first context
        controls, _ = context_budgets(model, args, torch, device, val, prompts, n0)
        control = controls[args.budgets[0]]
        results["init_control"] = {"context": n0, **summarise(control, n0, args, args.budgets[0])}
    except torch.cuda.OutOfMemoryError as e:
        results["init_control"] = {"context": n0, "status": "oom", "error": str(e).splitlines()[0][:300]}
    results["train"] = train(model, args, torch, device, train_data, val)
    write()
    model.eval()
    for n in args.contexts:
        t0 = time.perf_counter()
        oom = None
        try:
            by_spec, tails = context_budgets(model, args, torch, device, val, prompts, n)
        except torch.cuda.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:300]
        if oom is not None:
            print(f"context {n}: out of GPU memory, skipped ({oom})", flush=True)
            results["contexts"][str(n)] = {"status": "oom", "error": oom}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
            continue
        if device.type == "cuda":
            results.setdefault("peak_gpu_gib", {})[str(n)] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        entries = []
        for i, (spec, per_prompt) in enumerate(by_spec.items()):
            stem = f"budgets_ctx{n}" if i == 0 else f"budgets_ctx{n}_{file_tag(spec)}"
            mean = per_prompt.mean(0)
            np.save(args.out / f"{stem}.npy", mean)
            np.save(args.out / f"{stem}_per_prompt.npy", per_prompt)
            try:
                tp = tp_imbalance(mean)
            except Exception as e:  # the statistic is a bonus; the budgets are saved already
                tp = {"error": f"{type(e).__name__}: {e}"}
            entries.append({**summarise(per_prompt, n, args, spec), "tp_imbalance_mean": tp,
                            "files": [f"{stem}.npy", f"{stem}_per_prompt.npy"]})
            ov = entries[-1]["stats_of_mean"]["over_layers"]
            print(f"context {n}: {entries[-1]['budget_per_head']} keys/head ({spec}), max/mean "
                  f"{ov['max_over_mean']:.3f}, CV {ov['cv']:.3f}, Gini {ov['gini']:.3f}, top-25% share "
                  f"{ov['top25_share']:.3f}, tail loss {np.mean(tails):.3f}", flush=True)
        arrays[n] = by_spec[args.budgets[0]]
        results["contexts"][str(n)] = {"status": "ok", **entries[0], "tail_loss": tails,
                                       "other_budgets": {e["budget"]: e for e in entries[1:]},
                                       "seconds": round(time.perf_counter() - t0, 2)}
        write()
    figure(results, arrays, control, args.out / "fairkv_longctx_budgets.png")
    results["figure"] = "fairkv_longctx_budgets.png"


def replot(args, train_steps: int | None) -> None:
    """Redraw the figure from `budgets_ctx{N}_per_prompt.npy` files already in --out (a run whose JSON
    and figure did not come back); statistics are recomputed from the budgets, not taken from a log."""
    arrays = {}
    for f in sorted(args.out.glob("budgets_ctx*_per_prompt.npy")):
        stem = f.name.removeprefix("budgets_ctx").removesuffix("_per_prompt.npy")
        if stem.isdigit():
            arrays[int(stem)] = np.load(f)
    if not arrays:
        raise SystemExit(f"{args.out}: no budgets_ctx{{N}}_per_prompt.npy files to redraw")
    spec = args.budgets[0]
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "train": {"steps": train_steps if train_steps is not None else "?"},
               "prompts": [None] * next(iter(arrays.values())).shape[0],
               "contexts": {str(n): summarise(a, n, args, spec) for n, a in arrays.items()}}
    figure(results, arrays, None, args.out / "fairkv_longctx_budgets.png")
    (args.out / "fairkv_longctx_replot.json").write_text(json.dumps(results, indent=1))
    print(f"redrew {args.out / 'fairkv_longctx_budgets.png'} from contexts {sorted(arrays)}")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--replot" in argv:  # `--replot STEPS`: redraw from the files in --out (STEPS: the run's training steps)
        i = argv.index("--replot")
        steps = int(argv[i + 1])
        args = parse_args(argv[:i] + argv[i + 2:])
        replot(args, steps)
        return {}
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    import torch
    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rule": ("Ada-KV (arXiv 2407.11550) with GQA support: scores = softmax attention of the last `window` queries "
                 "over the prefix keys, mean over the window and over the query heads of each KV group, max-pooled "
                 "over key positions (`pool`); allocation = moeload.placement.adakv_budgets (each head its top "
                 "floor(alpha * B / H) keys, the rest of the layer total B = budget_per_head * H by one top-k over "
                 "all heads' remaining scores). Budgets count prefix keys; every head also keeps the window's keys."),
        "papers": {"fairkv": FAIRKV, "adakv": ADAKV, "note": NOT_PLOTTED},
        "torch": torch.__version__, "python": sys.version.split()[0], "seed": args.seed,
        "device": (torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "cpu"),
        "contexts": {}, "train": {},
    }
    path = args.out / "fairkv_longctx.json"

    def write() -> None:
        results["total_wall_s"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(results, indent=1))

    try:
        run(args, results, write)
    except BaseException as e:
        results["error"] = f"{type(e).__name__}: {e}"
        results["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        write()
        print(f"wrote {path} ({results['total_wall_s']} s in all)", flush=True)
    return results


if __name__ == "__main__":
    main()
