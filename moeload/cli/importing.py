"""`import`: other tools' expert-load logs -> a moeload trace (moeload.trace.importers)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeload.cli._common import console, progress_status
from moeload.errors import InputError

FORMATS_HELP = (
    "csv (tidy step,layer,expert,count), numpy (.npy / .npz counts [S, L, E]), "
    "megatron-tpe (Megatron-LM --save-tokens-per-expert-interval: tokens_per_expert/rank*.jsonl), "
    "megatron-router-trace (Megatron-core --moe-routing-trace-path: router_trace_rank*.jsonl), "
    "sglang (expert_distribution_recorder_*.pt dumps)"
)


def import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help=FORMATS_HELP, show_default=False),
    source: Path = typer.Argument(..., help="File or directory to read.", show_default=False),
    dest: Path = typer.Argument(..., help="New trace directory to write (must not exist).", show_default=False),
    num_experts: int = typer.Option(None, "--num-experts", help="Experts per layer (csv, megatron-router-trace)."),
    top_k: int = typer.Option(
        None,
        "--top-k",
        help="Experts per token (required for csv, numpy, megatron-tpe and sglang, whose logs do not say).",
    ),
    ep_size: int = typer.Option(None, "--ep-size", help="Expert-parallel size (megatron-tpe)."),
    expert_tp_size: int = typer.Option(None, "--expert-tp-size", help="Expert tensor-parallel size (megatron-tpe)."),
    tp_size: int = typer.Option(None, "--tp-size", help="Read only TP rank 0 of each group (megatron-router-trace)."),
    pp_size: int = typer.Option(None, "--pp-size", help="Pipeline-parallel size (megatron formats)."),
    first_step: int = typer.Option(None, "--first-step", help="Step number of the first row (numpy without steps)."),
    keep_empty_layers: bool = typer.Option(None, "--keep-empty-layers", help="Keep layers with no tokens (sglang)."),
) -> None:
    """Convert another tool's expert-load log into a moeload trace.

    Example: moeload import megatron-router-trace /ckpt/routing_trace runs/imported.moeload --num-experts 64
    """
    from moeload.trace import open_trace
    from moeload.trace.importers import import_trace

    given = {
        "num_experts": num_experts,
        "top_k": top_k,
        "ep_size": ep_size,
        "expert_tp_size": expert_tp_size,
        "tp_size": tp_size,
        "pp_size": pp_size,
        "first_step": first_step,
        "keep_empty_layers": keep_empty_layers,
    }
    opts = {k: v for k, v in given.items() if v is not None}
    _check_sizes(opts)

    def require_top_k(imp) -> None:
        if top_k is None and imp.extra.get("top_k_known") is False:
            raise InputError(
                f"{source}: {fmt} logs do not say how many experts each token is routed to; give "
                f"--top-k K (e.g. --top-k 2); nothing was written to {dest}"
            )

    with progress_status(f"importing {source}"):
        out = import_trace(fmt, source, dest, check=require_top_k, **opts)
    t = open_trace(out)
    s = t.steps
    console().print(
        f"imported {fmt} {source} -> {out}: {len(s)} steps ({s[0]}..{s[-1]}), {t.num_layers} layers, "
        f"{t.num_experts} experts" + (f", {t.manifest.world_size} ranks" if t.manifest.ranks_recorded else "")
    )


def _check_sizes(opts: dict) -> None:
    """One-line InputError for size options past the importers' plausibility limits (they size arrays)."""
    from moeload.trace.importers._common import MAX_EXPERTS, MAX_RANKS

    limits = {
        "num_experts": MAX_EXPERTS,
        "top_k": MAX_EXPERTS,
        "ep_size": MAX_RANKS,
        "expert_tp_size": MAX_RANKS,
        "tp_size": MAX_RANKS,
        "pp_size": MAX_RANKS,
    }
    for k, limit in limits.items():
        if k in opts and opts[k] > limit:
            raise InputError(f"--{k.replace('_', '-')} {opts[k]}: implausibly large (limit {limit})")


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
