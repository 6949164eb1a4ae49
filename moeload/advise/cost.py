"""Step-time model of MoE layers: expert GEMMs, dispatch/combine all-to-all, expert migration.

Pure functions over NumPy arrays. Times are seconds, sizes bytes, token counts are routed
(token, expert) assignments. The model, stated once (docs/advise.md explains why):

- **Compute.** One GPU's expert work for one micro-batch of one layer (forward + backward) is
  `gemm_time(n)`: a piecewise-linear function of the routes `n` its local experts receive in
  total, calibrated by timing grouped GEMMs of the layer's shape (`moeload calibrate`) or a
  roofline default (H200 bf16). It is monotone in `n`, so the slowest GPU is the most loaded one.
- **All-to-all.** Tokens start evenly spread over the GPUs (data parallel), so GPU g receives
  `n_g (G - 1) / G` routes in dispatch and sends as many back in combine, and sends
  `T (G - 1) / G` of its own. One all-to-all costs `latency + max(sent, received) bytes / bw`
  per link class (within a node, across nodes; the share of peers in other nodes goes across);
  the slowest GPU sets it. A layer runs four per micro-batch (dispatch and combine, forward and
  backward).
- **No overlap within a layer**: dispatch, expert compute and combine run one after the other, so
  a layer takes `sum(all-to-all) + max_g compute_g`; layers add up. Dense (attention) time is the
  same under every placement and is left out unless given as `other_s`.
- **Migration.** Moving an expert moves its parameters and its optimizer state
  (`ExpertShape.state_bytes`): a stall of `latency + bytes / bw` on the slowest link it uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moeload.errors import InputError

#: Documented defaults used when no calibration file is given (every output says "default").
DEFAULT_DEVICE = "NVIDIA H200 (default, not measured)"
DEFAULT_PEAK_FLOPS = 989e12 * 0.55
"""bf16 dense peak of H100/H200 SXM (989 TFLOP/s) times an attained fraction for grouped GEMMs."""
DEFAULT_HBM_BW = 4.8e12 * 0.7
"""H200 HBM3e 4.8 TB/s, 70 % attained when a GEMM is bound by reading its weights."""
DEFAULT_KERNEL_S = 25e-6
"""Launch + tail of the ~6 grouped GEMM kernels of one layer's forward + backward."""
DEFAULT_INTRA_BW = 450e9 * 0.7
"""NVLink 4 (H100/H200): 450 GB/s per direction per GPU, 70 % attained by all-to-all."""
DEFAULT_INTER_BW = 50e9 * 0.8
"""400 Gb/s InfiniBand per GPU = 50 GB/s, 80 % attained."""
DEFAULT_INTRA_LAT = 10e-6
DEFAULT_INTER_LAT = 20e-6


@dataclass(frozen=True)
class ExpertShape:
    """One expert FFN: `hidden -> ffn_hidden -> hidden` (`gated`: SwiGLU, three matrices).

    act_bytes: bytes per activation element sent in all-to-all (bf16: 2).
    state_bytes_per_param: bytes moved per parameter when an expert migrates: bf16 weight (2) +
        fp32 master (4) + Adam moments (8) = 14 under mixed-precision Adam; 12 for fp32 + Adam.
    """

    hidden: int
    ffn_hidden: int
    gated: bool = False
    act_bytes: int = 2
    state_bytes_per_param: int = 14
    source: str = "given"

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn_hidden", "act_bytes", "state_bytes_per_param"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 1 << 20:
                raise InputError(f"expert shape: {name} must be an integer in 1..{1 << 20}, got {v!r}")

    @property
    def params(self) -> int:
        """Parameters of one expert."""
        return (3 if self.gated else 2) * self.hidden * self.ffn_hidden

    @property
    def flops_per_route(self) -> float:
        """Forward + backward FLOPs of one routed token (backward = 2 x forward)."""
        return 3.0 * 2.0 * self.params

    @property
    def state_bytes(self) -> int:
        """Bytes moved to migrate one expert (parameters + optimizer state)."""
        return self.params * self.state_bytes_per_param

    @property
    def weight_bytes(self) -> int:
        """bf16 weights of one expert (what a per-micro-batch copy sends)."""
        return self.params * 2

    @property
    def route_bytes(self) -> int:
        """Bytes one routed token carries in one all-to-all."""
        return self.hidden * self.act_bytes


@dataclass(frozen=True)
class Calibration:
    """Measured or default constants of the cost model.

    tokens: [K] grid of routes per GPU (ascending, starting at 0); seconds: [K] forward + backward
        time of the grouped expert GEMMs of one layer on one GPU at those routes (linear in between,
        extrapolated with the last slope). `measured` says whether the GEMM curve was timed.
    intra_bw / inter_bw: bytes/s per GPU within / across nodes; *_lat: seconds per all-to-all.
    a2a_measured: whether the all-to-all constants were timed (needs >= 2 GPUs).
    """

    tokens: tuple[float, ...]
    seconds: tuple[float, ...]
    measured: bool = False
    a2a_measured: bool = False
    intra_bw: float = DEFAULT_INTRA_BW
    inter_bw: float = DEFAULT_INTER_BW
    intra_lat: float = DEFAULT_INTRA_LAT
    inter_lat: float = DEFAULT_INTER_LAT
    device: str = DEFAULT_DEVICE
    shape: dict = field(default_factory=dict)
    rel_error: float = 0.15
    """Relative error assumed for predicted times (measured: the calibration's own median error)."""
    tile: int = 0
    """Rows a grouped GEMM pads each expert's group to (0: none). With a tile, a GPU's GEMM time is
    read at its padded routes `sum_e ceil(n_e / tile) * tile` (see `padded_routes`)."""

    def __post_init__(self) -> None:
        t = np.asarray(self.tokens, dtype=np.float64)
        s = np.asarray(self.seconds, dtype=np.float64)
        if t.ndim != 1 or t.shape != s.shape or t.size < 2:
            raise InputError("calibration: tokens and seconds must be equal-length lists of >= 2 numbers")
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))) or np.any(np.diff(t) <= 0) or t[0] < 0:
            raise InputError("calibration: tokens must be finite, non-negative and strictly ascending")
        if np.any(s < 0) or np.any(np.diff(s) < 0):
            raise InputError("calibration: seconds must be finite, non-negative and non-decreasing in tokens")
        for name in ("intra_bw", "inter_bw"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InputError(f"calibration: {name} must be a positive number, got {v!r}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or not 0 <= self.tile <= 4096:
            raise InputError(f"calibration: tile must be an integer in 0..4096, got {self.tile!r}")
        for name in ("intra_lat", "inter_lat", "rel_error"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"calibration: {name} must be a non-negative number, got {v!r}")

    @property
    def kind(self) -> str:
        """ "measured" when the GEMM curve was timed on a GPU, else "default"."""
        return "measured" if self.measured else "default"

    def gemm_time(self, routes: np.ndarray) -> np.ndarray:
        """`routes: [...]` routes on one GPU -> `[...]` seconds of its expert GEMMs (fwd + bwd)."""
        t = np.asarray(self.tokens, dtype=np.float64)
        s = np.asarray(self.seconds, dtype=np.float64)
        n = np.asarray(routes, dtype=np.float64)
        out = np.interp(n, t, s)
        slope = (s[-1] - s[-2]) / (t[-1] - t[-2])
        beyond = n > t[-1]
        if np.any(beyond):
            out = np.where(beyond, s[-1] + (n - t[-1]) * slope, out)
        return np.where(n > 0, out, 0.0)

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a file written by `moeload calibrate`; InputError naming the file otherwise."""
        p = Path(path)
        try:
            if p.stat().st_size > 1 << 20:
                raise InputError(f"{p}: calibration file larger than 1 MiB")
            raw = json.loads(p.read_text())
        except InputError:
            raise
        except (OSError, ValueError, RecursionError) as err:
            raise InputError(f"{p}: not a readable calibration JSON ({type(err).__name__}: {err})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{p}: calibration must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"{p}: unknown calibration field(s) {unknown}")
        try:
            raw["tokens"] = tuple(float(x) for x in raw.get("tokens", ()))
            raw["seconds"] = tuple(float(x) for x in raw.get("seconds", ()))
            return cls(**raw)
        except InputError as err:
            raise InputError(f"{p}: {err}") from None
        except (TypeError, ValueError) as err:
            raise InputError(f"{p}: bad calibration field ({err})") from None


def default_calibration(shape: ExpertShape, local_experts: int, max_routes: float = 1 << 20) -> Calibration:
    """Roofline curve for `shape` with `local_experts` experts per GPU (H200 bf16 defaults).

    Each GEMM is bound by its FLOPs or by reading the local experts' weights (3 passes: forward,
    two backward GEMMs per matrix), whichever is slower, plus a fixed kernel time.
    """
    grid = np.unique(np.concatenate([[0.0, 1.0], np.geomspace(16, max(max_routes, 32), 40)]))
    flops = grid * shape.flops_per_route / DEFAULT_PEAK_FLOPS
    weights = 3.0 * local_experts * shape.weight_bytes / DEFAULT_HBM_BW
    secs = np.where(grid > 0, DEFAULT_KERNEL_S + np.maximum(flops, weights), 0.0)
    return Calibration(tuple(grid.tolist()), tuple(np.maximum.accumulate(secs).tolist()), shape=asdict(shape))


def a2a_time(
    gpu_routes: np.ndarray, routes_total: np.ndarray, shape: ExpertShape, cal: Calibration, num_nodes: int = 1
) -> np.ndarray:
    """Time of one all-to-all.

    gpu_routes: [..., G] routes each GPU's experts receive; routes_total: [...] all routes
    (sum over GPUs). Returns [...] seconds, set by the slowest GPU (see the module docstring).
    """
    n = np.asarray(gpu_routes, dtype=np.float64)
    G = n.shape[-1]
    if G == 1:
        return np.zeros(n.shape[:-1])
    total = np.asarray(routes_total, dtype=np.float64)
    recv = n * (G - 1) / G
    sent = (total / G * (G - 1) / G)[..., None]
    worst = np.maximum(recv, sent).max(axis=-1) * shape.route_bytes
    per_node = G // max(num_nodes, 1)
    if num_nodes <= 1:
        return cal.intra_lat + worst / cal.intra_bw
    cross = (G - per_node) / (G - 1)
    t_intra = cal.intra_lat + worst * (1 - cross) / cal.intra_bw
    t_inter = cal.inter_lat + worst * cross / cal.inter_bw
    return np.maximum(t_intra, t_inter)


def padded_routes(per_slot: np.ndarray, num_gpus: int, tile: int, micro_batches: int = 1) -> np.ndarray:
    """`per_slot: [..., R]` routes of each slot in one step -> `[..., G]` routes the GEMMs process.

    Each micro-batch pads every slot's group to a multiple of `tile` rows (0: no padding):
    `M * sum_slots ceil(n / M / tile) * tile`.
    """
    n = np.asarray(per_slot, dtype=np.float64)
    if tile:
        n = micro_batches * np.ceil(n / micro_batches / tile) * tile
    return n.reshape(n.shape[:-1] + (num_gpus, -1)).sum(axis=-1)


def layer_time(
    gpu_routes: np.ndarray,
    shape: ExpertShape,
    cal: Calibration,
    num_nodes: int = 1,
    micro_batches: int = 1,
    gemm_routes: np.ndarray | None = None,
) -> np.ndarray:
    """Forward + backward time of MoE layers from `gpu_routes: [..., G]` routes per GPU of one step.

    The step's routes are split evenly over `micro_batches`; each micro-batch pays four
    all-to-alls and the slowest GPU's GEMMs. `gemm_routes: [..., G]` (default `gpu_routes`) are
    the routes the GEMMs process, padding included (`padded_routes`). Returns `[...]` seconds.
    """
    n = np.asarray(gpu_routes, dtype=np.float64) / micro_batches
    g = n if gemm_routes is None else np.asarray(gemm_routes, dtype=np.float64) / micro_batches
    compute = cal.gemm_time(g.max(axis=-1))
    comm = 4.0 * a2a_time(n, n.sum(axis=-1), shape, cal, num_nodes)
    return micro_batches * (compute + comm)


def floor_time(
    routes_total: np.ndarray,
    num_gpus: int,
    shape: ExpertShape,
    cal: Calibration,
    num_nodes: int = 1,
    micro_batches: int = 1,
) -> np.ndarray:
    """The same as `layer_time` with every GPU holding exactly `routes_total / G`: the floor."""
    total = np.asarray(routes_total, dtype=np.float64)
    even = np.repeat((total / num_gpus)[..., None], num_gpus, axis=-1)
    return layer_time(even, shape, cal, num_nodes, micro_batches)


def migration_time(
    moved_experts: np.ndarray, shape: ExpertShape, cal: Calibration, num_gpus: int, num_nodes: int = 1
) -> np.ndarray:
    """Stall to move `moved_experts: [...]` experts (spread over the GPUs) with their optimizer state.

    Moves are spread evenly over the GPUs' links (ceil per GPU); across nodes when there is more
    than one. Returns `[...]` seconds (0 where nothing moves).
    """
    m = np.asarray(moved_experts, dtype=np.float64)
    per_gpu = np.ceil(m / max(num_gpus, 1))
    bw, lat = (cal.inter_bw, cal.inter_lat) if num_nodes > 1 else (cal.intra_bw, cal.intra_lat)
    return np.where(m > 0, lat + per_gpu * shape.state_bytes / bw, 0.0)


def copy_time(copies_per_gpu: np.ndarray, shape: ExpertShape, cal: Calibration, num_nodes: int = 1) -> np.ndarray:
    """Per micro-batch cost of `copies_per_gpu: [...]` temporary expert copies received by one GPU.

    A copy brings the expert's bf16 weights and sends its bf16 gradients back (2 x weight bytes).
    """
    c = np.asarray(copies_per_gpu, dtype=np.float64)
    bw, lat = (cal.inter_bw, cal.inter_lat) if num_nodes > 1 else (cal.intra_bw, cal.intra_lat)
    return np.where(c > 0, lat + c * 2.0 * shape.weight_bytes / bw, 0.0)
