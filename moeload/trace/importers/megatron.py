"""Megatron-LM logs: tokens-per-expert JSONL and the MoE router trace.

tokens_per_expert (`--save-tokens-per-expert-interval N`; NVIDIA/Megatron-LM
megatron/training/activation_logging.py, `ActivationLogger.save_tpe`): every rank appends to
`{save}/tokens_per_expert/rank{R}.jsonl` one line per MoE layer and saved iteration,
`{"iter": 100, "block": "decoder", "layer": 3, "tpe": [[128, 64], [96, 80]]}` (MTP layers add
"mtp_idx"); `tpe` holds one list per micro-batch of the tokens each *local* expert received (the
`m_splits` of the experts' grouped fc1, i.e. after dispatch). Local expert i of expert-parallel rank
r is global expert r * num_local + i.

Router trace (`--moe-routing-trace-path DIR`; megatron/core/transformer/moe/router_trace.py,
`RouterTracer`): `DIR/router_trace_rank{R}.jsonl`, one line per (step, block, layer) and forward
call, `{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
"num_tokens": 128, "topk": 2, "top_indices": [[12, 45], ...]}` (+ "mtp_idx", sidecar offsets).

Rank layout follows Megatron's default order tp-cp-ep-dp-pp: tensor-parallel rank = rank % tp,
expert-parallel rank = (rank // expert_tp) % ep, pipeline stage = rank // (world // pp). Module
layer numbers are local to a pipeline stage, so with pp > 1 layer names carry the stage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from moeload.errors import InputError, TraceFormatError
from moeload.trace.importers._common import (
    MAX_EXPERTS,
    MAX_RANKS,
    Imported,
    counts_array,
    dense,
    int_field,
    jsonl_records,
)

TPE_FILE = re.compile(r"^rank(\d+)\.jsonl$")
MAX_MICRO = 4096
"""Micro-batches per record accepted (bounded before allocating)."""
MAX_MICRO_CELLS = 1 << 28
"""Counts kept per micro-batch at most (steps x M x layers x experts; 2 GiB of int64)."""
ROUTER_FILE = re.compile(r"^router_trace_rank(\d+)\.jsonl$")


def _rank_files(source: Path, pattern: re.Pattern, subdir: str | None, what: str) -> dict[int, Path]:
    if source.is_file():
        m = pattern.match(source.name)
        if not m:
            raise InputError(f"{source}: not a {what} file (expected a name like {pattern.pattern})")
        return {int(m.group(1)): source}
    if not source.is_dir():
        raise InputError(f"{source}: no such file or directory")
    d = source / subdir if subdir and (source / subdir).is_dir() else source
    files = {int(m.group(1)): p for p in sorted(d.iterdir()) if (m := pattern.match(p.name))}
    if not files:
        raise InputError(f"{source}: no {what} files ({pattern.pattern}) found")
    if max(files) >= MAX_RANKS:
        raise InputError(f"{files[max(files)]}: rank {max(files)} is implausible (limit {MAX_RANKS})")
    return files


def _layer_name(key: tuple, pp: int, leaf: str) -> str:
    stage, block, mtp_idx, layer = key
    prefix = f"pp{stage}." if pp > 1 else ""
    if block == "mtp":
        return f"{prefix}mtp.layers.{mtp_idx}.mtp_model_layer.layers.{layer}.mlp{leaf}"
    return f"{prefix}{block}.layers.{layer}.mlp{leaf}"


def _layer_key(rec: dict, stage: int, where: str) -> tuple:
    block = rec.get("block", "decoder")
    if not isinstance(block, str):
        raise TraceFormatError(f"{where}: field 'block' must be a string")
    mtp_idx = rec.get("mtp_idx")
    if mtp_idx is not None:
        mtp_idx = int_field(rec, "mtp_idx", where)
    return (stage, block, mtp_idx, int_field(rec, "layer", where))


def _order(keys) -> list[tuple]:
    return sorted(keys, key=lambda k: (k[1] != "decoder", k[0], k[1], -1 if k[2] is None else k[2], k[3]))


def _check_sizes(world: int, tp: int, pp: int, source: Path) -> None:
    if world % (tp * pp):
        raise InputError(f"{source}: {world} ranks are not divisible by tensor x pipeline parallel size {tp} x {pp}")


def read_tokens_per_expert(
    source: str | os.PathLike,
    *,
    ep_size: int | None = None,
    expert_tp_size: int = 1,
    pp_size: int = 1,
    top_k: int | None = None,
) -> Imported:
    """Read `tokens_per_expert/rank*.jsonl` (a save directory, that folder, or one file).

    ep_size: expert-parallel size (default: world / (expert_tp_size * pp_size), i.e. no expert
    data parallelism). Counts of expert-data-parallel replicas are summed; only expert-tensor-
    parallel rank 0 is read (the others hold the same splits). Steps are Megatron iterations.
    """
    src = Path(source)
    files = _rank_files(src, TPE_FILE, "tokens_per_expert", "tokens-per-expert")
    world = max(files) + 1
    _check_sizes(world, expert_tp_size, pp_size, src)
    ep = ep_size or world // (expert_tp_size * pp_size)
    if world % (expert_tp_size * ep * pp_size):
        raise InputError(f"{src}: {world} ranks do not fit expert_tp {expert_tp_size} x ep {ep} x pp {pp_size}")
    per_stage = world // pp_size
    acc: dict[tuple, np.ndarray] = {}
    mb_acc: dict[tuple, np.ndarray] = {}  # [M, E] per (iteration, layer): micro-batches kept
    num_local: int | None = None
    for rank, path in files.items():
        if rank % expert_tp_size:
            continue
        ep_rank = (rank // expert_tp_size) % ep
        stage = rank // per_stage
        for no, rec in jsonl_records(path, ("iter", "layer", "tpe")):
            where = f"{path}:{no}"
            it = int_field(rec, "iter", where)
            a = counts_array(rec["tpe"], where, what="'tpe' counts", error=TraceFormatError)
            if a.ndim != 2 or a.shape[1] == 0:
                raise TraceFormatError(f"{where}: 'tpe' must be [micro-batches][local experts] non-negative integers")
            if a.shape[1] * ep > MAX_EXPERTS:
                raise TraceFormatError(
                    f"{where}: {a.shape[1]} local experts x ep {ep} is implausible (limit {MAX_EXPERTS})"
                )
            if num_local is None:
                num_local = a.shape[1]
            elif a.shape[1] != num_local:
                raise TraceFormatError(f"{where}: {a.shape[1]} local experts, earlier lines have {num_local}")
            key = (it, _layer_key(rec, stage, where))
            row = acc.setdefault(key, np.zeros(ep * num_local, dtype=np.int64))
            row[ep_rank * num_local : (ep_rank + 1) * num_local] += a.sum(0)
            if a.shape[0] > MAX_MICRO:
                raise TraceFormatError(f"{where}: {a.shape[0]} micro-batches is implausible (limit {MAX_MICRO})")
            mbs = mb_acc.get(key)
            if mbs is None or mbs.shape[0] < a.shape[0]:
                grown = np.zeros((a.shape[0], ep * num_local), dtype=np.int64)
                if mbs is not None:
                    grown[: mbs.shape[0]] = mbs
                mbs = mb_acc[key] = grown
            mbs[: a.shape[0], ep_rank * num_local : (ep_rank + 1) * num_local] += a
    if not acc or num_local is None:  # (num_local is set where acc is)
        raise InputError(f"{src}: no tokens-per-expert records")
    layer_keys = _order({k for _, k in acc})
    lpos = {k: i for i, k in enumerate(layer_keys)}
    steps = sorted({s for s, _ in acc})
    E = ep * num_local
    counts = dense({(s, 0, lpos[k]): v for (s, k), v in acc.items()}, steps, len(layer_keys), 1, E, src)
    M = max(v.shape[0] for v in mb_acc.values())
    if len(steps) * M * len(layer_keys) * E > MAX_MICRO_CELLS:
        raise InputError(
            f"{src}: {len(steps)} steps x {M} micro-batches x {len(layer_keys)} layers x {E} experts is "
            f"too many counts to keep per micro-batch (limit {MAX_MICRO_CELLS:,}); import fewer iterations"
        )
    micro = np.zeros((len(steps), 1, M, len(layer_keys), E), dtype=np.int64)
    spos = {s: i for i, s in enumerate(steps)}
    for (s, k), v in mb_acc.items():
        micro[spos[s], 0, : v.shape[0], lpos[k]] = v
    return Imported(
        steps=np.asarray(steps, dtype=np.int64),
        counts=counts,
        layers=[_layer_name(k, pp_size, ".experts") for k in layer_keys],
        experts_per_layer=[E] * len(layer_keys),
        top_k=top_k or 1,
        framework="megatron-lm",
        world_size=world,
        ep_size=ep,
        extra={
            "source_format": "megatron tokens_per_expert",
            "counts_measured": "tokens received by each expert after dispatch (grouped fc1 m_splits)",
            "ranks_read": sorted(r for r in files if r % expert_tp_size == 0),
            "per_micro_batch": {"max_micro_batches": M, "source": "tpe lists one row per micro-batch"},
            **({} if top_k else {"top_k_known": False}),
        },
        micro=micro,
    )


def read_router_trace(
    source: str | os.PathLike,
    *,
    num_experts: int | None = None,
    tp_size: int = 1,
    pp_size: int = 1,
) -> Imported:
    """Read `router_trace_rank*.jsonl` (the trace directory or one file) into per-rank counts.

    num_experts: experts per layer (default: largest index seen + 1, recorded as inferred).
    tp_size: read only tensor-parallel rank 0 of each group (set it when tensor parallelism without
    sequence parallelism gives every TP rank the same tokens). Records of one (step, layer, rank)
    are summed (micro-batches).
    """
    src = Path(source)
    files = _rank_files(src, ROUTER_FILE, None, "router trace")
    acc: dict[tuple[int, int, tuple], np.ndarray] = {}
    topk_of: dict[tuple, int] = {}
    max_idx = -1
    world = max(files) + 1
    _check_sizes(world, tp_size, pp_size, src)
    per_stage = world // pp_size
    for file_rank, path in files.items():
        for no, rec in jsonl_records(path, ("step", "layer", "top_indices")):
            where = f"{path}:{no}"
            rank = int_field(rec, "rank", where) if "rank" in rec else file_rank
            if rank >= world:
                raise TraceFormatError(f"{where}: rank {rank} but the rank files found imply {world} ranks")
            if rank % tp_size:
                continue
            step = int_field(rec, "step", where)
            idx = counts_array(rec["top_indices"], where, what="'top_indices' expert indices", error=TraceFormatError)
            if idx.size == 0:
                topk = int_field(rec, "topk", where) if "topk" in rec else 1
                idx = idx.reshape(0, max(topk, 1))
            if idx.ndim != 2:
                raise TraceFormatError(f"{where}: 'top_indices' must be [tokens][top-k], got shape {idx.shape}")
            if "num_tokens" in rec and int_field(rec, "num_tokens", where) != idx.shape[0]:
                raise TraceFormatError(
                    f"{where}: num_tokens {rec['num_tokens']} but {idx.shape[0]} rows of top_indices"
                )
            key = _layer_key(rec, rank // per_stage, where)
            k = idx.shape[1]
            if idx.shape[0] and topk_of.setdefault(key, k) != k:
                raise TraceFormatError(
                    f"{where}: top-k {k} differs from earlier records of this layer ({topk_of[key]})"
                )
            if idx.size:
                max_idx = max(max_idx, int(idx.max()))
                if max_idx >= MAX_EXPERTS:
                    raise TraceFormatError(f"{where}: expert index {max_idx} is implausible (limit {MAX_EXPERTS})")
            bc = np.bincount(idx.reshape(-1))
            prev = acc.get((step, rank, key))
            if prev is not None:
                n = max(len(prev), len(bc))
                bc = np.pad(prev, (0, n - len(prev))) + np.pad(bc, (0, n - len(bc)))
            acc[(step, rank, key)] = bc
    if not acc:
        raise InputError(f"{src}: no router trace records")
    if num_experts is None and max_idx < 0:
        raise InputError(f"{src}: no record routes any token, so the number of experts is unknown; give --num-experts")
    if num_experts is not None and max_idx >= num_experts:
        raise InputError(f"{src}: expert index {max_idx} >= --num-experts {num_experts}")
    E = num_experts or max_idx + 1
    layer_keys = _order({k for _, _, k in acc})
    lpos = {k: i for i, k in enumerate(layer_keys)}
    steps = sorted({s for s, _, _ in acc})
    counts = dense({(s, r, lpos[k]): v for (s, r, k), v in acc.items()}, steps, len(layer_keys), world, E, src)
    return Imported(
        steps=np.asarray(steps, dtype=np.int64),
        counts=counts,
        layers=[_layer_name(k, pp_size, ".router") for k in layer_keys],
        experts_per_layer=[E] * len(layer_keys),
        top_k=[topk_of.get(k, 1) for k in layer_keys],
        framework="megatron-core",
        ranks_recorded=True,
        world_size=world,
        extra={
            "source_format": "megatron router trace",
            "counts_measured": "router top-k decisions before dispatch, per rank's own tokens",
            **({} if num_experts else {"num_experts_inferred": True}),
        },
    )
