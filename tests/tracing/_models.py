"""Small test models shared by tests/tracing (not shims: plain torch modules written for the tests)."""

from __future__ import annotations

from torch import nn


class SigmoidTopKRouter(nn.Module):
    """torchtitan-style router: sigmoid scores of a linear gate; returns (top-k weights, top-k indices,
    scores). num_experts / top_k as attributes, so `gates=` needs no sizes."""

    def __init__(self, dim: int = 16, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x):
        scores = self.gate(x).sigmoid()
        w, idx = scores.topk(self.top_k, dim=-1)
        return w, idx, scores
