"""Trace DeepSpeed MoE layers with expert parallelism = world size; check the trace against the
script's own counts; write a JSON summary.

    torchrun --nproc_per_node N benchmarks/gpu/ds_ep_trace.py --out ds_ep.json [--no-drop] [--k 2]
    torchrun --nproc_per_node 2 benchmarks/gpu/ds_ep_trace.py --out /tmp/ds.json --device cpu \
        --hidden 16 --experts 4 --tokens 32 --steps 4 --baseline-steps 0      # CPU smoke run (gloo)

Model: `--layers` `deepspeed.moe.layer.MoE` layers (ep_size = N, top-k `--k`, capacity factor
`--capacity`, `--no-drop` for drop_tokens=False), driven by a DeepSpeed engine with
`--micro` gradient-accumulation micro-batches and traced with `moeload.tracing.callbacks.deepspeed.
trace_engine`. Reference: routed counts recomputed from each gate's logits (second expert without
Gumbel sampling), kept counts from the gate's output indices (>= 0), accumulated on the device.
Sync check: `torch.cuda.set_sync_debug_mode(--sync-mode)` only inside the tracer's hooks and
`step()`; DeepSpeed's own step may sync (drop_tokens=False takes a max over exp_counts).
"""

from __future__ import annotations

import torch
from _common import RefCounts, SyncGuard, base_args, check_and_summarize, fresh_trace_path, init, timed_steps
from torch import nn


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--capacity", type=float, default=1.0)
    p.add_argument("--no-drop", action="store_true", help="drop_tokens=False")
    args = p.parse_args()
    rank, world, device = init(args)

    import deepspeed
    import deepspeed.ops

    if device.type == "cpu":
        # CPU smoke run: tell DeepSpeed no C++ op is buildable, else init_distributed compiles its
        # shared-memory allreduce op first (30 s to minutes); gloo does the collectives.
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo")
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import TopKGate

    from moeload.tracing import LoadTracer
    from moeload.tracing.callbacks.deepspeed import trace_engine

    H, E, k, drop = args.hidden, args.experts, args.k, not args.no_drop
    torch.manual_seed(0)  # same weights on every rank

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.moe = nn.ModuleList(
                MoE(H, nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H)), num_experts=E, ep_size=world,
                    k=k, capacity_factor=args.capacity, min_capacity=1, drop_tokens=drop, top2_2nd_expert_sampling=False)
                for _ in range(args.layers))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            aux = 0.0
            for m in self.moe:
                x, l_aux, _ = m(x)
                aux = aux + l_aux
            return x.float().pow(2).mean() + 0.01 * aux

    model = Net()
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": args.micro,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())

    gates = [m.deepspeed_moe.gate for m in model.moe]
    ref = RefCounts(len(gates), E, device)
    for li, g in enumerate(gates):
        def pre(m: TopKGate, a: tuple, li: int = li) -> None:
            logits = torch.nn.functional.linear(a[0].float(), m.wg.weight.float())
            gates_ = logits.softmax(1)
            if m.k == 1:
                idx = gates_.argmax(1)
            elif m.k == 2:
                first = gates_.argmax(1)
                idx = torch.stack([first, logits.scatter(1, first[:, None], float("-inf")).argmax(1)])
            else:
                idx = gates_.topk(m.k, dim=1).indices
            ref.add_indices(li, idx, "routed")
            ref.add_tokens(li, a[0].shape[0])

        g.register_forward_pre_hook(pre)
        g.register_forward_hook(lambda m, a, o, li=li: ref.add_indices(li, o[3], "kept"))

    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)  # different tokens on each rank

    def opt_step() -> None:
        for _ in range(args.micro):
            x = torch.randn(1, args.tokens, H, generator=gen).to(device)
            engine.backward(engine(x))
            engine.step()
        ref.end_step()

    base = timed_steps(args.baseline_steps, opt_step, device)
    guard = SyncGuard(args.sync_mode, device)
    guard.install(LoadTracer)
    trace_path = fresh_trace_path(args.out, rank)
    first = engine.global_steps  # trace steps are numbered by the engine's optimizer steps
    tracing = trace_engine(engine, trace_path, flush_every=args.flush_every)
    guard.wrap_step(tracing.tracer)
    ref.enabled = True
    traced = timed_steps(args.steps, opt_step, device)
    tracing.close()
    s = check_and_summarize(
        args, ref, tracing.tracer, trace_path, world, device, guard,
        {"baseline": base, "traced": traced}, {"deepspeed": deepspeed.__version__, "drop_tokens": drop}, kept=drop,
        first_step=first,
    )
    if s is not None:
        print(f"OK ds_ep_trace: {s['steps']} steps x {world} ranks, ep_size {s['ep_size']}, "
              f"gpu max/mean {['%.3f' % v for v in s['gpu_max_over_mean']]}, kept {s['kept_fraction']}, "
              f"sync {s['sync_check']}, ms/step {s['timing_ms_per_step']} -> {args.out}")
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
