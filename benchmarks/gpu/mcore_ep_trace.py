"""Trace megatron-core MoELayers with expert parallelism = world size; check the trace against the
script's own counts; write a JSON summary.

    torchrun --nproc_per_node N benchmarks/gpu/mcore_ep_trace.py --out mcore_ep.json [--dispatcher alltoall]
    torchrun --nproc_per_node 2 benchmarks/gpu/mcore_ep_trace.py --out /tmp/mc.json --device cpu \
        --hidden 16 --experts 4 --tokens 32 --steps 4 --baseline-steps 0      # CPU smoke run (gloo)

Model: `--layers` `MoELayer`s built from the GPT local layer spec (a `ModuleSpec` up to 0.16, a
`functools.partial` from 0.19), expert-model-parallel size N, fp32, `--micro` micro-batches per
optimizer step (plain torch Adam), traced with `LoadTracer` (auto-discovered `TopKRouter`s).
`--capacity` sets moe_expert_capacity_factor: the router's map is then taken after dropping and
the trace holds kept counts. Reference: per router forward, the top-k of the logits recomputed from
the router's input (`torch.mm` as megatron does), intersected with the returned routing map.
Sync check: `torch.cuda.set_sync_debug_mode(--sync-mode)` only inside the tracer's hooks and step().
"""

from __future__ import annotations

import warnings

import torch
from _common import RefCounts, SyncGuard, base_args, check_and_summarize, fresh_trace_path, init, timed_steps
from torch import nn


def cpu_shims() -> None:
    """CPU smoke mode only (the same shims as tests/tracing/_shims.py): megatron moves the router
    weight to torch.cuda.current_device() and, in 0.16, reads te_general_gemm, defined only with
    Transformer Engine."""
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def main() -> None:
    p = base_args(__doc__.splitlines()[0])
    p.add_argument("--capacity", type=float, default=None, help="moe_expert_capacity_factor (default: no dropping)")
    p.add_argument("--dispatcher", default=None, choices=["alltoall", "allgather"],
                   help="token dispatcher (default: alltoall on cuda, allgather on cpu)")
    args = p.parse_args()
    rank, world, device = init(args)
    dist = torch.distributed
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core
        from megatron.core import parallel_state
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig
    if device.type == "cpu":
        cpu_shims()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(123)
    torch.manual_seed(0)

    from moeload.tracing import LoadTracer

    H, E, k = args.hidden, args.experts, args.k
    disp = args.dispatcher or ("alltoall" if device.type == "cuda" else "allgather")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TransformerConfig(
            num_layers=args.layers, hidden_size=H, num_attention_heads=8 if H % 8 == 0 else 2, ffn_hidden_size=4 * H,
            num_moe_experts=E, moe_router_topk=k, moe_router_pre_softmax=k == 1, moe_token_dispatcher_type=disp,
            moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss", moe_expert_capacity_factor=args.capacity,
            add_bias_linear=False, use_cpu_initialization=device.type == "cpu", params_dtype=torch.float32,
        )
        mlp = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
        layers = []
        for i in range(args.layers):
            if callable(mlp) and not hasattr(mlp, "submodules"):  # >= 0.19: functools.partial(MoELayer, ...)
                layer = mlp(config=cfg, layer_number=i + 1)
            else:  # <= 0.16: a ModuleSpec
                layer = MoELayer(config=cfg, submodules=mlp.submodules, layer_number=i + 1)
            layer.set_layer_number(i + 1)
            layers.append(layer)
    model = nn.ModuleList(layers).to(device)

    ref = RefCounts(len(layers), E, device)
    for li, layer in enumerate(layers):
        sel: dict[str, torch.Tensor] = {}

        def pre(m, a, li=li, sel=sel):
            x = a[0].reshape(-1, H)
            logits = torch.mm(x.float(), m.weight.float().t())
            idx = logits.topk(k, dim=-1).indices
            sel["mask"] = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)
            ref.add_indices(li, idx, "kept")  # before any dropping: reported, not compared
            ref.add_tokens(li, x.shape[0])

        def post(m, a, o, li=li, sel=sel):
            ref.add_counts(li, (o[1].bool() & sel["mask"]).sum(0), "routed")  # what the trace should hold

        layer.router.register_forward_pre_hook(pre)
        layer.router.register_forward_hook(post)

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)

    def opt_step(tracer=None) -> None:
        for _ in range(args.micro):
            x = torch.randn(args.tokens, 1, H, generator=gen).to(device)
            for layer in model:
                x = layer(x)[0]
            (x.float().pow(2).mean() / args.micro).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.end_step()
        if tracer is not None:
            tracer.step()

    base = timed_steps(args.baseline_steps, opt_step, device)
    guard = SyncGuard(args.sync_mode, device)
    guard.install(LoadTracer)
    trace_path = fresh_trace_path(args.out, rank)
    tracer = LoadTracer(model, trace_path, flush_every=args.flush_every).start()
    guard.wrap_step(tracer)
    ref.enabled = True
    traced = timed_steps(args.steps, lambda: opt_step(tracer), device)
    tracer.close()
    routed_before = torch.stack(ref.steps_kept).sum().item() if ref.steps_kept else 0
    s = check_and_summarize(
        args, ref, tracer, trace_path, world, device, guard, {"baseline": base, "traced": traced},
        {"megatron-core": megatron.core.__version__, "dispatcher": disp, "capacity_factor": args.capacity,
         "trace_holds": "kept (after capacity dropping)" if args.capacity is not None else "routed",
         "this_rank_routes_before_capacity": int(routed_before)},
        kept=False,
    )
    if s is not None:
        print(f"OK mcore_ep_trace: {s['steps']} steps x {world} ranks, ep_size {s['ep_size']}, dispatcher {disp}, "
              f"gpu max/mean {['%.3f' % v for v in s['gpu_max_over_mean']]}, sync {s['sync_check']}, "
              f"ms/step {s['timing_ms_per_step']} -> {args.out}")
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
