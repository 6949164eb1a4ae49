"""Cost of one live re-placement (`moeload.act.deepspeed.permute_experts`): bytes moved and seconds.

One DeepSpeed MoE layer (GPT-3-small expert shape by default: hidden 768, expert FFN 3072, 16 experts,
top-2) trained one Adam step, so the optimizer state exists, then re-placed `--repeats` times with
each plan: `swap` (two experts on different ranks trade places: a hot expert moves off its rank),
`shift` (every expert moves to the next rank: the most a permutation can move). Every move carries
the expert's parameters, gradients, `exp_avg` and `exp_avg_sq` (fp32) and the gate's rows. Run under
torch.distributed, one process per EP rank (gloo on CPU; NCCL on GPUs, one per rank):

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/replace_cost.py --out /tmp/replace_cost_ep2.json
    python -m torch.distributed.run --nproc_per_node 4 benchmarks/replace_cost.py --out /tmp/replace_cost_ep4.json

Rank 0 prints a table (median and range of the seconds over the repeats, the group's bytes) and writes
--out (JSON). `--tiny` makes a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plans", default="swap,shift")
    ap.add_argument("--tiny", action="store_true", help="hidden 32, FFN 64, 4 experts per rank, 2 repeats")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.tiny:
        a.hidden, a.ffn, a.tokens, a.repeats = 32, 64, 64, 2
    return a


def plan(name: str, current: list[int], ep_size: int) -> list[int]:
    """The next map [E] from `current` for plan `name` (always a valid, balanced map)."""
    new = list(current)
    if name == "shift":
        return [(r + 1) % ep_size for r in current]
    if name == "swap":  # the first expert of rank 0 and the first expert of rank 1 trade places
        a = next(e for e, r in enumerate(current) if r == 0)
        b = next(e for e, r in enumerate(current) if r == 1)
        new[a], new[b] = current[b], current[a]
        return new
    raise SystemExit(f"--plans: unknown plan {name!r} (swap, shift)")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import deepspeed
    import deepspeed.ops
    import torch
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    from torch import nn

    from moeload.act.deepspeed import expert_to_rank, permute_experts

    cuda = torch.cuda.is_available() and os.environ.get("LOCAL_RANK") is not None and not a.tiny
    if not cuda:
        torch.set_num_threads(1)
        deepspeed.ops.__compatible_ops__ = {}  # no C++ op build on a CPU-only torch
    deepspeed.init_distributed("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("replace_cost.py: run with at least 2 processes (python -m torch.distributed.run --nproc_per_node 2 ...)")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    experts = a.experts if not a.tiny else 4 * world
    if experts % world:
        raise SystemExit(f"--experts {experts}: not a multiple of the {world} ranks")
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(a.hidden, a.ffn), nn.GELU(), nn.Linear(a.ffn, a.hidden))
    layer = MoE(a.hidden, expert, num_experts=experts, ep_size=world, k=2, min_capacity=1, use_rts=False,
                top2_2nd_expert_sampling=False)
    cfg = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True, "adam_w_mode": True}}}
    engine = deepspeed.initialize(model=layer, config=cfg, model_parameters=layer.parameters())[0]
    x = torch.randn(1, a.tokens, a.hidden, device=device)
    y, aux, _ = engine(x)
    engine.backward(y.pow(2).mean() + 0.01 * aux)
    engine.step()  # Adam state exists from here on
    rows = []
    for name in [p.strip() for p in a.plans.split(",") if p.strip()]:
        secs, moved, total = [], 0, 0
        for _ in range(a.repeats):
            new = plan(name, expert_to_rank(engine.module), world)
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            st = permute_experts(engine.module, new, engine)
            if cuda:
                torch.cuda.synchronize()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step boundary
            secs.append(float(t))
            moved, total = int(st["experts_moved"]), int(st["bytes_total"])
        rows.append({"plan": name, "experts_moved": moved, "bytes_total": total, "seconds": secs,
                     "median_ms": 1e3 * statistics.median(secs), "min_ms": 1e3 * min(secs), "max_ms": 1e3 * max(secs)})
    if rank == 0:
        per_expert = sum(p.numel() for p in expert.parameters())
        res = {"ranks": world, "backend": dist.get_backend(), "device": str(device),
               "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "hidden": a.hidden, "ffn": a.ffn, "experts": experts,
               "params_per_expert": per_expert, "repeats": a.repeats, "rows": rows}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        print(f"{world} ranks ({res['backend']}, {device}), {experts} experts of {per_expert / 1e6:.2f} M parameters "
              f"(hidden {a.hidden}, FFN {a.ffn}), Adam state moved with them")
        print("| plan | experts moved | bytes (group) | median ms | range ms |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['plan']} | {r['experts_moved']} | {r['bytes_total']:,} | {r['median_ms']:.1f} | "
                  f"{r['min_ms']:.1f}-{r['max_ms']:.1f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
