"""The conservation check the writer thread runs on every flushed block: routes must add up."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeload.tracing.block import FLAG_COL, TOKENS_COL, Layout


def check_conservation(
    a: np.ndarray, layout: Layout, top_k: Sequence[int], exact: Sequence[bool]
) -> list[tuple[int, int, int, str, str]]:
    """Routes that do not add up, per (step, rank, layer) of one host block.

    a: [S, R, P, L, W] int64 block; top_k, exact: [L]. For each routed plane (train, eval), the sum
    over all bins (no expert / dropped, experts, out-of-range) must equal tokens x top_k (exact
    layers; at most that for layers counted after capacity dropping); any route to an id >= E and
    any kept count above the routed count of its expert is a violation. Rows of a disabled layer
    (flag column) are skipped. Counts-form gates without tokens infer tokens = routes // top_k, so
    only a sum that is no multiple of top_k shows there.
    Returns (layer, step index, rank index, problem, detail) per violation.
    """
    out = []
    planes = (("", layout.routed, layout.kept), ("eval ", layout.eval_routed, layout.eval_kept))
    for li, E in enumerate(layout.experts_per_layer):
        k = int(top_k[li])
        live = a[:, :, layout.routed, li, FLAG_COL] == 0  # [S, R]
        for pre, pr, pk in planes:
            if pr is None:
                continue
            r = a[:, :, pr, li]  # [S, R, W]
            tokens, routes, oob = r[..., TOKENS_COL], r[..., : E + 2].sum(-1), r[..., E + 1]
            bad = routes != tokens * k if exact[li] else routes > tokens * k
            op = "!=" if exact[li] else ">"
            for s, q in zip(*np.nonzero(bad & live)):
                out.append(
                    (
                        li,
                        int(s),
                        int(q),
                        f"{pre}routes {op} tokens x top_k",
                        f"{routes[s, q]} routes for {tokens[s, q]} tokens x top_k {k}",
                    )
                )
            for s, q in zip(*np.nonzero((oob > 0) & live)):
                out.append((li, int(s), int(q), f"{pre}expert ids >= {E}", f"{oob[s, q]} routes"))
            if pk is not None:
                more = a[:, :, pk, li, 1 : E + 1] > r[..., 1 : E + 1]  # [S, R, E]
                for s, q in zip(*np.nonzero(more.any(-1) & live)):
                    out.append(
                        (
                            li,
                            int(s),
                            int(q),
                            f"{pre}kept > routed",
                            f"experts {np.flatnonzero(more[s, q])[:8].tolist()}",
                        )
                    )
    return out


__all__ = ["check_conservation"]
