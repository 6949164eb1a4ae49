"""LoadTracer's hot path: the forward hook each gate gets (counts into the device buffer, micro-batch rows,
NaN checks), the router-bias snapshot, disabling a faulty layer, and logical-expert counts after a
re-placement (`record_rank_map(phy2log=...)`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moeload.errors import first_line
from moeload.tracing.accumulate import accumulate, as_routing
from moeload.tracing.adapters import GateSpec, Routing, RoutingShapeError
from moeload.tracing.block import DISABLED_ERROR, DISABLED_SHAPE, FLAG_COL, NAN_COL, NAN_REASON, REASONS, TOKENS_COL
from moeload.tracing.tracer_state import TracerState

_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (checkpoint recomputes).
    Not traceable by dynamo: under torch.compile the graph breaks here and the hook runs eagerly
    (`LoadTracer(hooks_in_graph=True)` takes the in-graph path instead)."""
    return _graph_task_id() != -1


_FAST_INDEX_DTYPES = frozenset((torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64))
_ONES_KEPT = 64  # distinct route counts (capacities) per gate whose ones views (caps) a hook keeps (reset beyond)
_INT64_MAX = torch.iinfo(torch.int64).max


class _Rows:
    """A hook's views of the rows one forward counts into: routed, kept [W] (kept None where not
    recorded), and, made when first needed, the expert bins [1, E] of each, routed's TOKENS_COL bin and
    `pair`: both rows' expert bins as one [2, E] view of the buffer (row `kept_at` is the kept row), for
    rows that lie in one buffer (`planes` = (buffer's slot row [P, L, W], routed plane, kept plane, layer);
    micro-batch rows do not). Made once per step and plane (views cost host time, ~1 µs each), not per
    forward."""

    __slots__ = ("kept", "kept_at", "kept_e", "nan", "pair", "planes", "routed", "routed_e", "tok")

    def __init__(self, routed: torch.Tensor, kept: torch.Tensor | None, planes: tuple | None = None) -> None:
        self.routed, self.kept, self.planes = routed, kept, planes
        self.routed_e: torch.Tensor | None = None
        self.kept_e: torch.Tensor | None = None
        self.tok: torch.Tensor | None = None
        self.pair: torch.Tensor | None = None
        self.nan: torch.Tensor | None = None  # where this forward's NaN check sums the probabilities (0-d float64)
        self.kept_at = 1

    def pair_view(self, num_experts: int) -> torch.Tensor | None:
        """[2, E] view of the routed and kept rows' expert bins (None for rows in two buffers)."""
        if self.pair is None and self.planes is not None:
            plane_rows, pr, pk, li = self.planes
            lo, d = min(pr, pk), abs(pk - pr)
            self.pair = plane_rows[lo : lo + d + 1 : d, li, 1 : num_experts + 1]
            self.kept_at = int(pk > pr)
        return self.pair


class GateHooks(TracerState):
    """The part of LoadTracer that runs inside the gates' forwards."""

    def _make_hook(self, li: int, spec: GateSpec) -> Callable:
        """The eager hook of gate `li`. Its steady state (a forward of a top-k-indices or counts routing on
        the buffer's device) launches bucketize + index_add_ (indices; index_add_ alone where the spec
        says `ids_in_range`) or one add_ (counts) per row it counts into; a counts routing with a
        `capacity` adds both rows in minimum + add_. It reads no tensor value and builds one view at most
        (the flattened indices): the rows' views are made once per step, the bin boundaries once per
        index dtype, the ones vector once per route count, the caps once per capacity. Anything else (a
        mask, another device or dtype, a malformed routing) goes through `accumulate`, which checks it."""
        lay = self.layout
        calls, mb_calls, nan_step, cache = self._calls, self._mb_calls, self._nan_step, self._cache
        in_graph = self.hooks_in_graph
        is_compiling = torch.compiler.is_compiling
        graph_task_id = _graph_task_id
        E, top_k = spec.num_experts, spec.top_k
        own_counts = spec.counts  # ids_in_range holds for the adapter's own reading (not a re-mapped one)
        # (routed, kept) planes a forward counts into, by module.training; None: an eval forward not recorded
        train_planes = (lay.routed, lay.kept)
        eval_planes = None if lay.eval_routed is None else (lay.eval_routed, lay.eval_kept)
        views: dict[int, _Rows] = {}  # routed plane -> this gate's rows in slot at[0] of buffer at[1]
        nan_views: dict[int, torch.Tensor] = {}  # routed plane -> this gate's 0-d view of _nan_sums (buffer at[1]'s)
        at: list[Any] = [-1, None, -1, False]  # slot, buffer, its get_device() and is_cuda
        bounds: dict[torch.dtype, torch.Tensor] = {}  # bin boundaries per index dtype (see accumulate)
        ones: dict[int, torch.Tensor] = {}  # ones vector per number of routes
        caps: dict[tuple[int, int], torch.Tensor] = {}  # (capacity, kept row in the pair) -> [2, 1] caps

        def caps_for(cap: int, rows: _Rows) -> torch.Tensor:
            """[2, 1] int64: the kept row's capacity, int64 max for the routed row (min() leaves it as is)."""
            key = (cap, rows.kept_at)
            t = caps.get(key)
            if t is None:
                if len(caps) >= _ONES_KEPT:
                    caps.clear()
                col = [_INT64_MAX, _INT64_MAX]
                col[rows.kept_at] = cap
                t = caps[key] = torch.tensor(col, dtype=torch.int64, device=rows.routed.device).view(2, 1)
            return t

        def bounds_for(dtype: torch.dtype, rows: _Rows) -> torch.Tensor | None:
            """The cached bin boundaries for ids of `dtype`; None for a dtype the fast path does not take."""
            b = bounds.get(dtype)
            if b is None and dtype in _FAST_INDEX_DTYPES:
                b = bounds[dtype] = cache.bounds(rows.routed.device, dtype, E)
            return b

        def fast(r: Routing, rows: _Rows, check: bool) -> int | None | bool:
            """Count `r` into `rows` if it has a steady-state form (see _make_hook); False if it has not
            (nothing launched then). Returns the tokens for the host tally (int), or None."""
            dev_index, dev_cuda = at[2], at[3]
            tokens = r.tokens
            if tokens is not None and type(tokens) is not int and not isinstance(tokens, torch.Tensor):
                return False
            idx = r.indices
            if idx is not None:
                if idx.dim() != 2 or idx.get_device() != dev_index or idx.is_cuda is not dev_cuda:
                    return False
                b = bounds_for(idx.dtype, rows)
                if b is None:
                    return False
                keep = r.kept
                if keep is not None and (
                    keep.numel() != idx.numel() or keep.get_device() != dev_index or keep.is_cuda is not dev_cuda
                ):
                    return False
                n = idx.numel()
                o = ones.get(n)
                if o is None:
                    if len(ones) >= _ONES_KEPT:
                        ones.clear()
                    o = ones[n] = cache.ones(rows.routed.device, n)
                if tokens is None:
                    tokens = idx.shape[0]
                if (
                    spec.ids_in_range
                    and (keep is None or rows.kept is None)
                    and idx.dtype is torch.int64
                    and spec.counts is own_counts
                ):  # ids in [0, E): expert e is bin e + 1 of the rows, no binning kernel
                    flat = idx.reshape(-1)
                    if rows.routed_e is None:
                        rows.routed_e = rows.routed[1 : E + 1]
                    rows.routed_e.index_add_(0, flat, o)
                    if rows.kept is not None:
                        if rows.kept_e is None:
                            rows.kept_e = rows.kept[1 : E + 1]
                        rows.kept_e.index_add_(0, flat, o)
                    return _nan_and_tokens(r, rows, check, tokens)
                i = torch.bucketize(idx.reshape(-1), b)  # id <= -1 -> 0, e -> e + 1, >= E -> E + 1
                rows.routed.index_add_(0, i, o)
                if rows.kept is not None:
                    if keep is not None and keep.dtype is torch.bool and keep.shape == idx.shape:
                        i.view(idx.shape).mul_(keep)  # dropped routes -> bin 0, in place: no copy of keep
                    elif keep is not None:
                        i = torch.where(keep.reshape(-1).bool(), i, 0)
                    rows.kept.index_add_(0, i, o)
            else:
                c, kc, kid, cap = r.counts, r.kept_counts, r.kept_ids, r.capacity
                if r.mask is not None or c is None or tokens is None or not _counts_ok(c, E, dev_index, dev_cuda):
                    return False
                if cap is not None:  # kept = min(routed, C) per expert (Routing.capacity)
                    if kc is not None or kid is not None or type(cap) is not int or cap < 0:
                        return False  # accumulate says what is wrong
                    if rows.kept is not None:
                        pair = rows.pair_view(E)
                        if pair is not None:  # both rows in two kernels
                            pair.add_(torch.minimum(c, caps_for(cap, rows)))
                            return _nan_and_tokens(r, rows, check, tokens)
                        kc = c.clamp(max=cap)  # micro-batch rows: the kept row apart
                if kc is not None and not _counts_ok(kc, E, dev_index, dev_cuda):
                    return False
                kb = None
                if kid is not None and rows.kept is not None:  # kept ids: binned into the kept row
                    if kid.get_device() != dev_index or kid.is_cuda is not dev_cuda or kc is not None:
                        return False
                    kb = bounds_for(kid.dtype, rows)
                    if kb is None:
                        return False
                if rows.routed_e is None:
                    rows.routed_e = rows.routed[1 : E + 1]
                rows.routed_e.add_(c)
                if rows.kept is not None:
                    if kb is not None:  # dropped (-1) -> bin 0, ids >= E -> E + 1: outside the kept row's [1, E]
                        assert kid is not None  # kb is made from it
                        n = kid.numel()
                        o = ones.get(n)
                        if o is None:
                            if len(ones) >= _ONES_KEPT:
                                ones.clear()
                            o = ones[n] = cache.ones(rows.routed.device, n)
                        rows.kept.index_add_(0, torch.bucketize(kid.reshape(-1), kb), o)
                    else:
                        if rows.kept_e is None:
                            rows.kept_e = rows.kept[1 : E + 1]
                        rows.kept_e.add_(c if kc is None else kc)
            return _nan_and_tokens(r, rows, check, tokens)

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if in_graph and is_compiling():  # traced into the graph: no host state per call
                compiled_hook(module, inputs, output)
                return
            calls[li] += 1
            try:
                if module.training:
                    if graph_task_id() != -1:  # a checkpoint recomputation inside backward (see in_backward)
                        return
                    pr, pk = train_planes
                elif eval_planes is None:
                    return
                else:
                    pr, pk = eval_planes
                slot, buf = self._slot, self._buf
                if slot != at[0] or buf is not at[1]:
                    assert buf is not None  # hooks exist between start() and close()
                    views.clear()
                    if buf is not at[1]:
                        nan_views.clear()
                    at[:] = [slot, buf, buf.get_device(), buf.is_cuda]
                rows = views.get(pr)
                if rows is None:
                    b = at[1][slot]
                    rows = views[pr] = (
                        _Rows(b[pr, li], None) if pk is None else _Rows(b[pr, li], b[pk, li], (b, pr, pk, li))
                    )
                tally, tat = self._host_tok, (slot, pr, li)
                if self._mb is not None and pr == lay.routed:  # the m-th train forward of this gate: micro-batch m
                    m = mb_calls[li]
                    mb_calls[li] = m + 1
                    if m < self.max_micro_batches:
                        rows, tally, tat = _Rows(self._mb[slot, m, li], rows.kept), self._host_tok_mb, (slot, m, li)
                    else:
                        self._stop_micro()
                step = self._first_step + slot
                check = nan_step[li] != step  # NaN probabilities: checked at each gate's first forward of a step
                nan_step[li] = step
                if check:
                    nv = nan_views.get(pr)
                    if nv is None and self._nan_sums is not None:
                        nv = nan_views[pr] = self._nan_sums[pr, li]
                    rows.nan = nv
                r = spec.counts(module, inputs, output)
                if type(r) is not Routing:
                    r = as_routing(r)
                tokens = fast(r, rows, check)
                if tokens is False:
                    if r.kept_ids is not None:
                        r = _with_kept_counts(r, E)
                    tokens = accumulate(r, rows.routed, rows.kept, E, top_k, cache=cache, nan=check)
                if tokens is not None:
                    assert tally is not None  # allocated with the rows it tallies for
                    tally[tat] += tokens
            except Exception as e:
                code = DISABLED_SHAPE if isinstance(e, RoutingShapeError) else DISABLED_ERROR
                self._disable(li, f"{type(e).__name__}: {e}", code)

        def compiled_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            """The hook as dynamo traces it: the routing is added to `_live` (the open step's rows, folded
            into the block at step()), tokens and the NaN check on the device; no host state is read or
            written, so nothing the graph guards on changes from call to call or step to step."""
            planes = train_planes if module.training else eval_planes
            if planes is None:
                return
            pr, pk = planes
            live = self._live
            assert live is not None  # allocated with the buffer
            r = as_routing(spec.counts(module, inputs, output))
            if r.kept_ids is not None:
                r = _with_kept_counts(r, E)
            accumulate(r, live[pr, li], None if pk is None else live[pk, li], spec.num_experts, spec.top_k)

        return hook

    def _stop_micro(self) -> None:
        """A gate ran more than max_micro_batches times in one step: micro-batch rows stop from this step
        (its earlier micro-batches are still summed into the step), one warning, manifest note."""
        if self.micro_batches_stopped is None:
            step = self.step_count
            self.micro_batches_stopped = {
                "step": step,
                "reason": f"a gate ran more than max_micro_batches={self.max_micro_batches} forwards in step "
                f"{step}; step totals stay exact",
            }
            warnings.warn(
                f"moeload: micro-batch rows stop at step {step}: more than max_micro_batches="
                f"{self.max_micro_batches} forwards of one gate in a step (raise it); step totals are exact",
                RuntimeWarning,
                stacklevel=4,
            )

    def _snap_bias(self) -> None:
        """Copy each router's expert bias into the current slot (the bias the coming step routes with:
        taken at start() and after each step(), i.e. after the optimizer step that updated it). One
        device copy per biased gate, no host sync; a bias that cannot be read stops being recorded for
        that layer (NaN from there, one warning, manifest extra.bias_errors)."""
        if not self._bias_fns or self._buf is None or self.tracing_stopped is not None:
            return
        row = self._buf[self._slot, self.layout.bias]
        for entry in list(self._bias_fns):
            li, fn, E = entry
            dst = row[li, 1 : E + 1].view(torch.float64)
            try:
                v = fn()
                if v is None:
                    dst.fill_(float("nan"))
                else:
                    dst.copy_(v.detach().reshape(E))
            except Exception as e:
                self._bias_fns.remove(entry)
                dst.fill_(float("nan"))
                name = self.local_layers[li]
                self._bias_errors[name] = f"step {self.step_count}: {type(e).__name__}: {first_line(e, 160)}"
                warnings.warn(
                    f"moeload: the expert bias of layer {name!r} could not be read ({self._bias_errors[name]}); "
                    "it is not recorded from here on (counts are)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _disable(self, li: int, msg: str, code: int | None) -> None:
        """On the main thread: remove layer `li`'s hook, note why, warn once per layer. code: the FLAG_COL
        value written into this step's block (None for NaN: the writer thread found it in the block)."""
        handle = self._handles.pop(li, None)
        if handle is not None:
            handle.remove()
        name = self.local_layers[li]
        if name in self._hook_errors:
            return
        self._hook_errors[name] = msg
        self.errors.append(f"layer {name!r} at step {self.step_count}: {msg}")
        if code is not None and self._buf is not None:
            self._buf[self._slot, self.layout.routed, li, FLAG_COL].fill_(code)
        reason = NAN_REASON if code is None else REASONS[code]
        warnings.warn(
            f"moeload: tracing of layer {name!r} disabled ({reason}: {msg}); training continues",
            RuntimeWarning,
            stacklevel=3,
        )


def _nan_and_tokens(r: Routing, rows: _Rows, check: bool, tokens: int | torch.Tensor) -> int | None:
    """The end of the hook's fast path: the NaN check (where `check`) and the tokens: an int is returned
    for the host tally, a tensor is added into the TOKENS_COL bin. The NaN check is one launch: the
    probabilities' float64 sum into the gate's `_nan_sums` element (`rows.nan`), which step() folds into
    NAN_COL for all gates at once (`_fold_nan`); a sum is NaN where any probability is NaN, and also where
    +inf and -inf meet, which no probability should hold either. Probabilities on another device than the
    buffer, or complex ones, are checked in place (isnan + any + add_)."""
    p = r.probs
    if check and isinstance(p, torch.Tensor) and (p.is_floating_point() or p.is_complex()):
        out = rows.nan
        if (
            out is not None
            and p.is_floating_point()
            and p.get_device() == out.get_device()
            and p.is_cuda is out.is_cuda
        ):
            # NaN iff p holds a NaN (or both infinities); the out= form needs the dims spelled out
            torch.sum(p.detach(), tuple(range(p.dim())), dtype=torch.float64, out=out)
        else:
            rows.routed[NAN_COL].add_(torch.isnan(p).any().to(rows.routed.device, non_blocking=True))
    if isinstance(tokens, int):
        return tokens
    if rows.tok is None:
        rows.tok = rows.routed[TOKENS_COL]
    rows.tok.add_(tokens.to(rows.tok.device, torch.int64, non_blocking=True))
    return None


def _with_kept_counts(r: Routing, num_experts: int) -> Routing:
    """r with its kept_ids (the counts form's kept routes as ids) turned into kept_counts [E], for
    `accumulate` (which reads kept_counts); ids outside [0, E) are not counted, as in the kept row."""
    ids = r.kept_ids
    assert ids is not None  # called where it is set
    if r.kept_counts is not None or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise RoutingShapeError(
            f"kept_ids must be integer expert ids, given without kept_counts; got {ids.dtype}"
            f"{' and kept_counts' if r.kept_counts is not None else ''}"
        )
    i = ids.reshape(-1).to(torch.int64)
    i = torch.where((i >= 0) & (i < num_experts), i, num_experts)
    kc = torch.zeros(num_experts + 1, dtype=torch.int64, device=i.device).index_add_(0, i, torch.ones_like(i))
    return r._replace(kept_counts=kc[:num_experts], kept_ids=None)


def _counts_ok(c: torch.Tensor, num_experts: int, dev_index: int, dev_cuda: bool) -> bool:
    """c is an [E] int64 counts vector on the buffer's device (the counts form's steady state)."""
    return (
        c.dim() == 1
        and c.shape[0] == num_experts
        and c.dtype is torch.int64
        and c.get_device() == dev_index
        and c.is_cuda is dev_cuda
    )


def _logical_counts(counts: Callable, phy2log: list[int], device: torch.device) -> Callable:
    """A gate's counts function whose router column p now holds logical expert phy2log[p] -> one that
    reports logical experts (device-side indexing only, no host sync)."""
    E = len(phy2log)
    p2l = torch.tensor(phy2log, dtype=torch.int64, device=device)
    l2p = torch.argsort(p2l)

    def logical(module: nn.Module, inputs: tuple, output: Any) -> Any:
        r = as_routing(counts(module, inputs, output))

        def to_logical(idx: torch.Tensor | None) -> torch.Tensor | None:
            if idx is None:
                return None
            ok = (idx >= 0) & (idx < E)
            return torch.where(ok, p2l.to(idx.device)[idx.clamp(0, E - 1).long()].to(idx.dtype), idx)

        cols = {
            k: getattr(r, k)[..., l2p.to(getattr(r, k).device)]
            for k in ("mask", "kept_mask", "counts", "kept_counts")
            if getattr(r, k) is not None
        }
        return r._replace(indices=to_logical(r.indices), kept_ids=to_logical(r.kept_ids), **cols)

    return logical
