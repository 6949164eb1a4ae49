"""benchmarks/step_profile.py end to end on CPU (tiny config): it runs, writes its JSON, and its op table sees
exactly the kernels the tracer's hook adds (the grouped experts' capacity router: minimum + add_ per gate
forward, tests/tracing/test_hook_launches.py; summed over the arm's two profiled blocks, ABBA) and the hook among
the tracer's functions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_profile.py"


def test_step_profile_tiny_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("step_profile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--device", "cpu", "--config", "tiny", "--steps", "3", "--profile-steps", "2", "--top", "1000",
                    "--threads", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "step_profile_tiny_cpu.json").read_text())
    assert on_disk["profiled_s_per_step"] == res["profiled_s_per_step"] and res["tracer_errors"] == []
    assert [b["arm"] for b in res["profiled_blocks"]] == ["plain", "traced", "traced", "plain"]
    ops = {r["op"]: r for r in res["ops_by_traced_minus_plain_self_cpu"]}
    from moeload.workloads import get_config

    gates = len(get_config("tiny").moe_layers)
    assert ops["aten::minimum"]["count_traced"] - ops["aten::minimum"]["count_plain"] == gates
    assert ops["aten::isnan"]["count_traced"] - ops["aten::isnan"]["count_plain"] == gates  # NaN check, once a step
    assert any("hooks.py" in f["function"] and "(hook)" in f["function"] for f in res["moeload_functions_traced"])
