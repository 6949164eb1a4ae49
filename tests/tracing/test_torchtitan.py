"""torchtitan adapter: real torchtitan `MoE` layers (its own config classes, on CPU), trained a few steps
with torchtitan's own aux-loss-free bias update (`register_moe_load_balancing_hook`, an optimizer step
pre-hook, on a 1-process gloo group), traced by auto-discovery, by `gates="*.router"`, and after the
model was compiled and run. Counts are compared with a forward hook of the test's own that bincounts
the router's returned `selected_experts_indices`; the recorded bias with the `expert_bias_E` copies
taken before each step's forward.

torchtitan 0.3.0 needs Python >= 3.11, and its MoE module imports triton (not a declared
dependency; absent beside a CPU-only torch): the test skips where either is missing, except under
`make test`, which installs both apart from the venv (`scripts/torchtitan_site.sh`) and sets
MOELOAD_REQUIRE_TORCHTITAN=1, so that there a missing torchtitan fails.
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

if os.environ.get("MOELOAD_REQUIRE_TORCHTITAN"):  # `make test` sets it: there a missing torchtitan fails
    import torchtitan  # noqa: F401
    import torchtitan.models.common.moe as moe_mod
else:
    torchtitan = pytest.importorskip("torchtitan")
    moe_mod = pytest.importorskip("torchtitan.models.common.moe")  # skips without triton
from torchtitan.components.optimizer.optimizer import register_moe_load_balancing_hook  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.models.common.config_utils import make_routed_experts_config, make_router_config  # noqa: E402

from moeload import LoadTracer, open_trace  # noqa: E402

D, E, K, B, L, STEPS = 32, 8, 2, 2, 16, 5
COEFF = 0.05  # torchtitan's default is 1e-3; larger so that the bias changes the routing within a few steps
ROUTERS = ["layers.0.moe.router", "layers.1.moe.router"]


class Block(nn.Module):
    """The two attributes torchtitan's load-balancing hook reads from a transformer block."""

    moe_enabled = True

    def __init__(self, coeff: float | None = COEFF) -> None:
        super().__init__()
        gate_init, init = partial(nn.init.trunc_normal_, std=0.5), partial(nn.init.trunc_normal_, std=0.02)
        self.moe = moe_mod.MoE.Config(
            num_experts=E, load_balance_coeff=coeff,
            router=make_router_config(dim=D, num_experts=E, gate_param_init={"weight": gate_init}, top_k=K),
            routed_experts=make_routed_experts_config(
                dim=D, hidden_dim=2 * D, num_experts=E, top_k=K, comm_backend="standard",
                param_init={"w1_EFD": init, "w2_EDF": init, "w3_EFD": init}),
        ).build()
        self.moe.init_states()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(x)


class Model(nn.Module):
    def __init__(self, coeff: float | None = COEFF) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"0": Block(coeff), "1": Block(coeff)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.layers.values():
            x = b(x)
        return x


@pytest.fixture(scope="module")
def parallel_dims():
    """A 1-process gloo group and torchtitan's ParallelDims for it (its bias hook asks it for meshes)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1)
    if owned:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class Run:
    """A model, its optimizer with torchtitan's bias hook, and what the test itself saw."""

    def __init__(self, parallel_dims: ParallelDims, coeff: float | None = COEFF) -> None:
        torch.manual_seed(0)
        self.model = Model(coeff)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        register_moe_load_balancing_hook(self.opt, [self.model], parallel_dims)
        self.routers = [b.moe.router for b in self.model.layers.values()]
        self.seen: list[list[torch.Tensor]] = [[] for _ in self.routers]  # per router: indices of each forward
        for li, r in enumerate(self.routers):
            r.register_forward_hook(lambda m, i, out, li=li: self.seen[li].append(out[1].detach().clone()))
        g = torch.Generator().manual_seed(1)
        self.xs = [torch.randn(B, L, D, generator=g) for _ in range(STEPS)]

    def train(self, run: nn.Module, tracer: LoadTracer) -> tuple[np.ndarray, np.ndarray]:
        """STEPS optimizer steps -> (want [S, L, E] bincounts of the returned indices, bias [S, L, E] in
        force at each step's forward)."""
        want, bias = [], []
        for x in self.xs:
            if self.model.layers["0"].moe.expert_bias_E is not None:
                bias.append([b.moe.expert_bias_E.double().numpy().copy() for b in self.model.layers.values()])
            for s in self.seen:
                s.clear()
            run(x).square().mean().backward()
            self.opt.step()  # torchtitan's pre-hook moves expert_bias_E by its sign rule first
            self.opt.zero_grad()
            tracer.step()
            want.append([np.bincount(torch.cat([i.reshape(-1) for i in s]).numpy(), minlength=E) for s in self.seen])
        tracer.close()
        return np.array(want), np.array(bias)


def biased_choice_differs(run: Run) -> bool:
    """Whether the final bias changes some token's experts (else the bias checks below would prove little)."""
    with torch.no_grad():
        x = run.xs[-1]
        for b in run.model.layers.values():
            r = b.moe.router
            _, idx, scores = r(x, b.moe.expert_bias_E)
            plain = scores.topk(K, dim=-1).indices
            if not torch.equal(idx.sort(-1).values, plain.sort(-1).values):
                return True
            x = b(x)
    return False


def test_auto_discovery_counts_and_bias(tmp_path, parallel_dims):
    run = Run(parallel_dims)
    tracer = LoadTracer(run.model, tmp_path / "t", flush_every=2).start()
    assert [s.framework for s in tracer.specs] == ["torchtitan"] * 2
    assert tracer.layers == ROUTERS and tracer.bias_layers == ROUTERS
    want, bias = run.train(run.model, tracer)
    assert biased_choice_differs(run)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), want)
    assert (want.sum(-1) == B * L * K).all()
    got = t.router_bias()
    assert got is not None and got.shape == (STEPS, 2, E)
    np.testing.assert_array_equal(got, bias)
    assert np.abs(bias[-1]).max() > 0 and not np.array_equal(bias[1], bias[-1])  # the hook moved the bias each step
    assert t.meta["framework"] == "torchtitan" and t.meta["framework_version"] == f"torchtitan {torchtitan.__version__}"


def test_gates_pattern_counts(tmp_path, parallel_dims):
    """gates="*.router" (the generic adapter, ahead of auto-discovery): counts exact as well ([B, L, k]
    indices read as indices, not a top-k of the unbiased scores)."""
    run = Run(parallel_dims)
    tracer = LoadTracer(run.model, tmp_path / "t", gates="*.router", flush_every=2).start()
    assert tracer.layers == ROUTERS
    want, _ = run.train(run.model, tracer)
    assert biased_choice_differs(run)
    got = open_trace(tmp_path / "t").counts()
    np.testing.assert_array_equal(got[0], want[0])  # step 0 routes with a zero bias: right either way
    np.testing.assert_array_equal(got, want)


def test_gates_pattern_bias(parallel_dims, tmp_path):
    """gates="*.router": the tracer's own bias lookup (find_bias) finds the MoE's expert_bias_E."""
    run = Run(parallel_dims)
    tracer = LoadTracer(run.model, tmp_path / "t", gates="*.router", flush_every=2)
    assert tracer.bias_layers == ROUTERS


def test_without_load_balancing_no_bias(tmp_path, parallel_dims):
    """load_balance_coeff=None: the MoE has no expert_bias_E, nothing is recorded as bias; counts exact."""
    run = Run(parallel_dims, coeff=None)
    tracer = LoadTracer(run.model, tmp_path / "t", flush_every=2).start()
    assert tracer.layers == ROUTERS and tracer.bias_layers == []
    want, _ = run.train(run.model, tracer)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), want)
    assert t.router_bias() is None


@pytest.mark.parametrize("how", ["whole", "block"])
def test_compiled_and_run_before_attach(tmp_path, parallel_dims, how: str):
    """The model compiled (whole, or per block as torchtitan's apply_compile does) and run once (a
    warm-up) before the tracer attaches: the tracer resets dynamo (one warning) and counts stay exact."""
    run = Run(parallel_dims)
    if how == "whole":
        compiled = torch.compile(run.model, backend="eager")
    else:
        for b in run.model.layers.values():
            b.compile(backend="eager")
        compiled = run.model
    compiled(run.xs[0]).sum().backward()  # warm-up: dynamo compiles the hook-less model
    run.opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracer = LoadTracer(compiled, tmp_path / "t", flush_every=2).start()
        want, bias = run.train(compiled, tracer)
    assert any("torch.compiler.reset()" in str(w.message) for w in caught)
    t = open_trace(tmp_path / "t")
    assert t.layers == ROUTERS
    np.testing.assert_array_equal(t.counts(), want)
    np.testing.assert_array_equal(t.router_bias(), bias)
    extra = t.meta["extra"]
    assert extra["dynamo_reset"]["modules"] == (["<model>"] if how == "whole" else ["layers.0", "layers.1"])
    assert "no_forward_steps" not in extra and "disabled_layers" not in extra
