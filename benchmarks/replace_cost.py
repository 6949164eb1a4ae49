"""Cost of one live re-placement (`moeload.act.deepspeed.permute_experts`): bytes moved and seconds.

One DeepSpeed MoE layer (GPT-3-small expert shape by default: hidden 768, expert FFN 3072, 16 experts,
top-2) trained one torch Adam step, so the optimizer state exists, then re-placed `--repeats` times with
each plan: `swap` (two experts on different ranks trade places: a hot expert moves off its rank),
`shift` (every expert moves to the next rank: the most a permutation can move). Every move carries
the expert's parameters, `exp_avg` and `exp_avg_sq` (fp32) and its `step` counters (gradients are freed
after the step), and the gate's rows. Run under torch.distributed, one process per EP rank:

    # CPU, gloo
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/replace_cost.py --out /tmp/rc_ep2.json
    # GPUs, NCCL, one GPU per rank
    python -m torch.distributed.run --standalone --nproc_per_node 4 benchmarks/replace_cost.py --device cuda --out /tmp/rc.json
    # one GPU: two ranks share it over gloo; payloads go device -> host -> gloo -> host -> device
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/replace_cost.py --device cuda \
        --backend gloo --grads random --out /tmp/rc_1gpu.json

Every path runs the same code: `permute_experts` with `act._exchange`'s staging where the group is gloo and
the tensors are on a GPU (`--stage` forces it on the CPU too, which the smoke test uses). The host copies'
seconds are reported apart (`stage_ms`: the slowest rank's device->host plus host->device copies).
`--grads random` fills the gradients of the Adam step with random numbers instead of a forward and
backward through the layer (the same tensors move; on one GPU it avoids gloo all-to-alls of device tensors).

Rank 0 prints a table (median and range of the seconds over the repeats, the group's bytes) and writes
--out (JSON). `--tiny` makes a seconds-long smoke run. Without a run, `--figure PNG` plots earlier JSONs:

    python benchmarks/replace_cost.py --figure docs/figures/replace_cost.png docs/cpu-runs/replace_cost_ep*.json
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
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda where torch sees a GPU (not with --tiny), else cpu")
    ap.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                    help="auto: nccl on cuda, gloo on cpu; gloo on cuda lets ranks share one GPU")
    ap.add_argument("--grads", choices=("forward", "random"), default="forward",
                    help="the Adam step's gradients: a forward and backward through the layer, or random")
    ap.add_argument("--stage", action="store_true", help="stage payloads through host memory on the CPU too")
    ap.add_argument("--tiny", action="store_true", help="hidden 32, FFN 64, 4 experts per rank, 2 repeats")
    ap.add_argument("--out", type=Path, help="the JSON this run writes (rank 0)")
    ap.add_argument("--figure", type=Path, help="no run: plot the JSON files given after it into this PNG")
    ap.add_argument("inputs", nargs="*", type=Path, help="with --figure: JSON files of earlier runs")
    a = ap.parse_args(argv)
    if a.figure is None and (a.out is None or a.inputs):
        ap.error("give --out (a run) or --figure PNG with JSON files (a plot)")
    if a.figure is not None and not a.inputs:
        ap.error("--figure: give the JSON files of the runs to plot")
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


def figure(inputs: list[Path], png: Path) -> None:
    """Median seconds of each plan in each run (bars, the range as error bars), the staging copies' share
    darker: one group of bars per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for f in inputs:
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{f}: not a replace_cost.py JSON ({e})") from None
    plans = sorted({r["plan"] for run in runs for r in run["rows"]}, key=["swap", "shift"].index)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w, staged_label = 0.8 / len(plans), "of which host staging"
    for i, run in enumerate(runs):
        rows = {r["plan"]: r for r in run["rows"]}
        for j, name in enumerate(plans):
            r = rows.get(name)
            if r is None:
                continue
            x = i + (j - (len(plans) - 1) / 2) * w
            med, lo, hi = r["median_ms"], r["min_ms"], r["max_ms"]
            ax.bar(x, med, w * 0.9, color=f"C{j}", yerr=[[med - lo], [hi - med]], capsize=3,
                   label=f"{name} ({r['experts_moved']} experts, {r['bytes_total'] / 1e6:.0f} MB)" if i == 0 else None)
            stage = r.get("stage_median_ms", 0.0)
            if stage > 0:
                ax.bar(x, stage, w * 0.9, color="black", alpha=0.35, label=staged_label)
                staged_label = None
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"{run['ranks']} ranks, {run['backend']}\n{run.get('gpu') or run['device']}"
                        + (", staged" if run.get("staged") else "") for run in runs])
    ax.set_yscale("log")
    ax.set_ylabel("one re-placement, ms (median, range)")
    ax.set_title("DeepSpeed MoE, GPT-3-small experts with Adam state", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def setup(a: argparse.Namespace) -> tuple:
    """Join the group -> (torch device, rank, world); one line and exit 2 where the setting cannot run."""
    import deepspeed
    import deepspeed.ops
    import torch
    import torch.distributed as dist

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available() and not a.tiny)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("replace_cost.py: --device cuda, but torch sees no GPU")
    backend = a.backend if a.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise SystemExit("replace_cost.py: --backend nccl needs --device cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("replace_cost.py: run with at least 2 processes (python -m torch.distributed.run --nproc_per_node 2 ...)")
    if backend == "nccl" and world > torch.cuda.device_count():
        raise SystemExit(f"replace_cost.py: NCCL needs one GPU per rank ({world} ranks, {torch.cuda.device_count()} "
                         "GPUs); on fewer GPUs use --backend gloo")
    if not cuda:
        torch.set_num_threads(1)
        deepspeed.ops.__compatible_ops__ = {}  # no C++ op build on a CPU-only torch (the layer needs none)
    if cuda and world > torch.cuda.device_count():
        # ranks share a GPU (gloo): DeepSpeed would bind rank r to cuda:r (device_id out of range), so the
        # group is made here without a device, and init_distributed then finds it initialised
        dist.init_process_group(backend)
    deepspeed.init_distributed(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.figure is not None:
        figure(a.inputs, a.figure)
        return
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE
    from torch import nn

    from moeload.act.deepspeed import expert_to_rank, permute_experts

    device, rank, world = setup(a)
    cuda = device.type == "cuda"
    experts = a.experts if not a.tiny else 4 * world
    if experts % world:
        raise SystemExit(f"--experts {experts}: not a multiple of the {world} ranks")
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(a.hidden, a.ffn), nn.GELU(), nn.Linear(a.ffn, a.hidden))
    layer = MoE(a.hidden, expert, num_experts=experts, ep_size=world, k=2, min_capacity=1, use_rts=False,
                top2_2nd_expert_sampling=False).to(device)
    layer.set_deepspeed_parallelism()  # the EP group, as deepspeed.initialize would make it
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    if a.grads == "forward":
        y, aux, _ = layer(torch.randn(1, a.tokens, a.hidden, device=device))
        (y.pow(2).mean() + 0.01 * aux).backward()
    else:
        for p in layer.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
    opt.step()  # Adam state exists from here on
    opt.zero_grad(set_to_none=True)
    stage = True if a.stage else None  # None: act._exchange stages where the group is gloo and tensors on a GPU
    rows = []
    for name in [p.strip() for p in a.plans.split(",") if p.strip()]:
        secs, stage_secs, moved, total = [], [], 0, 0
        for _ in range(a.repeats):
            new = plan(name, expert_to_rank(layer), world)
            dist.barrier()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            st = permute_experts(layer, new, opt, stage=stage)
            if cuda:
                torch.cuda.synchronize(device)
            # the slowest rank sets the step boundary: max over ranks of (seconds, staging seconds)
            t = torch.tensor([time.perf_counter() - t0, st["stage_seconds"]], dtype=torch.float64,
                             device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            secs.append(float(t[0]))
            stage_secs.append(float(t[1]))
            moved, total = int(st["experts_moved"]), int(st["bytes_total"])
        rows.append({"plan": name, "experts_moved": moved, "bytes_total": total, "seconds": secs,
                     "stage_seconds": stage_secs, "median_ms": 1e3 * statistics.median(secs),
                     "min_ms": 1e3 * min(secs), "max_ms": 1e3 * max(secs),
                     "stage_median_ms": 1e3 * statistics.median(stage_secs)})
    if rank == 0:
        per_expert = sum(p.numel() for p in expert.parameters())
        res = {"ranks": world, "backend": dist.get_backend(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if cuda else None,
               "staged": bool(a.stage) or (cuda and dist.get_backend() == "gloo"), "grads": a.grads,
               "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "deepspeed": deepspeed.__version__, "hidden": a.hidden, "ffn": a.ffn, "experts": experts,
               "params_per_expert": per_expert, "repeats": a.repeats, "rows": rows}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        where = res["gpu"] or device
        print(f"{world} ranks ({res['backend']}, {where}{', staged through the host' if res['staged'] else ''}), "
              f"{experts} experts of {per_expert / 1e6:.2f} M parameters (hidden {a.hidden}, FFN {a.ffn}), "
              "Adam state moved with them")
        print("| plan | experts moved | bytes (group) | median ms | range ms | staging median ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['plan']} | {r['experts_moved']} | {r['bytes_total']:,} | {r['median_ms']:.1f} | "
                  f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['stage_median_ms']:.1f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
