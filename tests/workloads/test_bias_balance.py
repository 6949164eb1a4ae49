"""The embedded workload's aux-loss-free option (balance="bias", DeepSeek-V3 expert bias): traced, the
bias each step routed with is in the trace, it moves against the load, no aux loss in the objective,
and checkpoint recomputes do not count twice in the bias update."""

from __future__ import annotations

import numpy as np
import torch

from moeload import LoadTracer, open_trace
from moeload.workloads import BiasRouter, build_model, get_config, train


def test_bias_workload_records_its_bias_and_balances(tmp_path):
    cfg = get_config("tiny").replace(balance="bias", bias_update=0.01)
    torch.manual_seed(0)
    model = build_model(cfg, 0, "cpu")
    routers = [r for r in model.routers().values()]
    assert routers and all(isinstance(r, BiasRouter) for r in routers)
    snaps = []

    def on_step(step, loss):
        tracer.step()
        snaps.append(np.stack([r.expert_bias.numpy().copy() for r in routers]))

    with LoadTracer(model, tmp_path / "t", flush_every=5) as tracer:
        assert tracer.bias_layers == list(model.routers())
        res = train(cfg, steps=12, seed=0, model=model, progress=False, on_step=on_step)
    np.testing.assert_allclose(res.losses, res.lm_losses)  # no aux loss in the objective
    assert (res.aux_losses > 0).all()  # still computed, for logging
    t = open_trace(tmp_path / "t")
    b = t.router_bias()
    assert b.shape == (12, len(routers), cfg.n_experts)
    assert (b[0] == 0).all()
    np.testing.assert_array_equal(b[1:], np.stack(snaps[:-1]).astype(np.float64))  # step s routed with the bias after s-1
    # each update moved every expert by +-bias_update against its load in the step before
    c = t.counts().astype(np.float64)
    step = np.sign(c.mean(-1, keepdims=True) - c)[:-1] * 0.01
    np.testing.assert_allclose(b[1:] - b[:-1], step, atol=1e-6)


def test_checkpoint_recompute_does_not_count_twice():
    cfg = get_config("tiny").replace(balance="bias")
    loads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, 0, "cpu")
        model.train()
        model.checkpoint_activations = ckpt
        x = torch.randint(0, 256, (2, cfg.seq_len))
        model(x, x).loss.backward()
        loads.append(torch.stack([r.step_load.clone() for r in model.routers().values()]))
    torch.testing.assert_close(loads[0], loads[1])
    assert loads[0].sum() > 0
