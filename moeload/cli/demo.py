"""`moeload demo`: train the embedded MoE workload with the tracer on, then analyse the trace it wrote."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import typer

from moeload.cli._common import console
from moeload.errors import InputError

MAX_THREADS = 1024

DEMO_STEPS = {"cpu-demo": 500, "tiny": 60}


def run_demo(
    out: Path,
    *,
    config: str = "cpu-demo",
    steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    flush_every: int = 50,
    threads: int | None = 1,
    progress: bool = True,
    balance: str = "aux",
) -> dict:
    """Train `config` with a LoadTracer writing to `out`, read the trace back and print a summary.

    Returns the numbers it printed (for tests and notebooks).
    """
    import torch

    from moeload.trace import open_trace
    from moeload.tracing import LoadTracer
    from moeload.workloads import build_model, get_config, train

    con = console()
    if balance not in ("aux", "bias"):
        raise InputError(f"--balance {balance!r}: expected aux (aux loss) or bias (aux-loss-free expert bias)")
    cfg = get_config(config).replace(balance=balance)
    steps = steps or DEMO_STEPS.get(cfg.name, 100)
    if threads and not 1 <= threads <= MAX_THREADS:
        raise InputError(f"--threads {threads}: must be in 1..{MAX_THREADS}")
    if threads:
        torch.set_num_threads(threads)
    if out.exists():
        shutil.rmtree(out)
    con.print(
        f"[bold]moeload demo[/]: training '{cfg.name}' for {steps} steps on {device} "
        f"(real text: this Python's standard-library sources), tracing to {out}"
    )
    model = build_model(cfg, seed, device)
    t0 = time.perf_counter()
    with LoadTracer(model, out, flush_every=flush_every, model_name=f"moeload-workload/{cfg.name}") as tracer:
        result = train(
            cfg,
            steps=steps,
            seed=seed,
            device=device,
            model=model,
            progress=progress,
            on_step=lambda step, loss: tracer.step(),
        )
    wall = time.perf_counter() - t0
    con.print(
        f"trained {steps} steps in {wall:.0f} s ({result.steps_per_s:.1f} steps/s); "
        f"loss {result.losses[:10].mean():.3f} -> {result.losses[-10:].mean():.3f}"
    )

    # everything below reads the trace back from disk
    trace = open_trace(out)
    summary = summarize_trace(trace)
    print_summary(con, trace, summary)
    summary.update(analyse(con, trace))
    summary["wall_s"] = wall
    return summary


def summarize_trace(trace) -> dict:
    """Steps, shape, tokens per step, conservation check and early/late imbalance per layer."""
    counts = trace.counts()
    tokens = trace.tokens()
    k = np.asarray(trace.top_k)
    routed_sum = counts.sum(-1)
    conserved = bool(np.array_equal(routed_sum, tokens * k[None, :]))
    S = len(trace.steps)
    n = max(1, S // 10)
    mean = counts.mean(-1)
    imb = np.where(mean > 0, counts.max(-1) / np.where(mean > 0, mean, 1), np.nan)  # [S, L]
    out = {
        "steps": S,
        "layers": trace.layers,
        "experts": trace.experts_per_layer,
        "top_k": trace.top_k,
        "tokens_per_step": int(np.median(tokens[:, 0])) if S else 0,
        "conserved": conserved,
        "imbalance_early": np.nanmean(imb[:n], 0).tolist(),
        "imbalance_late": np.nanmean(imb[-n:], 0).tolist(),
        "parts": len(trace.parts),
        "size_bytes": trace.size_bytes,
    }
    if trace.manifest.count_kind != "routed":
        kept = trace.counts(kind="kept")
        out["kept_le_routed"] = bool((kept <= counts).all())
        out["dropped_fraction"] = float(1 - kept.sum() / max(1, counts.sum()))
    return out


def print_summary(con, trace, s: dict) -> None:
    from rich.table import Table

    con.print(
        f"\n[bold]Trace[/] {trace.path}: {s['steps']} steps, {len(s['layers'])} MoE layer{'s' if len(s['layers']) != 1 else ''}, "
        f"{max(s['experts'])} experts, top-{max(s['top_k'])}, {s['tokens_per_step']} tokens/step, "
        f"{s['parts']} parts, {s['size_bytes'] / 1024:.0f} KiB"
    )
    ok = "[green]OK[/]" if s["conserved"] else "[red]FAILED[/]"
    con.print(f"conservation (every step and layer: sum over experts = tokens x top-k): {ok}")
    if "dropped_fraction" in s:
        con.print(
            f"capacity: {100 * s['dropped_fraction']:.2f} % of routes dropped; kept <= routed: {s['kept_le_routed']}"
        )
    t = Table(title="max/mean expert load per layer (first vs last 10 % of steps)")
    t.add_column("layer")
    t.add_column("early", justify="right")
    t.add_column("late", justify="right")
    for name, a, b in zip(s["layers"], s["imbalance_early"], s["imbalance_late"]):
        t.add_row(name, f"{a:.2f}", f"{b:.2f}")
    con.print(t)


def analyse(con, trace) -> dict:
    """Phases, a predictor comparison and a placement on the trace (each skipped if its module is absent)."""
    out: dict = {}
    p = trace.proportions()
    S = p.shape[0]
    states: ModuleType | None
    evaluation: ModuleType | None
    placement: ModuleType | None
    try:
        import moeload.states as states
    except ImportError:
        states = None
    if states is not None:
        r = states.detect(trace)
        b = np.asarray(r.boundaries)
        con.print("\n[bold]Phases[/] (window rule, docs/metrics.md): first step of the final stable phase per layer")
        for name, x in zip(trace.layers, b):
            con.print(f"  {name}: {'still transient' if x < 0 else f'stable from step {x}'}")
        out["boundaries"] = b.tolist()
    try:
        import moeload.evaluation as evaluation
    except ImportError:
        evaluation = None
    if evaluation is not None and S >= 100:
        h = (max(10, S // 10), max(20, S // 5))
        preds: list[str | tuple[str, dict[str, Any]]] = [
            "last",
            "sw_avg",
            "ema",
            "arima",
            "damped_trend",
            "ridge",
            "state_aware",
            "combo",
        ]
        import moeload.predictors as predictors

        preds = [x for x in preds if x in predictors.available()]
        # EMA's default half-life (200 steps) is for long runs; scale it to this short trace
        scaled = {"ema": {"halflife": max(5, S // 20)}}
        preds = [(x, scaled[x]) if x in scaled else x for x in preds]
        con.print(
            f"\n[bold]Forecasts[/]: rolling-origin backtest, horizons {h[0]} and {h[1]} steps "
            "(the paper uses 1,000 and 2,000 on longer runs)"
        )
        df = evaluation.backtest(trace, predictors=preds, horizons=h, min_history=S // 4, every=max(10, S // 20))
        summ = evaluation.summarize(df)
        piv = summ.pivot_table(index="predictor", columns=["horizon", "phase"], values="havg_mae_pp")
        piv = piv.sort_values(piv.columns[0])
        piv.columns = [f"H={h} {ph}" for h, ph in piv.columns]
        con.print(
            "error of the horizon-average load share (havg_mae_pp, percentage points; lower is better;"
            " every metric: moeload backtest TRACE)"
        )
        con.print(piv.to_string(float_format=lambda x: f"{x:.3f}"))
        out["backtest"] = summ
    try:
        import moeload.placement as placement
    except ImportError:
        placement = None
    if placement is not None and S >= 100:
        counts = trace.counts()
        E = counts.shape[2]
        G = 4 if E % 4 == 0 else 2
        con.print(
            f"\n[bold]Placement[/]: replay of the trace on {G} GPUs with {E + G} expert slots "
            f"(one replica slot per GPU), re-planned every {S // 10} steps"
        )
        table = placement.compare(
            counts,
            G,
            E + G,
            replan_every=max(10, S // 10),
            window=max(20, S // 5),
            vllm_window=max(20, S // 5),
            vllm_replan_every=max(30, S // 3),
        )
        cols = [c for c in ("scenario", "imbalance", "segment_imbalance", "moves_per_replan") if c in table.columns]
        con.print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        con.print(
            "(imbalance: realised max/mean GPU load per step, averaged; segment_imbalance: of the loads summed over each re-plan period; the vLLM row uses "
            "window and re-plan period scaled to this short trace)"
        )
        out["placement"] = table
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo.moeload"), "--out", help="Trace directory to write (replaced)."),
        config: str = typer.Option(
            "cpu-demo", "--config", help="Workload config: cpu-demo, tiny, gpt3-small-moe, gpt3-medium-moe."
        ),
        steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: the config's demo length)."),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        flush_every: int = typer.Option(50, "--flush-every", help="Steps per trace part."),
        threads: int = typer.Option(
            1,
            "--threads",
            help="torch CPU threads. Default 1: on a 2-core machine with "
            "other work running, 1 thread ran 2.3-4.2 steps/s and 2 threads 0.4-0.5 (measured "
            "2026-12-03).",
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
        balance: str = typer.Option(
            "aux",
            "--balance",
            help="aux (Switch aux loss) or bias (aux-loss-free, DeepSeek-V3 expert bias; the trace records the bias).",
        ),
    ) -> None:
        """Train the embedded MoE GPT on real local text with tracing on, then summarise the trace.

        Example: moeload demo --out runs/demo.moeload
        """
        run_demo(
            out,
            config=config,
            steps=steps,
            seed=seed,
            device=device,
            flush_every=flush_every,
            threads=threads,
            progress=not no_progress,
            balance=balance,
        )
