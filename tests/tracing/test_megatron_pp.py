"""megatron-core with pipeline_model_parallel_size=2 x expert_model_parallel_size=2 on 4 gloo processes.

Every stage names its routers `decoder.layers.0.mlp.router`, `decoder.layers.1.mlp.router` (module
paths restart on each stage); the MoELayers know their global `layer_number` (stage offset added,
as megatron's TransformerLayer does). The trace must hold the four global layers, each the sum of
its own stage's two expert-parallel ranks, never of the other stage's layers. Each worker counts
its routers' routing maps itself (a forward hook of the test, not moeload's) for the comparison.
The CPU shims are the ones in tests/tracing/_shims.py (router weight device, missing TE gemm).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")
from _shims import run_workers  # noqa: E402

from moeload import open_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS, E, H, TOKENS, PER_STAGE = 4, 4, 16, 24, 2

WORKER = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, torch.distributed as dist
    from torch import nn
    torch.set_num_threads(1)
    rank, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    STEPS, E, H, TOKENS, PER_STAGE = (int(x) for x in sys.argv[4:9])
    dist.init_process_group("gloo", rank=rank, world_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.transformer.moe import moe_utils
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_config import TransformerConfig
    torch.cuda.current_device = lambda: "cpu"  # shim: see tests/tracing/_shims.py
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # shim: see tests/tracing/_shims.py
    ps.initialize_model_parallel(1, 2, expert_model_parallel_size=2)
    stage = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TransformerConfig(num_layers=2 * PER_STAGE, hidden_size=H, num_attention_heads=2, ffn_hidden_size=2 * H,
                                num_moe_experts=E, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                                moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="aux_loss",
                                add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
                                pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
        mlp = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp
        layers = []
        for i in range(PER_STAGE):
            n = stage * PER_STAGE + i + 1  # global layer number, as TransformerLayer computes it
            layer = MoELayer(config=cfg, submodules=mlp.submodules, layer_number=n)
            layer.set_layer_number(n)
            layers.append(layer)
    model = nn.Module()
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([nn.Module() for _ in layers])
    for holder, layer in zip(model.decoder.layers, layers):
        holder.mlp = layer
    refs = [[] for _ in layers]
    for li, layer in enumerate(layers):
        layer.router.register_forward_hook(lambda m, a, o, li=li: refs[li].append(o[1].bool().sum(0).tolist()))
    from moeload import LoadTracer
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)
    import time
    t0 = time.time()
    tracer = LoadTracer(model, path, flush_every=3, flush_timeout=60)
    agree_s = time.time() - t0  # the layer agreement, on the tracer's own gloo group
    with tracer:
        for s in range(STEPS):
            x = torch.randn(TOKENS, 1, H, generator=gen)
            for layer in layers:
                x = layer(x)[0]
            x.float().pow(2).mean().backward()
            opt.step(); opt.zero_grad()
            tracer.step()
    open(out, "w").write(json.dumps({"rank": rank, "stage": stage, "refs": refs, "layers": tracer.layers,
                                     "local": tracer.local_layers, "errors": tracer.errors,
                                     "own_group": tracer._cpu_pg is not None, "agree_s": agree_s}))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_pipeline_two_stages_times_expert_parallel_two(tmp_path):
    outs = [tmp_path / f"rank{r}.json" for r in range(4)]
    args = [str(v) for v in (STEPS, E, H, TOKENS, PER_STAGE)]
    run_workers(tmp_path, WORKER, 4, lambda r: [str(tmp_path / "t"), str(outs[r]), *args], timeout=150)
    res = [json.loads(o.read_text()) for o in outs]
    names = [f"decoder.layers.{i}.mlp.router" for i in range(2 * PER_STAGE)]
    stage_of = {r["rank"]: r["stage"] for r in res}
    assert sorted(stage_of.values()) == [0, 0, 1, 1]
    # megatron's groups differ per rank: the tracer's own group is made at once, not after flush_timeout (60 s)
    assert all(r["own_group"] for r in res) and max(r["agree_s"] for r in res) < 30, res
    for r in res:
        assert r["layers"] == names and not r["errors"]
        assert r["local"] == names[r["stage"] * PER_STAGE:(r["stage"] + 1) * PER_STAGE]
    t = open_trace(tmp_path / "t")
    assert t.layers == names and t.steps.tolist() == list(range(STEPS))
    want = np.zeros((STEPS, 4, len(names), E), np.int64)  # [S, R, L, E] from the workers' own hooks
    for r in res:
        for li, rows in enumerate(r["refs"]):
            want[:, r["rank"], r["stage"] * PER_STAGE + li] = rows
    np.testing.assert_array_equal(t.rank_counts(), want)
    np.testing.assert_array_equal(t.counts(), want.sum(1))
    assert (t.counts().sum(-1) == 2 * TOKENS * 2).all()  # two EP ranks x tokens x top-2 per layer, no dropping
    owners = t.meta["extra"]["layer_owners"]
    assert {n: sorted(stage_of[q] for q in owners[n]) for n in names} == {
        n: [i // PER_STAGE] * 2 for i, n in enumerate(names)}
