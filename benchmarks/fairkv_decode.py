"""Decode attention of FairKV head plans at 70B-class geometry, each TP rank's share timed in turn.

One device plays every tensor-parallel rank in turn. Per-head KV lengths come from Ada-KV budgets
(--budgets FILE.npy, [L, H_kv] or [H_kv], e.g. from `fairkv_heads.py --save-budgets`) or are
synthetic (--skew s: lognormal(0, s) per KV head); each layer is scaled to keep --kv-mean keys per
KV head on average (at least 1 each, the layer's total exact). Every KV head serves --batch decode
requests (--jitter s: each request's length times lognormal(0, s)). For TP = 2, 4, 8 and each
strategy of `moeload.placement.heads.head_plans` (standard TP, best-effort, Fair-Copying, balanced,
exact), planned on each head's total KV over the batch, a copied head's requests are split between
its copies in whole requests (`split_requests`; copies take contiguous request ids in slot order).
A rank's share of a layer is the KV of its (request, KV head) pairs plus, per pair, one decode query
for each of the head's --q-heads / --kv-heads GQA query heads; it runs as one attention call:

  nested  SDPA on nested (jagged) tensors: one sequence per pair; the group's query heads are its
          query positions (decode has no mask, so a GQA group equals that many queries on one head)
  flex    FlexAttention: queries [pairs, group, 1, d] with enable_gqa over KV padded to the rank's
          longest pair, a block mask of each pair's length; torch.compile(dynamic=True) on CUDA
  dense   one SDPA call (enable_gqa) per slot, a head's requests batched (needs --jitter 0)

Step time = sum over layers of the slowest rank's time (ranks meet at each layer's all-reduce).
On CUDA each call is timed alone with CUDA events after an L2 flush, median of --iters. --check
(default) compares every kernel's output with a per-pair SDPA loop on the first layer. Prints a
table (measured vs simulated speedup over standard TP) and writes --out (JSON).

    python benchmarks/fairkv_decode.py --skew 0.5 --kernel nested,flex --out fairkv_decode.json
    python benchmarks/fairkv_decode.py --device cpu --tiny --out /tmp/fairkv_decode.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ("nested", "flex", "dense")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run")
    ap.add_argument("--budgets", type=Path, help="[L, H_kv] or [H_kv] per-head budgets (.npy)")
    ap.add_argument("--skew", type=float, default=0.5, help="synthetic: lognormal sigma of head lengths")
    ap.add_argument("--layers", type=int, default=4, help="synthetic: layers (distinct budget rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--q-heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-mean", type=int, default=8192, help="mean compressed KV length per KV head")
    ap.add_argument("--batch", type=int, default=64, help="decode requests (each served by every KV head)")
    ap.add_argument("--jitter", type=float, default=0.0, help="lognormal sigma of per-request lengths")
    ap.add_argument("--tp", default="2,4,8", help="comma-separated TP sizes")
    ap.add_argument("--kernel", default="nested,flex", help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--extra-per-gpu", type=int, default=1, help="copy slots per rank (Fair-Copying, ...)")
    ap.add_argument("--exact-time-limit", type=float, default=5.0, help="MILP seconds per layer; 0 leaves exact out")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager FlexAttention on CUDA too")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the output check")
    args = ap.parse_args(argv)
    if args.tiny:
        args.q_heads, args.kv_heads, args.head_dim = 16, 8, 16
        args.kv_mean, args.batch, args.layers = 24, 3, 2
        args.iters, args.warmup, args.exact_time_limit = 1, 0, min(args.exact_time_limit, 2.0)
    args.tp = [int(x) for x in str(args.tp).split(",")]
    args.kernel = [k.strip() for k in str(args.kernel).split(",")]
    for name, ok in (("--kernel", set(args.kernel) <= set(KERNELS)),
                     ("--q-heads", args.q_heads % args.kv_heads == 0),
                     ("--kv-mean", args.kv_mean >= 1), ("--batch", args.batch >= 1),
                     ("--tp", all(args.kv_heads % t == 0 for t in args.tp)),
                     ("--jitter", args.jitter == 0 or "dense" not in args.kernel)):
        if not ok:
            ap.error(f"{name}: not usable with kernels {args.kernel}, q/kv heads {args.q_heads}/{args.kv_heads}, "
                     f"TP {args.tp}, kv-mean {args.kv_mean}, batch {args.batch}, jitter {args.jitter}")
    return args


def scale_lengths(budgets: np.ndarray, mean: int) -> np.ndarray:
    """`budgets: [L, H]` (or [H]) >= 0 -> int64 `[L, H]` >= 1, each row summing to exactly `mean * H`.

    Each head keeps 1 key, and the rest of the layer's total is shared in proportion to its budget
    by largest remainders.
    """
    b = np.atleast_2d(np.asarray(budgets, dtype=np.float64))
    if b.ndim != 2 or not np.all(np.isfinite(b)) or np.any(b < 0) or np.any(b.sum(1) <= 0):
        raise SystemExit(f"budgets: expected non-negative [L, H] with a positive sum per layer, got shape {b.shape}")
    spare = (mean - 1) * b.shape[1]
    exact = b / b.sum(1, keepdims=True) * spare
    out = np.floor(exact).astype(np.int64)
    for row in range(b.shape[0]):
        missing = spare - int(out[row].sum())
        out[row, np.argsort(-(exact[row] - out[row]), kind="stable")[:missing]] += 1
    return out + 1


def head_lengths(args) -> np.ndarray:
    """[L, H_kv] KV length of each head: from --budgets, else synthetic with --skew."""
    if args.budgets is not None:
        budgets = np.atleast_2d(np.load(args.budgets))
        if budgets.shape[-1] != args.kv_heads:
            raise SystemExit(f"{args.budgets}: {budgets.shape[-1]} heads per layer, expected --kv-heads {args.kv_heads}")
    else:
        budgets = np.random.default_rng(args.seed).lognormal(0.0, args.skew, size=(args.layers, args.kv_heads))
    return scale_lengths(budgets, args.kv_mean)


def request_lengths(lengths: np.ndarray, batch: int, jitter: float, seed: int) -> np.ndarray:
    """`lengths: [L, H]` -> `[L, batch, H]` int64 >= 1 KV length of each request at each head."""
    per_request = np.broadcast_to(lengths[:, None, :], (lengths.shape[0], batch, lengths.shape[1]))
    if jitter == 0:
        return per_request.copy()
    noise = np.random.default_rng(seed + 1).lognormal(0.0, jitter, size=per_request.shape)
    return np.maximum(np.rint(per_request * noise), 1).astype(np.int64)


def rank_pairs(pl, per_slot: np.ndarray, req_len: np.ndarray, layer: int) -> list[list[tuple[int, np.ndarray]]]:
    """Per rank: its slots in order as (head, KV lengths of the requests that copy serves).

    A head's copies take contiguous request ids in slot order, so every request of every head is
    served exactly once. per_slot: [L, R] (`split_requests`); req_len: [L, B, H].
    """
    first = np.zeros(pl.num_experts, dtype=np.int64)
    out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(pl.num_gpus)]
    for slot, head in enumerate(pl.phy2log[layer]):
        n = int(per_slot[layer, slot])
        out[int(pl.slot_gpu[slot])].append((int(head), req_len[layer, first[head] : first[head] + n, head]))
        first[head] += n
    return out


class Share:
    """One rank's share of one layer in packed form: q [P, group, d], k, v [sum of lengths, d]."""

    def __init__(self, torch, slots: list[tuple[int, np.ndarray]], group: int, head_dim: int, device, dtype):
        self.torch, self.device = torch, device
        self.slots = [(h, lens) for h, lens in slots if lens.size]
        lens = np.concatenate([x for _, x in self.slots]) if self.slots else np.zeros(0, np.int64)
        self.lens, self.pairs, self.keys = lens, int(lens.size), int(lens.sum())
        self.offsets = torch.tensor(np.r_[0, np.cumsum(lens)], dtype=torch.int64, device=device)
        self.q = torch.randn(self.pairs, group, head_dim, device=device, dtype=dtype)
        self.k = torch.randn(self.keys, head_dim, device=device, dtype=dtype)
        self.v = torch.randn(self.keys, head_dim, device=device, dtype=dtype)

    def reference(self) -> object:
        """[P, group, d] float32 output: one SDPA call per pair."""
        f = self.torch.nn.functional.scaled_dot_product_attention
        o = self.offsets.tolist()
        return self.torch.stack([f(self.q[i].float()[None], self.k[o[i]:o[i + 1]].float()[None],
                                   self.v[o[i]:o[i + 1]].float()[None])[0] for i in range(self.pairs)])


def nested_call(torch, s: Share):
    """SDPA over nested jagged tensors: sequence i = pair i, its `group` queries over its keys."""
    f = torch.nn.functional.scaled_dot_product_attention
    group, d = s.q.shape[1], s.q.shape[2]
    q_off = torch.arange(0, s.pairs * group + 1, group, device=s.device)
    q = torch.nested.nested_tensor_from_jagged(s.q.reshape(-1, 1, d), q_off, min_seqlen=group,
                                               max_seqlen=group).transpose(1, 2)
    kv = dict(offsets=s.offsets, min_seqlen=int(s.lens.min()), max_seqlen=int(s.lens.max()))
    k = torch.nested.nested_tensor_from_jagged(s.k[:, None], **kv).transpose(1, 2)
    v = torch.nested.nested_tensor_from_jagged(s.v[:, None], **kv).transpose(1, 2)

    def call():
        return f(q, k, v)

    return call, lambda o: o.transpose(1, 2).values().reshape(s.pairs, group, d)


def flex_call(torch, s: Share, flex):
    """FlexAttention with GQA: q [P, group, 1, d], k, v [P, 1, Lpad, d], mask kv < length of pair."""
    from torch.nn.attention.flex_attention import create_block_mask

    group, d = s.q.shape[1], s.q.shape[2]
    lpad = -(-int(s.lens.max()) // 128) * 128
    lengths = torch.tensor(s.lens, device=s.device)
    pair = torch.repeat_interleave(torch.arange(s.pairs, device=s.device), lengths)
    pos = torch.arange(s.keys, device=s.device) - s.offsets[pair]
    k = s.k.new_zeros(s.pairs, lpad, d)
    v = s.v.new_zeros(s.pairs, lpad, d)
    k[pair, pos], v[pair, pos] = s.k, s.v
    k, v, q = k[:, None], v[:, None], s.q[:, :, None]

    def mask(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    block_mask = create_block_mask(mask, s.pairs, None, 1, lpad, device=s.device)

    def call():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    return call, lambda o: o.reshape(s.pairs, group, d)


def dense_call(torch, s: Share):
    """One SDPA call per slot: [n, group, 1, d] queries (enable_gqa) over [n, 1, length, d]."""
    f = torch.nn.functional.scaled_dot_product_attention
    group, d = s.q.shape[1], s.q.shape[2]
    parts, first, key = [], 0, 0
    for _, lens in s.slots:
        n, length = lens.size, int(lens[0])
        q = s.q[first : first + n, :, None]
        k = s.k[key : key + n * length].view(n, 1, length, d)
        v = s.v[key : key + n * length].view(n, 1, length, d)
        parts.append((q, k, v))
        first, key = first + n, key + n * length

    def call():
        return [f(q, k, v, enable_gqa=True) for q, k, v in parts]

    return call, lambda o: torch.cat([x.reshape(-1, group, d) for x in o])


def build(torch, kernel: str, share: Share, flex):
    """(call, unpack): `call()` runs the kernel on `share`; `unpack(out)` -> [P, group, d]."""
    if kernel == "nested":
        return nested_call(torch, share)
    if kernel == "flex":
        return flex_call(torch, share, flex)
    return dense_call(torch, share)


class Timer:
    """Median ms of one call: CUDA events after an L2 flush, or perf_counter on CPU."""

    def __init__(self, torch, device, iters: int, warmup: int):
        self.torch, self.cuda, self.iters, self.warmup = torch, device.type == "cuda", iters, warmup
        self.flush = torch.empty(512 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, call) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            call()
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            return float(np.median(times))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.iters)]
        torch.cuda.synchronize()
        for a, b in events:
            self.flush.zero_()
            a.record()
            call()
            b.record()
        torch.cuda.synchronize()
        return float(np.median([a.elapsed_time(b) for a, b in events]))


def run(args) -> dict:
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from moeload.placement.heads import head_plans, rank_slots, split_requests

    device = torch.device(args.device)
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and far faster on shared cores
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flex = flex_attention
    if device.type == "cuda" and not args.no_compile:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        flex = torch.compile(flex_attention, dynamic=True)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.manual_seed(args.seed)
    group = args.q_heads // args.kv_heads
    lengths = head_lengths(args)  # [L, H]
    req_len = request_lengths(lengths, args.batch, args.jitter, args.seed)  # [L, B, H]
    weight = req_len.sum(axis=1).astype(np.float64)  # [L, H] each head's KV over the batch
    timer = Timer(torch, device, args.iters, args.warmup)
    elem = torch.empty(0, dtype=dtype).element_size()
    limit = args.exact_time_limit if args.exact_time_limit > 0 else None
    rows: list[dict] = []
    max_err = dict.fromkeys(args.kernel, 0.0)
    errors: dict[str, str] = {}  # kernel -> first failure
    for tp in args.tp:
        plans = head_plans(weight, tp, extra_per_gpu=args.extra_per_gpu, exact_time_limit=limit)
        for name, pl in plans.items():
            per_slot = split_requests(pl, args.batch)
            ms = {k: np.zeros((pl.num_layers, tp)) for k in args.kernel}
            work = np.zeros((pl.num_layers, tp), dtype=np.int64)
            pairs = np.zeros((pl.num_layers, tp), dtype=np.int64)
            for layer in range(pl.num_layers):
                for rank, slots in enumerate(rank_pairs(pl, per_slot, req_len, layer)):
                    share = Share(torch, slots, group, args.head_dim, device, dtype)
                    work[layer, rank], pairs[layer, rank] = share.keys, share.pairs
                    if not share.pairs:
                        continue
                    ref = share.reference() if args.check and layer == 0 else None
                    for kernel in args.kernel:
                        if kernel in errors:
                            continue
                        try:
                            call, unpack = build(torch, kernel, share, flex)
                            if ref is not None:
                                out = unpack(call()).float()
                                if out.shape != ref.shape:
                                    raise RuntimeError(f"output {tuple(out.shape)}, expected {tuple(ref.shape)}")
                                max_err[kernel] = max(max_err[kernel], float((out - ref).abs().max()))
                            ms[kernel][layer, rank] = timer(call)
                        except Exception as e:  # one kernel failing must not cost the others' numbers
                            errors[kernel] = f"TP {tp} {name} layer {layer} rank {rank}: {type(e).__name__}: {e}"[:800]
                            print(f"kernel {kernel} failed, skipped from here on: {errors[kernel]}", file=sys.stderr)
                    del share
            sim = pl.gpu_load  # [L, G] simulator: planned loads, fractional split
            for kernel in args.kernel:
                ok = kernel not in errors
                rows.append({
                    "tp": tp, "strategy": name, "kernel": kernel, "slots": pl.num_replicas,
                    "step_ms": float(ms[kernel].max(axis=1).sum()) if ok else None,
                    "rank_ms": ms[kernel].tolist() if ok else None,
                    "rank_work": work.tolist(), "rank_pairs": pairs.tolist(), "sim_rank_load": sim.tolist(),
                    "rank_slots": rank_slots(pl, per_slot).tolist(),
                    "total_work": int(work.sum()), "imbalance": float(pl.imbalance.mean()),
                    "work_imbalance": float((work.max(1) / work.mean(1)).mean()),
                    "max_rank_kv_gb": float(work.max(1).sum() * 2 * args.head_dim * elem / 1e9),
                    "sim_step_load": float(sim.max(axis=1).sum()), "work_step": int(work.max(axis=1).sum()),
                })
    for r in rows:
        base = next(b for b in rows if b["tp"] == r["tp"] and b["kernel"] == r["kernel"] and b["strategy"] == "standard")
        r["predicted_speedup"] = base["sim_step_load"] / r["sim_step_load"]
        r["work_speedup"] = base["work_step"] / r["work_step"]
        r["measured_speedup"] = base["step_ms"] / r["step_ms"] if r["step_ms"] and base["step_ms"] else None
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "config": config,
        "flex_compiled": flex is not flex_attention, "group": group, "kv_lengths": lengths.tolist(),
        "check_max_abs_err": max_err if args.check else None, "kernel_errors": errors, "rows": rows,
    }


def table(results: dict) -> str:
    lines = ["| TP | strategy | kernel | slots | sim max/mean | predicted speedup | measured speedup | step ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        measured = "failed" if r["step_ms"] is None else f"{r['measured_speedup']:.3f} | {r['step_ms']:.3f}"
        lines.append(f"| {r['tp']} | {r['strategy']} | {r['kernel']} | {r['slots']} | {r['imbalance']:.3f} | "
                     f"{r['predicted_speedup']:.3f} | {measured} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"{results['device']}, torch {results['torch']}, {results['dtype']}, flex compiled: "
          f"{results['flex_compiled']}, output check max |err|: {results['check_max_abs_err']}")
    print(table(results))
    print(f"wrote {args.out} in {results['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
