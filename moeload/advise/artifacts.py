"""Files to act on the advice, in the formats the tools that read them document.

- `sglang_init_expert_location.json`: `{"physical_to_logical_map": [L][R]}`, for SGLang's
  `--init-expert-location FILE` (read by `compute_initial_expert_location_metadata` in
  sglang `python/sglang/srt/eplb/expert_location.py`, which passes the keys to
  `ExpertLocationMetadata.init_by_mapping`; R = num physical experts, slot s on EP rank
  `s // (R / ep_size)`).
- `eplb_phy2log.json`: DeepSeek EPLB's `rebalance_experts` outputs for the same plan:
  `phy2log [L, R]`, `log2phy [L, E, max_copies]` (-1 padded), `logcnt [L, E]`.
- `vllm_eplb.txt`: vLLM serve flags `--enable-eplb --eplb-config '{...}'` with EPLBConfig's
  `window_size`, `step_interval`, `num_redundant_experts` (vllm `vllm/config/parallel.py`).
- `megatron_flags.txt`: megatron-core / MindSpeed training flags for the expert-parallel size and
  the router's balancing (`--moe-router-load-balancing-type`, `--moe-router-enable-expert-bias`).

The plan is EPLB's (`moeload.placement.plan(policy="eplb")`) for the mean routes of the trace's
last window (`Advice.last_window`), with the advice's GPUs and replicas.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeload.errors import InputError


def write_artifacts(advice, out_dir: str | Path) -> dict[str, Path]:
    """Write the four files into `out_dir` (created if missing); returns {kind: path}."""
    from moeload.placement import plan

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    s = advice.setting
    weight = np.maximum(advice.last_window, 0.0) + 1e-9
    p = plan(weight, num_gpus=s.num_gpus, num_replicas=s.num_replicas, policy="eplb")
    paths = {
        "sglang": out / "sglang_init_expert_location.json",
        "eplb": out / "eplb_phy2log.json",
        "vllm": out / "vllm_eplb.txt",
        "megatron": out / "megatron_flags.txt",
    }
    paths["sglang"].write_text(json.dumps({"physical_to_logical_map": p.phy2log.tolist()}) + "\n")
    paths["eplb"].write_text(
        json.dumps(
            {
                "phy2log": p.phy2log.tolist(),
                "log2phy": p.log2phy.tolist(),
                "logcnt": p.replica_counts.tolist(),
                "num_gpus": s.num_gpus,
                "num_replicas": s.num_replicas,
                "calibration": advice.calibration,
            }
        )
        + "\n"
    )
    eplb_cfg = {
        "window_size": 1000,
        "step_interval": 3000 if advice.recommended != "forecast" else int(advice.info.get("forecast_interval", 3000)),
        "num_redundant_experts": int(s.num_replicas - s.num_experts),
    }
    paths["vllm"].write_text(
        f"# moeload advise: recommended {advice.recommended} ({advice.calibration} calibration)\n"
        f"--enable-eplb --eplb-config '{json.dumps(eplb_cfg)}'\n"
    )
    paths["megatron"].write_text(
        f"# moeload advise: recommended {advice.recommended} ({advice.calibration} calibration)\n"
        f"# expert parallelism over the advised GPUs; megatron-core has no static expert map flag,\n"
        f"# so the placement above cannot be applied by a flag; the file holds the parallel and router settings.\n"
        f"--expert-model-parallel-size {s.num_gpus}\n"
        f"--moe-router-load-balancing-type aux_loss\n"
        f"# aux-loss-free alternative (DeepSeek-V3 expert bias):\n"
        f"# --moe-router-load-balancing-type none --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3\n"
    )
    return paths
