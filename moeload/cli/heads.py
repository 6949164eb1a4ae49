"""`heads`: which FairKV head plan to use for decode attention, from per-head KV budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from moeload.cli._common import check_alloc, console, print_json, table
from moeload.errors import InputError
from moeload.trace.importers.arrays import npy_header

MAX_HEADS = 4096  # KV heads per layer a plan is asked for (the MILP and the tables grow with it)


def read_budgets(path: Path) -> np.ndarray:
    """[L, H] float64 budgets from a .npy file ([H] is one layer); shape checked before loading."""
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f, str(path))  # the header only, not the data
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # a malformed header raises ValueError, SyntaxError, ... : all mean "not .npy"
        raise InputError(f"{path}: not a NumPy .npy file ({e})") from None
    if dtype.kind not in "iuf" or len(shape) not in (1, 2) or 0 in shape:
        raise InputError(
            f"{path}: expected per-head budgets, a non-empty [L, H] or [H] array of numbers; got {dtype} {shape}"
        )
    if shape[-1] > MAX_HEADS:
        raise InputError(f"{path}: {shape[-1]} heads per layer, more than the {MAX_HEADS} this command plans")
    check_alloc(f"{path}", int(np.prod(shape)) * 8 * 64, "layers x heads x 8 bytes x 64 for the plans")
    b = np.load(path, allow_pickle=False).astype(np.float64)
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise InputError(f"{path}: budgets must be finite and non-negative")
    return b[None] if b.ndim == 1 else b


def parse_tp(spec: str, num_heads: int) -> tuple[int, ...]:
    try:
        tps = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise InputError(f"--tp {spec!r}: expected comma-separated integers, e.g. 2,4,8") from None
    bad = [t for t in tps if t < 1 or num_heads % t]
    if bad:
        raise InputError(f"--tp {spec}: {bad} do not divide the {num_heads} KV heads per layer")
    return tps


def heads(
    budgets: Path = typer.Argument(..., help="Per-head KV budgets: a .npy array [layers, KV heads] (or [KV heads])."),
    requests: int = typer.Option(
        64, "--requests", min=1, max=1_000_000, help="Decode requests in the batch (each served by every KV head)."
    ),
    tp: str = typer.Option("2,4,8", "--tp", help="Tensor-parallel sizes, comma-separated."),
    head_dim: int = typer.Option(128, "--head-dim", min=1, max=4096, help="Head dimension."),
    dtype_bytes: int = typer.Option(2, "--dtype-bytes", min=1, max=8, help="Bytes per KV element (2 for bf16)."),
    call_us: float = typer.Option(
        None, "--call-us", min=0.0, help="Cost of one attention call per head copy, µs (default: H200 fit)."
    ),
    fixed_us: float = typer.Option(
        None, "--fixed-us", min=0.0, help="Fixed cost per rank and layer, µs (default: H200 fit)."
    ),
    bandwidth_gbs: float = typer.Option(
        None, "--bandwidth", min=1e-3, help="KV read bandwidth, GB/s (default: H200 fit)."
    ),
    extra: int = typer.Option(
        1, "--copies-per-rank", min=1, max=64, help="Head copies each rank may hold (Fair-Copying)."
    ),
    exact_s: float = typer.Option(
        5.0, "--exact-time-limit", min=0.0, max=600.0, help="MILP seconds per layer for 'exact'; 0 leaves it out."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Standard TP, FairKV best-effort, Fair-Copying, balanced and exact head plans, timed by a cost model.

    The simulator's speedup assumes decode time proportional to KV; the cost model adds a cost per
    rank and per head copy (one attention call each), fit on one H200 (docs/placement.md,
    "Fair-Copying measured"). With little KV per rank the extra calls of copied heads can cost more
    than the imbalance they remove, so the verdict per TP size follows the cost model.

    Example: moeload heads budgets.npy --requests 64 --tp 2,4,8
    """
    import dataclasses

    from moeload.placement.heads import DecodeCost, head_decode_table

    b = read_budgets(budgets)
    tps = parse_tp(tp, b.shape[1])
    default = DecodeCost()
    cost = DecodeCost(
        fixed_s=default.fixed_s if fixed_us is None else fixed_us * 1e-6,
        per_slot_s=default.per_slot_s if call_us is None else call_us * 1e-6,
        bandwidth=default.bandwidth if bandwidth_gbs is None else bandwidth_gbs * 1e9,
        head_dim=head_dim,
        dtype_bytes=dtype_bytes,
    )
    given = any(v is not None for v in (fixed_us, call_us, bandwidth_gbs))
    calibration = "given" if given else "moeload's default: one H200, dense SDPA, fit on two runs; refit for your GPU"
    df = head_decode_table(
        b, requests, tps, cost=cost, extra_per_gpu=extra, exact_time_limit=exact_s if exact_s > 0 else None
    )
    verdicts = []
    for t in tps:
        rows = df[df.tp == t]
        best = rows[rows.best].iloc[0]
        copy = best.slots > b.shape[1]
        what = (
            "copy heads"
            if copy
            else ("re-assign heads, no copies" if best.strategy != "standard" else "keep standard TP")
        )
        verdicts.append({"tp": t, "strategy": best.strategy, "speedup": float(best.speedup), "advice": what})
    if as_json:
        print_json(
            {
                "budgets": str(budgets),
                "layers": b.shape[0],
                "kv_heads": b.shape[1],
                "requests": requests,
                "cost": dataclasses.asdict(cost),
                "calibration": calibration,
                "rows": df.to_dict(orient="records"),
                "verdicts": verdicts,
            }
        )
        return
    c = console()
    rows_out = [
        [
            int(r.tp),
            r.strategy,
            int(r.slots),
            float(r.sim_speedup),
            float(r.speedup),
            float(r.step_ms),
            "best" if r.best else "",
        ]
        for r in df.itertuples()
    ]
    c.print(
        table(
            f"{budgets}: {b.shape[0]} layers x {b.shape[1]} KV heads, {requests} requests; cost "
            f"{cost.fixed_s * 1e6:.1f} us + {cost.per_slot_s * 1e6:.1f} us/call + bytes / {cost.bandwidth / 1e9:.0f} GB/s "
            f"({calibration})",
            ["TP", "strategy", "slots", "simulator speedup", "cost-model speedup", "step ms", ""],
            rows_out,
        )
    )
    for v in verdicts:
        c.print(f"TP {v['tp']}: {v['strategy']} ({v['speedup']:.2f}x over standard TP): {v['advice']}")


def register(app: typer.Typer) -> None:
    app.command("heads")(heads)
