"""torch.compile and the tracer, in either order: counts exact, or a warning and manifest notes, never a silent zero.

Dynamo does not call forward hooks added after it compiled a module (no guards on hooks). At
start() the tracer finds compiled code for the model or a module around a gate and resets dynamo;
what it cannot see (a compiled step function) shows as steps without gate forwards.
Compiles use backend="eager" (dynamo's tracing and caching, without code generation) to stay fast.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from _loop import Loop, sgd
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.errors import InputError
from moeload.workloads import batches

H, E, K, T, STEPS = 16, 4, 2, 24, 5


class Router(nn.Module):
    """torchtitan-style: returns (probabilities, top-k weights, top-k indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.num_experts, self.top_k = E, K

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.gate(x).softmax(-1)
        w, i = p.topk(K, -1)
        return p, w, i


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, w, i = self.router(x)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            out = out + ((i == e).to(x.dtype) * w).sum(-1, keepdim=True) * ex(x)
        return x + out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.block_fn: dict[int, object] = {}  # layer index -> a (compiled) function that runs that block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for li, b in enumerate(self.layers):
            x = self.block_fn[li](x) if li in self.block_fn else b(x)
        return x


def inputs(n: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, generator=g) for _ in range(n)]


def reference(net: Net, xs: list[torch.Tensor]) -> np.ndarray:
    """[S, L, E] counts computed independently of the tracer: the routers' indices, bincounted."""
    out = []
    with torch.no_grad():
        for x in xs:
            rows = []
            for b in net.layers:
                rows.append(np.bincount(b.router(x)[2].reshape(-1).numpy(), minlength=E))
                x = b(x)
            out.append(rows)
    return np.array(out)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def compile_net(net: Net, how: str, backend: str = "eager") -> nn.Module:
    if how == "whole":
        return torch.compile(net, backend=backend)
    for b in net.layers:  # per-block, as torchtitan does
        b.compile(backend=backend)
    return net


def train(run: nn.Module, xs: list[torch.Tensor], tracer: LoadTracer) -> None:
    for x in xs:
        run(x).square().mean().backward()
        tracer.step()


@pytest.mark.parametrize("how", ["whole", "block"])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_run_then_attach", "compile_then_attach"])
def test_counts_exact_in_either_order(tmp_path, how: str, order: str, backend: str = "eager") -> None:
    torch.manual_seed(0)
    net = Net()
    want = reference(copy.deepcopy(net), xs := inputs())
    tr = None
    if order == "attach_then_compile":
        tr = LoadTracer(net, tmp_path / "t", gates="*.router", flush_every=2).start()
    run = compile_net(net, how, backend)
    if order == "compile_run_then_attach":
        run(inputs(1, seed=9)[0]).sum().backward()  # warm-up: dynamo compiles the hook-less model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tr is None:  # the compiled wrapper itself is passed, as a user holding only it would
            tr = LoadTracer(run, tmp_path / "t", gates="*.router", flush_every=2).start()
        train(run, xs, tr)
        tr.close()
    t = open_trace(tmp_path / "t")
    assert t.layers == ["layers.0.router", "layers.1.router"]  # no "_orig_mod." of the compiled wrapper
    np.testing.assert_array_equal(t.counts(), want)
    extra = t.meta["extra"]
    assert "no_forward_steps" not in extra and "disabled_layers" not in extra
    reset = [str(w.message) for w in caught if "torch.compiler.reset()" in str(w.message)]
    if order == "compile_run_then_attach":
        assert len(reset) == 1 and "compiled and run before the tracer attached" in reset[0]
        assert extra["dynamo_reset"]["step"] == 0
        assert extra["dynamo_reset"]["modules"] == (["<model>"] if how == "whole" else ["layers.0", "layers.1"])
    else:  # compiled but not yet run: its first compile already sees the hooks, nothing to reset
        assert reset == [] and "dynamo_reset" not in extra


def test_counts_exact_with_aot_autograd(tmp_path) -> None:
    """The same with AOT autograd (compiled forward and backward graphs, as inductor uses)."""
    test_counts_exact_in_either_order(tmp_path, "whole", "compile_run_then_attach", backend="aot_eager")


def test_compiled_step_function_warns_and_notes_zero_steps(tmp_path) -> None:
    """A compiled training step (not a compiled module) cannot be seen at start(): the steps without any
    gate forward are warned about once and listed; following the advice (reset) brings the counts back."""
    torch.manual_seed(0)
    net = Net()
    xs = inputs(6)
    want = reference(copy.deepcopy(net), xs)
    step_fn = torch.compile(lambda x: net(x).square().mean(), backend="eager")
    step_fn(inputs(1, seed=9)[0]).backward()
    tr = LoadTracer(net, tmp_path / "t", gates="*.router", flush_every=2).start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in xs[:3]:
            step_fn(x).backward()
            tr.step()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in msgs if "no forward of any of the 2 traced gates" in m]) == 1, msgs
    assert any("2 of 2 traced gates" in m and "disabled_layers" in m for m in msgs), msgs
    torch.compiler.reset()  # what the warning says to do
    for x in xs[3:]:
        step_fn(x).backward()
        tr.step()
    tr.close()
    t = open_trace(tmp_path / "t")
    c = t.counts()
    assert c[:3].sum() == 0
    np.testing.assert_array_equal(c[3:], want[3:])
    extra = json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]
    assert extra["no_forward_steps"] == [[0, 2]]
    assert set(extra["disabled_layers"]) == {"layers.0.router", "layers.1.router"}
    d = extra["disabled_layers"]["layers.0.router"]
    assert d["step"] == 0 and d["ranks"] == [0] and "no forward seen in steps 0..1" in d["reason"]


def test_one_block_through_a_compiled_function_is_listed(tmp_path) -> None:
    """One gate never fires (its block runs through a function compiled before attach), the other does:
    that layer alone goes to extra.disabled_layers; the other counts exactly."""
    torch.manual_seed(0)
    net = Net()
    xs = inputs(4)
    want = reference(copy.deepcopy(net), xs)
    net.block_fn[1] = torch.compile(lambda x: net.layers[1](x), backend="eager")
    net(inputs(1, seed=9)[0])
    tr = LoadTracer(net, tmp_path / "t", gates="*.router", flush_every=2).start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(net, xs, tr)
        tr.close()
    msgs = [str(w.message) for w in caught]
    assert any("1 of 2 traced gates ('layers.1.router')" in m and "other gates ran" in m for m in msgs), msgs
    c = open_trace(tmp_path / "t").counts()
    np.testing.assert_array_equal(c[:, 0], want[:, 0])
    assert c[:, 1].sum() == 0
    extra = json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]
    assert list(extra["disabled_layers"]) == ["layers.1.router"]
    assert "no_forward_steps" not in extra  # every step saw layer 0's gate


def test_eager_model_gives_no_compile_notes(tmp_path) -> None:
    torch.manual_seed(0)
    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with LoadTracer(net, tmp_path / "t", gates="*.router", flush_every=2) as tr:
            train(net, inputs(3), tr)
    extra = open_trace(tmp_path / "t").meta["extra"]
    assert not {"no_forward_steps", "disabled_layers", "dynamo_reset"} & set(extra)


class MaskGate(nn.Module):
    """Returns a float 0/1 routing map [T, E] in which tokens past a capacity of 3 per expert are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(H, E, bias=False)
        self.num_experts, self.top_k = E, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.proj(x).topk(K, -1).indices
        m = torch.zeros(x.shape[0], E).scatter_(1, idx, 1.0)
        return m * (m.cumsum(0) <= 3)


@pytest.mark.parametrize("gate_output", ["auto", "mask"])
def test_gate_output_reaches_the_generic_adapter(tmp_path, gate_output: str) -> None:
    torch.manual_seed(0)
    gate = nn.Sequential()
    gate.add_module("g", MaskGate())
    x = torch.randn(T, H)
    with torch.no_grad():
        want_mask = gate.g(x).sum(0).numpy().astype(np.int64)  # at most 3 per expert
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LoadTracer(gate, tmp_path / "t", gates="g", gate_output=gate_output, flush_every=1) as tr:
            gate(x)
            tr.step()
    flagged = [w for w in caught if "conservation check failed" in str(w.message)]
    assert len(flagged) == (gate_output == "mask")  # dropped tokens: fewer routes than tokens x top_k
    got = open_trace(tmp_path / "t").counts()[0, 0]
    if gate_output == "mask":  # the 0/1 map it is, drops included
        np.testing.assert_array_equal(got, want_mask)
    else:  # "auto" reads a float [T, E] tensor as scores: top-k of it, k routes per token
        assert got.sum() == T * K > want_mask.sum()


def test_gate_output_refused_where_meaningless(tmp_path) -> None:
    net = Net()
    with pytest.raises(InputError, match="gate_output='probs'"):
        LoadTracer(net, tmp_path / "t", gates="*.router", gate_output="probs")
    from moeload.workloads import build_model, get_config

    with pytest.raises(InputError, match="gates= or gate_types="):
        LoadTracer(build_model(get_config("tiny")), tmp_path / "t", gate_output="logits")


def test_embedded_workload_compiled_and_run_before_attach(tmp_path) -> None:
    """The embedded MoE GPT (2 gates, capacity dropping): a compiled copy, warmed up before the tracer
    attaches, trained in lockstep with an eager one: routed and kept counts equal the eager reference."""
    eager, comp = Loop(seed=3), Loop(seed=3)
    run = torch.compile(comp.model, backend="eager")
    x, y = next(batches(comp.cfg, 99))
    run(x, y).loss.backward()  # warm-up (the eval step / first batch of a usual loop), then drop its grads
    for p in comp.model.parameters():
        p.grad = None
    with pytest.warns(RuntimeWarning, match="compiled and run before the tracer attached"):
        # the original module, not the wrapper: its compiled code is found through dynamo's cache
        tr = LoadTracer(comp.model, tmp_path / "t", flush_every=4).start()
    want_routed, want_kept = [], []
    for _ in range(6):
        r, k = eager.step()
        want_routed.append(r)
        want_kept.append(k)
        xb, yb = next(comp.data)
        run(xb, yb).loss.backward()
        sgd(comp.model)
        tr.step()
    tr.close()
    t = open_trace(tmp_path / "t")
    assert len(t.layers) == 2 and t.meta["count_kind"] == "both"
    assert t.layers == LoadTracer(eager.model, sink=lambda b: None).layers  # the eager model's names
    np.testing.assert_array_equal(t.counts(), np.stack(want_routed))
    np.testing.assert_array_equal(t.counts(kind="kept"), np.stack(want_kept))


def test_no_forward_steps_are_capped_and_counted(tmp_path) -> None:
    """step() without a forward between (here: called twice per iteration), 250 times: the first 100 ranges
    are listed, the other steps counted; one warning; the layers ran, so none is listed as disabled."""
    net = Net()
    x = inputs(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LoadTracer(net, tmp_path / "t", gates="*.router", flush_every=50) as tr:
            for _ in range(250):
                net(x)
                tr.step()
                tr.step()
    assert len([w for w in caught if "no forward of any" in str(w.message)]) == 1
    extra = json.loads((tmp_path / "t" / "manifest.json").read_text())["extra"]
    assert extra["no_forward_steps"] == [[s, s] for s in range(1, 200, 2)]
    assert extra["no_forward_steps_more"] == 150 and "disabled_layers" not in extra
