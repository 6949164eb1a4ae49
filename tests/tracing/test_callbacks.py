"""Callbacks: load metrics (hand-checked), the DeepSpeed engine helper (real engine, gradient
accumulation, resume, exception) and the Lightning callback (real Trainer on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moeload import open_trace
from moeload.tracing.callbacks.metrics import gpu_max_over_mean, load_metrics


def test_load_metrics_hand_checked():
    m = load_metrics(np.array([[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]))
    np.testing.assert_allclose(m["max_over_mean"][:2], [1.0, 4.0])
    np.testing.assert_allclose(m["min_over_max"][:2], [1.0, 0.0])
    np.testing.assert_allclose(m["cv"][:2], [0.0, np.sqrt(3.0)])  # std([4,0,0,0]) = sqrt(3), mean 1
    np.testing.assert_allclose(m["hottest_share"][:2], [0.25, 1.0])
    np.testing.assert_allclose(m["tokens_p90"][:2], [1.0, 2.8])  # linear: 0 + 0.7 * 4
    assert all(np.isnan(v[2]) for v in m.values())  # a layer without tokens has no metrics
    # a layer with fewer experts ignores the padding columns
    np.testing.assert_allclose(load_metrics(np.array([[4, 0, 9, 9]]), [2])["max_over_mean"], [2.0])
    np.testing.assert_allclose(gpu_max_over_mean(np.array([[3, 1, 2, 2], [4, 0, 0, 0]]), [[0, 0, 1, 1]] * 2), [1.0, 2.0])


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_tensorboard(logdir, trace_path, block_ends: list[int], blocks: list[slice]) -> None:
    """The event file holds each block's metrics, recomputed here from the trace itself."""
    t = open_trace(trace_path)
    scalars = read_scalars(logdir)
    got = scalars["moeload/all/max_over_mean"]
    assert [s for s, _ in got] == block_ends
    for (_, v), sl in zip(got, blocks):
        c = t.counts()[sl].sum(0)
        assert v == pytest.approx(float(np.nanmean(load_metrics(c)["max_over_mean"])), rel=1e-6)
    assert f"moeload/{t.layers[0]}/hottest_share" in scalars and "moeload/all/tokens_p99" in scalars


# ---- DeepSpeed engine ---------------------------------------------------------------------------


@pytest.fixture
def ds_world():
    pytest.importorskip("deepspeed")
    from _shims import deepspeed_world_of_one

    with deepspeed_world_of_one():
        yield


def test_deepspeed_engine_helper(tmp_path, ds_world):
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import TopKGate

    from moeload.tracing.callbacks.deepspeed import trace_engine

    H, E = 16, 4

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(H, nn.Linear(H, H), num_experts=E, k=2, capacity_factor=0.5, min_capacity=1)

        def forward(self, x):
            h, l_aux, _ = self.moe(x)
            return h.pow(2).mean() + 0.01 * l_aux

    torch.manual_seed(0)
    model = Net()
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    gate = next(m for m in model.modules() if isinstance(m, TopKGate))
    micro = []
    gate.register_forward_hook(lambda m, a, o: micro.append(o[6].numpy().copy()))  # exp_counts, routed
    gen = torch.Generator().manual_seed(0)

    def micro_step():
        loss = engine(torch.randn(2, 8, H, generator=gen))
        engine.backward(loss)
        engine.step()

    path, tb = tmp_path / "t", tmp_path / "tb"
    tracing = trace_engine(engine, path, flush_every=2, tensorboard=tb)
    for _ in range(6):  # 3 optimizer steps of 2 micro-batches
        micro_step()
    tracing.close()
    assert engine.global_steps == 3 and "step" not in engine.__dict__  # engine.step restored
    t = open_trace(path)
    assert t.steps.tolist() == [0, 1, 2]
    ref = np.array(micro).reshape(3, 2, E).sum(1)
    np.testing.assert_array_equal(t.counts()[:, 0], ref)
    assert (t.counts().sum(-1) == 2 * 16 * 2).all()  # 2 micro-batches x 16 tokens x top-2
    check_tensorboard(tb, path, [1, 2], [slice(0, 2), slice(2, 3)])

    # resume on the same engine: numbering continues from engine.global_steps
    micro.clear()
    with trace_engine(engine, path, flush_every=8) as tracing:
        for _ in range(4):
            micro_step()
    t = open_trace(path)
    assert t.steps.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(t.counts()[3:, 0], np.array(micro).reshape(2, 2, E).sum(1))

    # an exception inside the loop: the partial block is written on the way out
    with pytest.raises(RuntimeError, match="data loader broke"):
        with trace_engine(engine, path, flush_every=8):
            micro_step()
            micro_step()
            raise RuntimeError("data loader broke")
    assert open_trace(path).steps.tolist() == [0, 1, 2, 3, 4, 5]


# ---- Lightning ----------------------------------------------------------------------------------


def lightning_module(fail_at: int | None = None):
    L = pytest.importorskip("lightning.pytorch")
    from moeload.workloads import build_model

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model("tiny", seed=0)
            self.routed = []  # per training forward: [L, E]
            for r in [m for n, m in self.net.named_modules() if n.endswith("router")]:
                r.register_forward_hook(self._record)
            self._fwd = []

        def _record(self, m, a, out):
            if m.training:
                self._fwd.append(np.bincount(out.indices.reshape(-1).numpy(), minlength=m.num_experts))
                if len(self._fwd) == 1 and len(self.routed) + 1 == fail_at:
                    raise RuntimeError("injected failure in a forward")

        def training_step(self, batch, idx):
            self._fwd = []
            x, y = batch
            loss = self.net(x, y).loss
            self.routed.append(np.stack(self._fwd))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (64, 32), generator=g)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.roll(-1, 1)), batch_size=4)

    return L, Module()


def lightning_trainer(L, tmp_path, max_steps, cb):
    return L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, callbacks=[cb], accelerator="cpu", devices=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path)


def test_lightning_callback_steps_resume_and_exception(tmp_path):
    L, module = lightning_module()
    from moeload.tracing.callbacks.lightning import MoeLoadCallback

    path = tmp_path / "t"
    cb = MoeLoadCallback(path, flush_every=2, tensorboard=tmp_path / "tb")
    trainer = lightning_trainer(L, tmp_path, 3, cb)
    trainer.fit(module)
    t = open_trace(path)
    assert t.steps.tolist() == [0, 1, 2] and t.layers == ["net.blocks.1.moe.router"]
    ref = np.array(module.routed).reshape(3, 2, 1, 4).sum(1)  # 2 micro-batches per optimizer step
    np.testing.assert_array_equal(t.counts(), ref)
    assert (t.counts().sum(-1) == 2 * 4 * 32 * 2).all()
    assert cb.state_dict()["step"] == 3
    check_tensorboard(tmp_path / "tb", path, [1, 2], [slice(0, 2), slice(2, 3)])

    # resume from a checkpoint: the callback's state and the restored global step continue the trace
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2 = MoeLoadCallback(path, flush_every=8)
    lightning_trainer(L, tmp_path, 5, cb2).fit(module, ckpt_path=ckpt)
    assert open_trace(path).steps.tolist() == [0, 1, 2, 3, 4]

    # an exception mid-fit: on_exception writes the steps recorded so far
    L, failing = lightning_module(fail_at=6)  # the 6th batch = first micro-batch of step 2
    with pytest.raises(RuntimeError, match="injected failure"):
        lightning_trainer(L, tmp_path, 10, MoeLoadCallback(tmp_path / "f", flush_every=100)).fit(failing)
    t = open_trace(tmp_path / "f")
    assert t.steps.tolist() == [0, 1]
    np.testing.assert_array_equal(t.counts(), np.array(failing.routed[:4]).reshape(2, 2, 1, 4).sum(1))
