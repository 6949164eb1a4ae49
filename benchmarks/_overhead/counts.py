"""The exact-count check of a traced arm's trace."""

from __future__ import annotations

import numpy as np


def check_counts(trace, steps: int, tokens_per_step: int, top_k: int) -> list[str]:
    """Failures of the exact-count check of one trace: every step recorded; per step and layer,
    tokens = tokens_per_step and the routed counts sum to tokens_per_step * top_k."""
    if len(trace.steps) != steps:
        return [f"{len(trace.steps)} steps recorded, {steps} run"]
    tok, cnt = trace.tokens(), trace.counts().sum(-1)  # [S, L], [S, L]
    bad = []
    for what, got, want in (("tokens", tok, tokens_per_step), ("sum of counts", cnt, tokens_per_step * top_k)):
        wrong = np.argwhere(got != want)
        if len(wrong):
            s, li = wrong[0]
            bad.append(f"{what} != {want} at {len(wrong)} of {got.size} (step, layer); first: step {s}, layer "
                       f"{trace.layers[li]!r}: {int(got[s, li])}")
    return bad
