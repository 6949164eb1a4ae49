"""Negative, NaN, inf, huge and misshapen values in every importer's input: one-line MoeloadError naming
the file (library) and exit code 2 with one stderr line (CLI); nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moeload.cli import app
from moeload.errors import MoeloadError
from moeload.trace.importers import import_trace

runner = CliRunner()


def _csv(rows: str):
    def make(d: Path) -> Path:
        (d / "a.csv").write_text("step,layer,expert,count\n" + rows)
        return d / "a.csv"
    return make


def _npy(arr, **npz):
    def make(d: Path) -> Path:
        if npz:
            np.savez(d / "a.npz", counts=arr, **npz)
            return d / "a.npz"
        np.save(d / "a.npy", arr)
        return d / "a.npy"
    return make


def _jsonl(name: str, *lines: str):
    def make(d: Path) -> Path:
        (d / name).write_text("\n".join(lines) + "\n")
        return d
    return make


def _tpe(tpe: str):
    return _jsonl("rank0.jsonl", f'{{"iter": 1, "layer": 0, "tpe": {tpe}}}')


def _router(indices: str, extra: str = ""):
    return _jsonl("router_trace_rank0.jsonl", f'{{"step": 0, "layer": 0{extra}, "top_indices": {indices}}}')


def _sglang(obj):
    def make(d: Path) -> Path:
        torch.save(obj, d / "expert_distribution_recorder_1.pt")
        return d
    return make


def _per_pass(count, p2l=None, **rec):
    p2l = torch.tensor([[0, 1, 2, 3]]) if p2l is None else p2l
    return _sglang({"records": [{"forward_pass_id": 0, "rank": 0, "global_physical_count": count, **rec}],
                    "last_physical_to_logical_map": p2l})


CASES = {
    # csv: "count" negative and fractional are covered in test_importers.py
    "csv NaN count": ("csv", _csv("0,0,0,5\n0,0,1,nan\n"), "column 'count' has empty or NaN cells (row 3)"),
    "csv inf count": ("csv", _csv("0,0,0,inf\n"), "column 'count': values contain NaN or inf"),
    "csv negative step": ("csv", _csv("-1,0,0,5\n"), "column 'step': values must be non-negative"),
    "csv huge count": ("csv", _csv("0,0,0,1e30\n"), "too large for int64"),
    "csv empty layer": ("csv", _csv("0,,0,5\n"), "column 'layer' has empty or NaN cells"),
    "csv huge expert": ("csv", _csv("0,0,99999999,5\n"), "implausibly large"),
    "csv text count": ("csv", _csv("0,0,0,many\n"), "column 'count' must hold integers"),
    "csv header only": ("csv", _csv(""), "no rows"),
    "npy NaN": ("numpy", _npy(np.array([[[1.0, np.nan]]])), "counts contain NaN or inf"),
    "npy inf": ("numpy", _npy(np.array([[[1.0, np.inf]]])), "counts contain NaN or inf"),
    "npy negative": ("numpy", _npy(np.array([[[1, -3]]])), "counts must be non-negative (min -3)"),
    "npy empty": ("numpy", _npy(np.zeros((0, 2, 4), int)), "no steps found"),
    "npy no experts": ("numpy", _npy(np.zeros((3, 2, 0), int)), "hold no layer or no expert"),
    "npy strings": ("numpy", _npy(np.array([[["a", "b"]]])), "counts must be integers"),
    "npz NaN experts_per_layer": ("numpy", _npy(np.ones((2, 1, 4), int), experts_per_layer=np.array([np.nan])),
                                  "experts_per_layer: values contain NaN"),
    "npz negative steps": ("numpy", _npy(np.ones((2, 1, 4), int), steps=np.array([-1, 0])),
                           "step numbers must be non-negative"),
    "npz counts past experts_per_layer": ("numpy", _npy(np.ones((2, 1, 4), int), experts_per_layer=np.array([2])),
                                          "beyond a layer's experts_per_layer"),
    "npz duplicate layer names": ("numpy", _npy(np.ones((2, 2, 4), int), layers=np.array(["a", "a"])),
                                  "layer names are not unique"),
    "tpe NaN": ("megatron-tpe", _tpe("[[1, NaN]]"), "'tpe' counts contain NaN or inf"),
    "tpe inf": ("megatron-tpe", _tpe("[[1, Infinity]]"), "'tpe' counts contain NaN or inf"),
    "tpe fractional": ("megatron-tpe", _tpe("[[1, 2.5]]"), "must be whole numbers"),
    "tpe huge": ("megatron-tpe", _tpe("[[1, 100000000000000000000000]]"), "'tpe' counts"),
    "tpe ragged": ("megatron-tpe", _tpe("[[1, 2], [3]]"), "rectangular array"),
    "tpe empty": ("megatron-tpe", _tpe("[]"), "[micro-batches][local experts]"),
    "tpe text": ("megatron-tpe", _tpe('[["a"]]'), "must be integers"),
    "router negative index": ("megatron-router-trace", _router("[[1, -2]]"), "must be non-negative (min -2)"),
    "router NaN index": ("megatron-router-trace", _router("[[1, NaN]]"), "contain NaN or inf"),
    "router huge index": ("megatron-router-trace", _router("[[1, 9999999]]"), "expert index 9999999 is implausible"),
    "router bad topk": ("megatron-router-trace", _router("[]", ', "topk": "two"'), "field 'topk' must be a non-negative"),
    "router NaN num_tokens": ("megatron-router-trace", _router("[[1, 2]]", ', "num_tokens": NaN'), "'num_tokens'"),
    "router rank past files": ("megatron-router-trace", _router("[[1, 2]]", ', "rank": 5'), "rank 5 but"),
    "router 1-d indices": ("megatron-router-trace", _router("[1, 2]"), "[tokens][top-k]"),
    "router no records": ("megatron-router-trace", _jsonl("router_trace_rank0.jsonl", ""), "no router trace records"),
    "sglang stat negative": ("sglang", _sglang({"logical_count": torch.tensor([[[1, -1]]])}), "must be non-negative"),
    "sglang stat NaN": ("sglang", _sglang({"logical_count": torch.tensor([[[1.0, float("nan")]]])}), "NaN or inf"),
    "sglang stat 2-d": ("sglang", _sglang({"logical_count": torch.tensor([[1, 2]])}), "[passes, layers, experts]"),
    "sglang stat all zero": ("sglang", _sglang({"logical_count": torch.zeros(2, 2, 4, dtype=torch.int64)}),
                             "every layer has zero counts"),
    "sglang stat rate": ("sglang", _sglang({"logical_count": torch.ones(1, 1, 2, dtype=torch.int64),
                                            "average_utilization_rate_over_window": "high"}), "must be a number"),
    "sglang per-pass negative": ("sglang", _per_pass(torch.tensor([[1, 2, -5, 0]])), "must be non-negative (min -5)"),
    "sglang per-pass inf": ("sglang", _per_pass(torch.tensor([[1.0, float("inf"), 0, 0]])), "NaN or inf"),
    "sglang per-pass shape": ("sglang", _per_pass(torch.tensor([[1, 2]])), "does not match the map"),
    "sglang per-pass bad id": ("sglang", _per_pass(torch.tensor([[1, 2, 3, 4]]), forward_pass_id="x"),
                               "forward_pass_id: value must be integers"),
    "sglang empty map": ("sglang", _per_pass(torch.tensor([[1, 2, 3, 4]]), p2l=torch.zeros(1, 0, dtype=torch.int64)),
                         "must be [layers, physical experts]"),
    "sglang negative map": ("sglang", _per_pass(torch.tensor([[1, 2, 3, 4]]), p2l=torch.tensor([[0, -1, 2, 3]])),
                            "map: expert ids must be non-negative"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_give_one_line_errors_in_library_and_cli(tmp_path, case):
    fmt, make, needle = CASES[case]
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = make(src_dir)
    with pytest.raises(MoeloadError) as e:
        import_trace(fmt, src, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert str(src_dir) in msg  # names the file (or the directory of the rank files)
    assert not (tmp_path / "out" / "manifest.json").exists()
    r = runner.invoke(app, ["import", fmt, str(src), str(tmp_path / "out2")])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], (r.output, r.exception)
