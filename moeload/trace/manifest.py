"""manifest.json: what a trace holds and how to read it (docs/trace-format.md documents every field)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import operator
import os
import platform
from pathlib import Path
from typing import Any, cast

import numpy as np

from moeload.errors import TraceFormatError, TraceMismatchError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "parts"
MANIFEST_MAX_BYTES = 64 << 20
COUNT_KINDS = ("routed", "kept", "both")


_INT32 = 2**31 - 1  # ranks, layer sizes and k are int32 in parts
_BIG = 2**63 - 1


def _show(v: Any) -> str:
    """A short repr of a bad manifest value for a one-line message."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _whole(name: str, v: Any, lo: int, hi: int = _INT32) -> int:
    """v as an int in [lo, hi]; bool, float (8.9, NaN) and strings are refused, never truncated."""
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise TraceFormatError(f"manifest: field {name!r} must be an integer, got {_show(v)}")
    i = operator.index(v)
    if not lo <= i <= hi:
        raise TraceFormatError(f"manifest: field {name!r} must be in {lo}..{hi}, got {i}")
    return i


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Manifest:
    """Description of a trace. Per-layer lists are indexed by layer id (the position in `layers`).

    layers: [L] module paths of the gating modules; experts_per_layer: [L]; top_k: [L] (an int is
    broadcast); expert_to_rank: [L][E] expert-parallel rank that holds each expert, or None
    (then expert e of a layer with E experts lives on rank e // (E // ep_size)): the map at the
    first step. rank_map_changes: each later change of a layer's map, {"step": first step counted
    under the new map, "layer": layer id, "expert_to_rank": [E]}, in the order recorded
    (`map_at`; live re-placement, moeload.act).
    count_kind: "routed" (router decisions before capacity dropping), "kept" (after dropping) or
    "both" (parts carry both columns). ranks_recorded: parts hold one row per rank (global = sum
    over ranks) instead of one pre-summed row with rank -1.
    """

    layers: list[str]
    experts_per_layer: list[int]
    top_k: list[int] | int = 1
    framework: str = "unknown"
    framework_version: str | None = None
    model_name: str | None = None
    tokens_per_step: int | None = None
    world_size: int = 1
    ep_size: int = 1
    expert_to_rank: list[list[int]] | None = None
    rank_map_changes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    count_kind: str = "routed"
    ranks_recorded: bool = False
    flush_every: int | None = None
    start_time: str = dataclasses.field(default_factory=_now)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    sessions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()
        if not self.versions:
            self.versions = default_versions()

    def _check_types(self) -> None:
        """Refuse fields of the wrong type (never coerce: a string of layers is not split into letters,
        8.9 experts are not 8); integers may be Python or NumPy integers, never bool or float."""
        if not isinstance(self.layers, (list, tuple)) or not all(isinstance(x, str) for x in self.layers):
            raise TraceFormatError(
                f"manifest: field 'layers' must be a list of module paths (strings), got {_show(self.layers)}"
            )
        self.layers = list(self.layers)
        L = len(self.layers)
        for name in ("experts_per_layer", "top_k"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)):
                setattr(self, name, [_whole(name, x, 1) for x in v])
            else:
                setattr(self, name, [_whole(name, v, 1)] * L)
        self.world_size = _whole("world_size", self.world_size, 1)
        self.ep_size = _whole("ep_size", self.ep_size, 1)
        self.schema_version = _whole("schema_version", self.schema_version, 0)
        for name in ("tokens_per_step", "flush_every"):
            if getattr(self, name) is not None:
                setattr(self, name, _whole(name, getattr(self, name), 0 if name == "tokens_per_step" else 1, _BIG))
        for name in ("framework", "count_kind", "start_time"):
            if not isinstance(getattr(self, name), str):
                raise TraceFormatError(f"manifest: field {name!r} must be a string, got {_show(getattr(self, name))}")
        for name in ("framework_version", "model_name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TraceFormatError(
                    f"manifest: field {name!r} must be a string or null, got {_show(getattr(self, name))}"
                )
        if not isinstance(self.ranks_recorded, bool):
            raise TraceFormatError(
                f"manifest: field 'ranks_recorded' must be true or false, got {_show(self.ranks_recorded)}"
            )
        for name in ("versions", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise TraceFormatError(
                    f"manifest: field {name!r} must be an object (dict), got {_show(getattr(self, name))}"
                )
        if not isinstance(self.sessions, (list, tuple)) or not all(isinstance(x, dict) for x in self.sessions):
            raise TraceFormatError(f"manifest: field 'sessions' must be a list of objects, got {_show(self.sessions)}")
        self.sessions = list(self.sessions)
        for x in self.sessions:
            for key in ("writer_rank", "first_seq"):
                if key in x:
                    x[key] = _whole(f"sessions[].{key}", x[key], 0, _BIG)
        if self.expert_to_rank is not None:
            if not isinstance(self.expert_to_rank, (list, tuple)) or not all(
                isinstance(m, (list, tuple)) for m in self.expert_to_rank
            ):
                raise TraceFormatError(
                    "manifest: field 'expert_to_rank' must be [layers][experts] lists of ranks or null"
                )
            self.expert_to_rank = [[_whole("expert_to_rank", r, 0) for r in m] for m in self.expert_to_rank]
        if not isinstance(self.rank_map_changes, (list, tuple)):
            raise TraceFormatError(
                f"manifest: field 'rank_map_changes' must be a list of objects, got {_show(self.rank_map_changes)}"
            )
        self.rank_map_changes = list(self.rank_map_changes)
        for x in self.rank_map_changes:
            if not isinstance(x, dict) or set(x) != {"step", "layer", "expert_to_rank"}:
                raise TraceFormatError(
                    "manifest: field 'rank_map_changes' must hold objects with keys step, layer, "
                    f"expert_to_rank, got {_show(x)}"
                )
            x["step"] = _whole("rank_map_changes[].step", x["step"], 0, _BIG)
            x["layer"] = _whole("rank_map_changes[].layer", x["layer"], 0)
            if not isinstance(x["expert_to_rank"], list):
                raise TraceFormatError(
                    f"manifest: field 'rank_map_changes[].expert_to_rank' must be a list of ranks, "
                    f"got {_show(x['expert_to_rank'])}"
                )
            x["expert_to_rank"] = [_whole("rank_map_changes[].expert_to_rank", r, 0) for r in x["expert_to_rank"]]

    def validate(self, where: str = "manifest") -> None:
        L = len(self.layers)
        if L == 0:
            raise TraceFormatError(f"{where}: 'layers' is empty; a trace needs at least one MoE layer")
        if len(set(self.layers)) != L:
            raise TraceFormatError(f"{where}: layer names are not unique: {self.layers}")
        top_k = cast(list[int], self.top_k)  # a list since _check_types
        for name, seq in (("experts_per_layer", self.experts_per_layer), ("top_k", top_k)):
            if len(seq) != L:
                raise TraceFormatError(f"{where}: '{name}' has {len(seq)} entries for {L} layers")
            if any(v < 1 for v in seq):
                raise TraceFormatError(f"{where}: '{name}' must be positive, got {seq}")
        if self.count_kind not in COUNT_KINDS:
            raise TraceFormatError(f"{where}: count_kind must be one of {COUNT_KINDS}, got {self.count_kind!r}")
        if self.world_size < 1 or self.ep_size < 1:
            raise TraceFormatError(f"{where}: world_size and ep_size must be >= 1")
        if self.expert_to_rank is not None:
            if len(self.expert_to_rank) != L or any(
                len(m) != e for m, e in zip(self.expert_to_rank, self.experts_per_layer)
            ):
                raise TraceFormatError(f"{where}: expert_to_rank must be [layers][experts]")
            if any(r < 0 or r >= self.ep_size for m in self.expert_to_rank for r in m):
                raise TraceFormatError(f"{where}: expert_to_rank holds ranks outside [0, ep_size={self.ep_size})")
        for x in self.rank_map_changes:
            li, m = x["layer"], x["expert_to_rank"]
            if li >= L:
                raise TraceFormatError(f"{where}: rank_map_changes names layer {li}; the trace has {L} layers")
            if len(m) != self.experts_per_layer[li] or any(r >= self.ep_size for r in m):
                raise TraceFormatError(
                    f"{where}: rank_map_changes at step {x['step']}: layer {li} needs "
                    f"{self.experts_per_layer[li]} ranks in [0, ep_size={self.ep_size}), got {_show(m)}"
                )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return max(self.experts_per_layer)

    def rank_map(self) -> list[list[int]]:
        """[L][E] expert-parallel rank of each expert (the recorded map, else contiguous)."""
        if self.expert_to_rank is not None:
            return self.expert_to_rank
        out = []
        for e in self.experts_per_layer:
            per = max(1, -(-e // self.ep_size))
            out.append([min(i // per, self.ep_size - 1) for i in range(e)])
        return out

    def map_at(self, layer: int, steps: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
        """Which expert->rank map was in force for `layer` at each of `steps: [S]`.

        -> (index [S] into the list of maps, maps: the initial map (`rank_map()`) first, then each
        change of this layer sorted by step; of changes at the same step the one recorded last wins).
        """
        mine = sorted((x for x in self.rank_map_changes if x["layer"] == layer), key=lambda x: x["step"])
        maps = [self.rank_map()[layer]] + [x["expert_to_rank"] for x in mine]
        starts = np.asarray([x["step"] for x in mine], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(steps, dtype=np.int64), side="right"), maps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise TraceFormatError(f"{where}: expected a JSON object")
        version = d.get("schema_version", SCHEMA_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise TraceFormatError(
                f"{where}: field 'schema_version' must be a non-negative integer, got {_show(version)}"
            )
        if version > SCHEMA_VERSION:
            raise TraceFormatError(
                f"{where}: schema_version {version!r} is newer than this moeload reads ({SCHEMA_VERSION}); upgrade moeload"
            )
        if "extra" in d and not isinstance(d["extra"], dict):
            raise TraceFormatError(f"{where}: field 'extra' must be an object (dict), got {_show(d['extra'])}")
        missing = [k for k in ("layers", "experts_per_layer") if k not in d]
        if missing:
            raise TraceFormatError(f"{where}: missing field(s) {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = dict(kwargs.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in known})
        kwargs["extra"] = extra
        try:
            m = cls(**kwargs)
        except TraceFormatError as e:
            raise TraceFormatError(f"{where}: {str(e).removeprefix('manifest: ')}") from None
        except (TypeError, ValueError) as e:
            raise TraceFormatError(f"{where}: bad field value ({e})") from None
        m.versions = kwargs.get("versions", {})  # the writer's, as recorded: not filled with this reader's
        return m

    def check_compatible(self, other: Manifest, where: str) -> None:
        """Raise TraceMismatchError if `other` describes a different model shape."""
        for f in ("layers", "experts_per_layer", "top_k", "count_kind", "ranks_recorded"):
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                raise TraceMismatchError(
                    f"{where}: cannot append, '{f}' differs (trace has {a!r}, new run has {b!r}); "
                    "write to a new directory"
                )


def default_versions() -> dict[str, str]:
    from moeload._version import __version__

    v = {"moeload": __version__, "python": platform.python_version()}
    try:
        import torch  # noqa: PLC0415 - optional here, present when tracing

        v["torch"] = torch.__version__
    except ImportError:
        pass
    return v


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(trace_dir: str | os.PathLike) -> Manifest:
    d = Path(trace_dir)
    if not d.exists():
        raise TraceFormatError(f"{d}: no such trace directory")
    if not d.is_dir():
        raise TraceFormatError(f"{d}: not a directory (a trace is a directory holding manifest.json and parts/)")
    mpath = d / MANIFEST_NAME
    if not mpath.exists():
        raise TraceFormatError(f"{mpath}: missing; {d} is not a moeload trace")
    if not mpath.is_file():  # a FIFO or a device (/dev/zero) would block or never end
        raise TraceFormatError(f"{mpath}: not a regular file")
    with open(mpath, "rb") as f:
        data = f.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise TraceFormatError(f"{mpath}: larger than {MANIFEST_MAX_BYTES >> 20} MiB; not a moeload manifest")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"{mpath}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # integers of thousands of digits, deeply nested JSON
        raise TraceFormatError(
            f"{mpath}: unusable JSON ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
        ) from None
    return Manifest.from_dict(raw, where=str(mpath))
