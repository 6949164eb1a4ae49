"""Cost of one live re-placement (`moeload.act.deepspeed.permute_experts`, `moeload.act.megatron.permute_experts`):
bytes moved and seconds.

One MoE layer (GPT-3-small expert shape by default: hidden 768, expert FFN 3072, 16 experts, top-2; a
DeepSpeed `MoE`, or with `--framework megatron` a megatron-core `MoELayer` with SequentialMLP experts,
expert-model-parallel size = world size) trained one torch Adam step, so the optimizer state exists, then re-placed `--repeats` times with
each plan: `swap` (two experts on different ranks trade places: a hot expert moves off its rank),
`shift` (every expert moves to the next rank: the most a permutation can move). Every move carries
the expert's parameters, `exp_avg` and `exp_avg_sq` (fp32) and its `step` counters (gradients are freed
after the step), and the gate's rows. Run under torch.distributed, one process per EP rank:

    # megatron-core on CPU, gloo (the CUDA-only calls shimmed by tests/tracing/_shims.py's megatron_on_cpu)
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/replace_cost.py --framework megatron \
        --out /tmp/rc_megatron.json

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

megatron-core: the experts carry no biases (add_bias_linear=False; megatron 0.16's expert MLP fails on CPU
with them), so an expert holds 2 x hidden x FFN parameters and two `step` counters; each logical expert gets
its own weights (0.02 x N(0, 1), seeded by its index). The dispatcher is alltoall over NCCL, allgather over
gloo. With `--grads forward`, the layer's output on a fixed input is compared before the first and after the
last re-placement ("output_max_rel_diff": max |after - before| / max |before| over ranks; the function must
not change). On CUDA (megatron-core 0.16 or 0.19) this path has not run.

Rank 0 prints a table (median and range of the seconds over the repeats, the group's bytes) and writes
--out (JSON). `--tiny` makes a seconds-long smoke run. Without a run, `--figure PNG` plots earlier JSONs:

    python benchmarks/replace_cost.py --figure docs/figures/replace_cost.png docs/cpu-runs/replace_cost_ep*.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=("deepspeed", "megatron"), default="deepspeed",
                    help="the MoE layer: DeepSpeed MoE or megatron-core MoELayer (SequentialMLP experts)")
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
    frameworks = [run.get("framework", "deepspeed") for run in runs]  # JSONs of DeepSpeed runs have no "framework"
    ax.set_xticklabels([("megatron-core, " if fw == "megatron" else "") + f"{run['ranks']} ranks, {run['backend']}\n"
                        f"{run.get('gpu') or run['device']}" + (", staged" if run.get("staged") else "")
                        for fw, run in zip(frameworks, runs)])
    ax.set_yscale("log")
    ax.set_ylabel("one re-placement, ms (median, range)")
    layers = "DeepSpeed MoE" if set(frameworks) == {"deepspeed"} else "MoE layers"
    ax.set_title(f"{layers}, GPT-3-small experts with Adam state", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def setup(a: argparse.Namespace) -> tuple:
    """Join the group (and, for megatron-core, its expert-parallel group = the world) -> (torch device, rank,
    world); one line and exit 2 where the setting cannot run."""
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
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if a.framework == "megatron":
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        with warnings.catch_warnings():  # megatron-core warns at import about missing Transformer Engine / Apex
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state
            from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401
            from megatron.core.transformer.moe import moe_layer  # noqa: F401
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=dist.get_world_size())
        return device, dist.get_rank(), dist.get_world_size()
    import deepspeed
    import deepspeed.ops

    if not cuda:
        deepspeed.ops.__compatible_ops__ = {}  # no C++ op build on a CPU-only torch (the layer needs none)
    if cuda and world > torch.cuda.device_count():
        # ranks share a GPU (gloo): DeepSpeed would bind rank r to cuda:r (device_id out of range), so the
        # group is made here without a device, and init_distributed then finds it initialised
        dist.init_process_group(backend)
    deepspeed.init_distributed(backend)
    if cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def megatron_on_cpu() -> contextlib.AbstractContextManager[None]:
    """tests/tracing/_shims.py's `megatron_on_cpu` (the test suite's shims of the CUDA-only calls megatron-core
    makes; that module imports only the standard library and torch)."""
    shims = str(ROOT / "tests" / "tracing")
    if shims not in sys.path:
        sys.path.insert(0, shims)
    from _shims import megatron_on_cpu as shimmed

    return shimmed()


def deepspeed_layer(a: argparse.Namespace, device: Any, world: int, experts: int) -> tuple:
    """A DeepSpeed MoE layer on `device` in its EP group -> (layer, parameters per expert, input shape,
    forward(x) -> (output, aux loss))."""
    from deepspeed.moe.layer import MoE
    from torch import nn

    expert = nn.Sequential(nn.Linear(a.hidden, a.ffn), nn.GELU(), nn.Linear(a.ffn, a.hidden))
    layer = MoE(a.hidden, expert, num_experts=experts, ep_size=world, k=2, min_capacity=1, use_rts=False,
                top2_2nd_expert_sampling=False).to(device)
    layer.set_deepspeed_parallelism()  # the EP group, as deepspeed.initialize would make it

    def forward(x: Any) -> tuple:
        y, aux, _ = layer(x)
        return y, aux

    return layer, sum(p.numel() for p in expert.parameters()), (1, a.tokens, a.hidden), forward


def megatron_layer(a: argparse.Namespace, device: Any, rank: int, world: int, experts: int) -> tuple:
    """A megatron-core MoELayer (SequentialMLP experts, EP over the world, fp32, no biases) on `device`; logical
    expert e's weights are 0.02 x N(0, 1) from seed e -> (layer, parameters per expert, input shape,
    forward(x) -> (output, 0: the aux loss reaches the backward through megatron's MoEAuxLossAutoScaler))."""
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    cuda = device.type == "cuda"
    if cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(123)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TransformerConfig(
            num_layers=1, hidden_size=a.hidden, num_attention_heads=1, ffn_hidden_size=a.ffn,
            num_moe_experts=experts, expert_model_parallel_size=world, moe_router_topk=2,
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
            moe_token_dispatcher_type="alltoall" if dist.get_backend() == "nccl" else "allgather",
            add_bias_linear=False, use_cpu_initialization=not cuda, params_dtype=torch.float32)
        mlp = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False).submodules.mlp
        if callable(mlp) and not hasattr(mlp, "submodules"):  # >= 0.19: functools.partial(MoELayer, ...)
            layer = mlp(config=cfg, layer_number=1)
        else:  # <= 0.16: a ModuleSpec
            layer = MoELayer(config=cfg, submodules=mlp.submodules, layer_number=1)
    layer.set_layer_number(1)
    layer = layer.to(device)
    local = list(layer.experts.local_experts)
    with torch.no_grad():  # CPU init draws the same local experts on every rank: give each logical expert its own
        for j, ex in enumerate(local):
            g = torch.Generator().manual_seed(rank * len(local) + j)
            for p in ex.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))

    def forward(x: Any) -> tuple:
        return layer(x)[0], 0.0

    return layer, sum(p.numel() for p in local[0].parameters()), (a.tokens, 1, a.hidden), forward


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.figure is not None:
        figure(a.inputs, a.figure)
        return
    device, rank, world = setup(a)
    shims = megatron_on_cpu() if a.framework == "megatron" and device.type == "cpu" else contextlib.nullcontext()
    with shims:
        measure(a, device, rank, world)


def measure(a: argparse.Namespace, device: Any, rank: int, world: int) -> None:
    """Build the layer, take one Adam step, time the plans; rank 0 prints the table and writes --out."""
    import torch
    import torch.distributed as dist

    if a.framework == "megatron":
        import megatron.core
        from megatron.core import parallel_state

        from moeload.act.megatron import expert_to_rank, permute_experts
    else:
        import deepspeed

        from moeload.act.deepspeed import expert_to_rank, permute_experts

    cuda = device.type == "cuda"
    experts = a.experts if not a.tiny else 4 * world
    if experts % world:
        raise SystemExit(f"--experts {experts}: not a multiple of the {world} ranks")
    torch.manual_seed(0)
    if a.framework == "megatron":
        layer, per_expert, shape, forward = megatron_layer(a, device, rank, world, experts)
    else:
        layer, per_expert, shape, forward = deepspeed_layer(a, device, world, experts)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    if a.grads == "forward":
        y, aux = forward(torch.randn(*shape, device=device))
        (y.pow(2).mean() + 0.01 * aux).backward()
    else:
        for p in layer.parameters():
            p.grad = 1e-3 * torch.randn_like(p)
    opt.step()  # Adam state exists from here on
    opt.zero_grad(set_to_none=True)
    check = a.framework == "megatron" and a.grads == "forward"  # the function before and after, on a fixed input
    if check:
        x_check = torch.randn(*shape, device=device)
        with torch.no_grad():
            y_before = forward(x_check)[0]
    reduce_on = device if dist.get_backend() == "nccl" else "cpu"
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
            t = torch.tensor([time.perf_counter() - t0, st["stage_seconds"]], dtype=torch.float64, device=reduce_on)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            secs.append(float(t[0]))
            stage_secs.append(float(t[1]))
            moved, total = int(st["experts_moved"]), int(st["bytes_total"])
        rows.append({"plan": name, "experts_moved": moved, "bytes_total": total, "seconds": secs,
                     "stage_seconds": stage_secs, "median_ms": 1e3 * statistics.median(secs),
                     "min_ms": 1e3 * min(secs), "max_ms": 1e3 * max(secs),
                     "stage_median_ms": 1e3 * statistics.median(stage_secs)})
    checked: dict = {}
    if a.framework == "megatron":
        rel = None
        if check:
            with torch.no_grad():
                d = (forward(x_check)[0] - y_before).abs().max() / y_before.abs().max()
            d = d.to(device=reduce_on, dtype=torch.float64).reshape(1)
            dist.all_reduce(d, op=dist.ReduceOp.MAX)
            rel = float(d[0])
        checked = {"output_max_rel_diff": rel}
    if rank == 0:
        versions = ({"framework": "megatron", "megatron_core": megatron.core.__version__} if a.framework == "megatron"
                    else {"deepspeed": deepspeed.__version__})
        res = {"ranks": world, "backend": dist.get_backend(), "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if cuda else None,
               "staged": bool(a.stage) or (cuda and dist.get_backend() == "gloo"), "grads": a.grads,
               "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               **versions, "hidden": a.hidden, "ffn": a.ffn, "experts": experts,
               "params_per_expert": per_expert, "repeats": a.repeats, **checked, "rows": rows}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        where = res["gpu"] or device
        print(("megatron-core MoELayer (SequentialMLP), " if a.framework == "megatron" else "")
              + f"{world} ranks ({res['backend']}, {where}{', staged through the host' if res['staged'] else ''}), "
              f"{experts} experts of {per_expert / 1e6:.2f} M parameters (hidden {a.hidden}, FFN {a.ffn}), "
              "Adam state moved with them")
        print("| plan | experts moved | bytes (group) | median ms | range ms | staging median ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['plan']} | {r['experts_moved']} | {r['bytes_total']:,} | {r['median_ms']:.1f} | "
                  f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['stage_median_ms']:.1f} |")
        if checked.get("output_max_rel_diff") is not None:
            print(f"output on a fixed input, after vs before: max |diff| / max |before| = "
                  f"{checked['output_max_rel_diff']:.1e} (worst rank)")
    dist.barrier()
    if a.framework == "megatron":
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
