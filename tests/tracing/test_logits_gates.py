"""Logits-only gates (a plain nn.Linear selected with gates=): top-k of the logits on the device, exact counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moeload import LoadTracer, open_trace
from moeload.errors import InputError

E, K, H, T = 6, 2, 8, 40


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(x).softmax(-1).topk(K, -1).values.sum(-1, keepdim=True)
        return self.out(x) * w


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def ref_counts(net: Net, x: torch.Tensor) -> np.ndarray:
    """[L, E] counts from the same routing, computed independently (its own forward, bincount)."""
    out = []
    net.eval()  # the tracer ignores eval forwards
    with torch.no_grad():
        for b in net.blocks:
            idx = (x @ b.gate.weight.t()).topk(K, -1).indices
            out.append(np.bincount(idx.reshape(-1).numpy(), minlength=E))
            x = b(x)
    net.train()
    return np.stack(out)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_gate_counts_exact(tmp_path, compiled: bool) -> None:
    torch.manual_seed(0)
    net = Net()
    run = torch.compile(net) if compiled else net
    tr = LoadTracer(net, tmp_path / "t", gates="*.gate", top_k=K, flush_every=2).start()
    want = []
    for s in range(3):
        x = torch.randn(T, H)
        want.append(ref_counts(net, x))
        run(x).sum().backward()
        tr.step()
    tr.close()
    got = open_trace(tmp_path / "t").counts()
    assert np.array_equal(np.asarray(got), np.stack(want)), (got, want)


def test_linear_gate_without_top_k_is_one_error(tmp_path) -> None:
    with pytest.raises(InputError, match=r"'blocks.0.gate'.*pass top_k="):
        LoadTracer(Net(), tmp_path / "t", gates="*.gate")
