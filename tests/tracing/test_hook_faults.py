"""Hook faults on real framework layers: an adapter that raises, router output of an unexpected shape,
NaN router probabilities (the router weight filled with NaN). Each time: training goes on, exactly one
warning for that layer, the manifest's `extra.disabled_layers` records it, other layers count on.

Reference counts come from the test's own forward hooks, read from each gate's output (not through
the adapters). The loops skip the optimizer update when the loss is not finite, as a GradScaler does,
so a NaN router does not spread into the other layers' weights.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.tracing import Adapter, Routing

NAN, SHAPE, ERROR = "NaN router probabilities", "unexpected router output shape", "hook raised an exception"


class Ref:
    """The test's hooks on each gate: per training forward, counts [E] read from the gate's output."""

    def __init__(self, gates: list[nn.Module], read: Callable, num_experts: int) -> None:
        self.acc = np.zeros((len(gates), num_experts), np.int64)
        for i, g in enumerate(gates):
            g.register_forward_hook(lambda m, a, o, i=i: self._add(i, m, o))
        self.read = read

    def _add(self, i: int, m: nn.Module, o) -> None:
        if m.training:
            self.acc[i] += self.read(o).detach().reshape(-1).numpy().astype(np.int64)

    def take(self) -> np.ndarray:
        out = self.acc.copy()
        self.acc[:] = 0
        return out


def bincount(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(idx.reshape(-1), minlength=num_experts)


def train(model: nn.Module, tracer: LoadTracer, ref: Ref, loss_fn: Callable, steps: int,
          fault_at: int, fault: Callable[[], None]) -> np.ndarray:
    """-> reference counts [steps, L, E]. After each flush, waits until the writer thread has written the
    block, so a NaN found there disables the layer at the very next step()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for s in range(steps):
        if s == fault_at:
            fault()
        loss = loss_fn(s)
        loss.backward()
        if torch.isfinite(loss):  # as a GradScaler: skip the update on a non-finite loss
            opt.step()
        opt.zero_grad()
        out.append(ref.take())
        flushes = tracer.flushes
        tracer.step()
        deadline = time.time() + 20
        while tracer.flushes > flushes and tracer.last_flushed_step != s and time.time() < deadline:
            time.sleep(0.005)
    return np.stack(out)


def check(tmp_path, tracer: LoadTracer, ref: np.ndarray, w: list, layer: int, reason: str, fault_at: int,
          last_counted: int) -> None:
    """Layer `layer` disabled at `fault_at` for `reason`, counted up to step `last_counted`, zero after;
    every other layer equals the reference at every step; exactly one disabling warning."""
    name = tracer.layers[layer]
    msgs = [str(x.message) for x in w if "moeload: tracing of layer" in str(x.message)]
    assert len(msgs) == 1 and repr(name) in msgs[0] and reason in msgs[0], msgs
    assert tracer.disabled_layers == [name] and tracer.step_count == len(ref)
    t = open_trace(tmp_path / "t")
    c = t.counts()
    assert t.steps.tolist() == list(range(len(ref)))
    others = [i for i in range(len(t.layers)) if i != layer]
    np.testing.assert_array_equal(c[:, others], ref[:, others])
    np.testing.assert_array_equal(c[: last_counted + 1, layer], ref[: last_counted + 1, layer])
    assert (c[last_counted + 1 :, layer] == 0).all() and (ref[last_counted + 1 :, layer] > 0).any()
    extra = json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]
    assert extra["disabled_layers"] == {name: {"step": fault_at, "ranks": [0], "reason": reason}}
    assert list(extra["hook_errors"]) == [name]


def run_case(tmp_path, model, gates, read, E, loss_fn, fault, reason, *, steps=7, fault_at=2, flush_every=2,
             adapters=None) -> None:
    ref = Ref(gates, read, E)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with LoadTracer(model, tmp_path / "t", flush_every=flush_every, adapters=adapters) as tr:
            counts = train(model, tr, ref, loss_fn, steps, fault_at, fault)
    if reason == NAN:  # found when the block holding fault_at is written; the hook goes at the next step()
        last = (fault_at // flush_every + 1) * flush_every
    else:  # the hook raised in the fault step's forward: nothing counted from there
        last = fault_at - 1
    check(tmp_path, tr, counts, w, 1, reason, fault_at, last)


def fill_nan(weight: torch.Tensor) -> Callable[[], None]:
    def fault() -> None:
        with torch.no_grad():
            weight.fill_(float("nan"))

    return fault


# ---- Hugging Face transformers (Mixtral blocks) ----------------------------------------------------
@pytest.fixture
def hf():
    pytest.importorskip("transformers")
    from test_hf import B, E, P, V, tiny_model

    model = tiny_model("mixtral")
    gates = [layer.mlp.gate for layer in model.model.layers]
    gen = torch.Generator().manual_seed(0)

    def loss_fn(step: int) -> torch.Tensor:
        x = torch.randint(1, V, (B, P), generator=gen)
        return model(input_ids=x, labels=x).loss

    return model, gates, (lambda o: bincount(o[2], E)), E, loss_fn


def test_hf_nan_router_weight(tmp_path, hf):
    model, gates, read, E, loss_fn = hf
    run_case(tmp_path, model, gates, read, E, loss_fn, fill_nan(gates[1].weight), NAN)


def test_hf_router_top_k_changed_is_an_unexpected_shape(tmp_path, hf):
    """A real change on a real router: its top_k set to 1 after the tracer was made (k=2): the router
    returns [T, 1] indices, the Mixtral block trains on with them; the adapter does not guess."""
    model, gates, read, E, loss_fn = hf

    def fault() -> None:
        gates[1].top_k = 1

    run_case(tmp_path, model, gates, read, E, loss_fn, fault, SHAPE)


# ---- DeepSpeed MoE (TopKGate) ------------------------------------------------------------------------
@pytest.fixture
def ds():
    pytest.importorskip("deepspeed")
    from test_deepspeed import B, E, H, S, Net

    torch.manual_seed(0)
    model = Net(k=2, drop=True)
    gates = [model.moe1.deepspeed_moe.gate, model.moe2.deepspeed_moe.gate]
    gen = torch.Generator().manual_seed(1)
    return model, gates, (lambda o: o[-1]), E, (lambda step: model(torch.randn(B, S, H, generator=gen)))


def test_deepspeed_nan_gate_weight(tmp_path, ds):
    model, gates, read, E, loss_fn = ds
    run_case(tmp_path, model, gates, read, E, loss_fn, fill_nan(gates[1].wg.weight), NAN)


def test_deepspeed_gate_output_of_unexpected_shape(tmp_path, ds):
    """A FAKE FAULT (no installed DeepSpeed version does this): from the fault step on, a hook of the
    test, run before the tracer's, hands on the gate's output with exp_counts shaped [1, E] instead of
    [E], as a version that kept the dimension might; MOELayer only stores exp_counts, so it trains on."""
    model, gates, read, E, loss_fn = ds

    def fault() -> None:
        gates[1].register_forward_hook(lambda m, a, o: (*o[:-1], o[-1][None]), prepend=True)

    run_case(tmp_path, model, gates, read, E, loss_fn, fault, SHAPE)


# ---- megatron-core (TopKRouter) ----------------------------------------------------------------------
pytest.importorskip("megatron.core")
from test_megatron import mcore  # noqa: F401  (the module-scoped fixture: 1-process gloo world + shims)


@pytest.fixture
def mc(mcore):  # noqa: F811
    from test_megatron import SEQ, B, E, H, Net

    torch.manual_seed(0)
    model = Net(mcore, 2, None)
    gates = [layer.router for layer in model.layers]
    gen = torch.Generator().manual_seed(0)
    return model, gates, (lambda o: o[1].sum(0)), E, (lambda step: model(torch.randn(SEQ, B, H, generator=gen)))


def test_megatron_nan_router_weight(tmp_path, mc):
    model, gates, read, E, loss_fn = mc
    run_case(tmp_path, model, gates, read, E, loss_fn, fill_nan(gates[1].weight), NAN)


class RaisingAdapter(Adapter):
    """A FAKE FAULT (a bug in an adapter, which the shipped adapters do not have): the real
    megatron-core adapter, whose counts function for one layer raises KeyError once `armed` is set."""

    name = "raising"

    def __init__(self, inner: Adapter, layer: int) -> None:
        self.inner, self.layer, self.armed = inner, layer, False

    def find(self, model: nn.Module):
        specs = self.inner.find(model)
        real = specs[self.layer].counts

        def counts(module, inputs, output):
            if self.armed:
                raise KeyError("router_output")
            return real(module, inputs, output)

        specs[self.layer].counts = counts
        return specs


def test_megatron_adapter_that_raises(tmp_path, mc):
    from moeload.tracing.adapters.megatron import ADAPTER

    model, gates, read, E, loss_fn = mc
    bad = RaisingAdapter(ADAPTER, 1)
    run_case(tmp_path, model, gates, read, E, loss_fn, lambda: setattr(bad, "armed", True), ERROR, adapters=[bad])


# ---- the NaN check itself dispatches no host-reading op ----------------------------------------------
def test_nan_check_adds_no_host_sync_and_disables_the_layer(tmp_path):
    from test_tracer_nosync import H, T, Net, SyncFreeRouter, SyncOpRecorder

    class ProbRouter(SyncFreeRouter):
        def forward(self, x: torch.Tensor) -> Routing:
            return super().forward(x)._replace(probs=self.gate(x).softmax(-1))

    torch.manual_seed(0)
    model = Net()
    model.router = ProbRouter(capacity=T)
    tr = LoadTracer(model, tmp_path / "t", gate_types=(ProbRouter,), flush_every=2).start()
    x = torch.randn(T, H)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with SyncOpRecorder() as rec:
            for s in range(4):
                if s == 1:
                    model.router.gate.weight.data.fill_(float("nan"))
                model(x).backward()
                model.zero_grad()
                tr.step()
        assert rec.seen == [] and "aten::isnan" in rec.ops
        tr.close()
    assert [str(m.message) for m in w if "disabled" in str(m.message)] == [
        (f"moeload: tracing of layer 'router' disabled ({NAN}: NaN in the router probabilities at step 1 on rank(s) [0]); "
         "training continues")
    ]
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]["disabled_layers"] == {
        "router": {"step": 1, "ranks": [0], "reason": NAN}
    }
    assert open_trace(tmp_path / "t").counts()[0, 0].sum() == T * 2  # the step before the NaN is intact
