"""Importers round-trip their fixtures: import -> open_trace -> counts equal the fixture's.

Fixture formats (tests/fixtures/importers/README.md):
- Megatron-LM tokens_per_expert JSONL: NVIDIA/Megatron-LM megatron/training/activation_logging.py
- Megatron-core router trace JSONL: NVIDIA/Megatron-LM megatron/core/transformer/moe/router_trace.py
- SGLang expert distribution dumps: sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moeload.errors import InputError, TraceFormatError
from moeload.trace import open_trace
from moeload.trace.importers import available, import_trace

FIX = Path(__file__).parents[1] / "fixtures" / "importers"


def test_available_lists_every_format():
    assert available() == ["csv", "numpy", "megatron-tpe", "megatron-router-trace", "sglang"]


def test_megatron_tokens_per_expert_round_trip(tmp_path):
    # ep=2 ranks x 2 local experts; micro-batches summed; rank r holds global experts 2r, 2r+1
    t = open_trace(import_trace("megatron-tpe", FIX / "megatron_tpe", tmp_path / "t", top_k=2))
    assert t.steps.tolist() == [10, 20]
    assert t.layers == ["decoder.layers.1.mlp.experts", "decoder.layers.3.mlp.experts",
                        "mtp.layers.0.mtp_model_layer.layers.0.mlp.experts"]
    want = [
        [[55, 25, 26, 54], [38, 42, 4, 76], [11, 13, 6, 18]],
        [[73, 7, 41, 39], [23, 57, 65, 15], [17, 7, 13, 11]],
    ]
    np.testing.assert_array_equal(t.counts(), want)
    m = t.manifest
    assert (m.framework, m.ep_size, m.world_size, m.top_k) == ("megatron-lm", 2, 2, [2, 2, 2])
    # expert -> rank map is Megatron's contiguous one: experts 0,1 on rank 0
    np.testing.assert_array_equal(t.gpu_loads()[0, 0], [80, 80])


def test_megatron_tokens_per_expert_keeps_micro_batches(tmp_path):
    """tpe holds one row per micro-batch: they are kept (micro/ parts) and add up to the step counts."""
    t = open_trace(import_trace("megatron-tpe", FIX / "megatron_tpe", tmp_path / "t", top_k=2))
    mb = t.micro_batch_counts()  # [S, M, L, E]
    assert mb.shape == (2, 2, 3, 4)
    # iteration 10, layer 1: rank 0's local experts [30, 10] / [25, 15], rank 1's [12, 28] / [14, 26]
    np.testing.assert_array_equal(mb[0, :, 0], [[30, 10, 12, 28], [25, 15, 14, 26]])
    np.testing.assert_array_equal(mb.sum(1), t.counts())
    assert t.manifest.extra["per_micro_batch"]["max_micro_batches"] == 2


def test_megatron_tokens_per_expert_single_file_is_one_rank(tmp_path):
    t = open_trace(import_trace("megatron-tpe", FIX / "megatron_tpe/tokens_per_expert/rank0.jsonl", tmp_path / "t"))
    np.testing.assert_array_equal(t.counts()[0, 0], [55, 25])
    assert t.manifest.extra["top_k_known"] is False


def test_megatron_router_trace_round_trip(tmp_path):
    t = open_trace(import_trace("megatron-router-trace", FIX / "megatron_router_trace", tmp_path / "t"))
    assert t.layers == ["decoder.layers.0.mlp.router", "decoder.layers.1.mlp.router"]
    assert t.top_k == [2, 2] and t.manifest.ranks_recorded and t.manifest.world_size == 2
    per_rank = [
        [[[6, 4, 2, 2], [2, 2, 5, 5]], [[1, 1, 2, 4], [3, 3, 1, 1]]],  # step 0: rank 0, rank 1
        [[[2, 4, 1, 1], [2, 1, 4, 1]], [[1, 2, 4, 1], [2, 3, 0, 3]]],  # step 1
    ]
    np.testing.assert_array_equal(t.rank_counts(), per_rank)
    np.testing.assert_array_equal(t.counts(), np.sum(per_rank, axis=1))
    # every token picks top-k = 2 experts: rank 0 routed 7 tokens in step 0 (two micro-batches)
    assert t.rank_counts()[0, 0, 0].sum() == 14
    assert t.manifest.extra["num_experts_inferred"] is True


def test_router_trace_num_experts_and_tp_filter(tmp_path):
    t = open_trace(import_trace("megatron-router-trace", FIX / "megatron_router_trace", tmp_path / "a", num_experts=6))
    assert t.num_experts == 6 and t.counts()[:, :, 4:].sum() == 0
    t = open_trace(import_trace("megatron-router-trace", FIX / "megatron_router_trace", tmp_path / "b", tp_size=2))
    np.testing.assert_array_equal(t.counts()[0], [[6, 4, 2, 2], [2, 2, 5, 5]])  # rank 1 is TP rank 1: skipped
    with pytest.raises(InputError, match="num-experts 3"):
        import_trace("megatron-router-trace", FIX / "megatron_router_trace", tmp_path / "c", num_experts=3)


def test_sglang_stat_dump_round_trip(tmp_path):
    t = open_trace(import_trace("sglang", FIX / "sglang_stat", tmp_path / "t", top_k=8))
    # layer 0 is all zero (dense) and buffer row 3 was never written: both left out
    assert t.layers == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert t.steps.tolist() == [0, 1, 2]
    want = [[[10, 4, 2, 0], [3, 3, 3, 7]], [[8, 6, 1, 1], [5, 5, 2, 4]], [[2, 2, 2, 10], [0, 9, 7, 0]]]
    np.testing.assert_array_equal(t.counts(), want)
    assert t.manifest.extra["empty_passes_dropped"] == 1 and t.top_k == [8, 8]


def test_sglang_per_pass_dumps_map_physical_to_logical(tmp_path):
    t = open_trace(import_trace("sglang", FIX / "sglang_per_pass", tmp_path / "t"))
    assert t.steps.tolist() == [7, 8] and t.manifest.world_size == 2
    want = [
        [[[6, 8, 3, 4], [6, 5, 5, 5]], [[4, 4, 2, 2], [1, 1, 2, 2]]],  # pass 7: rank 0, rank 1
        [[[2, 2, 1, 1], [3, 0, 1, 4]], [[5, 5, 0, 0], [0, 4, 4, 0]]],  # pass 8
    ]
    np.testing.assert_array_equal(t.rank_counts(), want)


def test_csv_round_trip_with_missing_rows_as_zero(tmp_path):
    t = open_trace(import_trace("csv", FIX / "tidy.csv", tmp_path / "t"))
    assert t.steps.tolist() == [100, 200, 300] and t.layers == ["layer0", "layer1"]
    want = [[[50, 30, 20], [10, 60, 30]], [[45, 35, 20], [5, 70, 25]], [[40, 40, 20], [0, 80, 0]]]
    np.testing.assert_array_equal(t.counts(), want)


def test_csv_with_rank_and_layer_names(tmp_path):
    src = tmp_path / "r.csv"
    src.write_text("step,layer,layer_name,rank,expert,count\n0,0,a.moe,0,0,3\n0,0,a.moe,1,0,4\n0,0,a.moe,1,1,5\n")
    t = open_trace(import_trace("csv", src, tmp_path / "t"))
    assert t.layers == ["a.moe"] and t.manifest.ranks_recorded
    np.testing.assert_array_equal(t.rank_counts()[0, :, 0], [[3, 0], [4, 5]])


def test_numpy_npz_and_npy_round_trip(tmp_path):
    t = open_trace(import_trace("numpy", FIX / "counts.npz", tmp_path / "z"))
    assert t.steps.tolist() == [3, 5] and t.layers == ["blocks.0.moe", "blocks.1.moe"]
    assert t.experts_per_layer == [2, 3]
    np.testing.assert_array_equal(t.counts(), [[[5, 1, 0], [2, 2, 2]], [[4, 4, 0], [0, 3, 3]]])
    arr = np.arange(24).reshape(2, 3, 4)
    np.save(tmp_path / "c.npy", arr)
    t = open_trace(import_trace("numpy", tmp_path / "c.npy", tmp_path / "y", first_step=10))
    assert t.steps.tolist() == [10, 11]
    np.testing.assert_array_equal(t.counts(), arr)


def _broken(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "fmt,name,text,match",
    [
        ("megatron-tpe", "tokens_per_expert/rank0.jsonl", '{"iter": 1, "layer": 0, "tpe": [[1, 2]]}\n{oops\n',
         r"rank0.jsonl:2: not valid JSON"),
        ("megatron-tpe", "tokens_per_expert/rank0.jsonl", '{"iter": 1, "layer": 0}\n', r"missing field\(s\) \['tpe'\]"),
        ("megatron-tpe", "tokens_per_expert/rank0.jsonl", '{"iter": 1, "layer": 0, "tpe": [[1, -2]]}\n', "non-negative"),
        ("megatron-router-trace", "router_trace_rank0.jsonl",
         '{"step": 0, "layer": 0, "rank": 0, "num_tokens": 3, "top_indices": [[1, 2]]}\n', "num_tokens 3"),
        ("megatron-router-trace", "router_trace_rank0.jsonl", '{"step": -1, "layer": 0, "top_indices": [[1]]}\n',
         "non-negative integer"),
        ("csv", "a.csv", "step,layer,expert\n1,0,0\n", r"missing column\(s\) \['count'\]"),
        ("csv", "a.csv", "step,layer,expert,count\n1,0,0,2.5\n", "whole numbers"),
        ("csv", "a.csv", "step,layer,expert,count\n1,0,0,2\n1,0,0,3\n", "duplicate row"),
        ("csv", "a.csv", "step,layer,expert,count\n1,0,0,-2\n", "non-negative"),
        ("numpy", "a.npy", "not numpy", "not a NumPy"),
        ("sglang", "expert_distribution_recorder_1.pt", "not a torch file", "not a readable torch.save"),
    ],
)
def test_malformed_input_names_the_file(tmp_path, fmt, name, text, match):
    src = _broken(tmp_path / "src", name, text)
    source = src if fmt in ("csv", "numpy", "sglang") else tmp_path / "src"
    with pytest.raises((InputError, TraceFormatError), match=match) as e:
        import_trace(fmt, source, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_numpy_rejects_proportions_and_wrong_rank(tmp_path):
    np.save(tmp_path / "p.npy", np.full((2, 1, 4), 0.25))
    with pytest.raises(InputError, match="whole numbers"):
        import_trace("numpy", tmp_path / "p.npy", tmp_path / "o")
    np.save(tmp_path / "q.npy", np.ones((2, 4), dtype=int))
    with pytest.raises(TraceFormatError, match=r"\[steps, layers, experts\]"):
        import_trace("numpy", tmp_path / "q.npy", tmp_path / "o")


def test_sglang_wrong_dict_and_missing_source(tmp_path):
    import torch

    torch.save({"something": 1}, tmp_path / "expert_distribution_recorder_1.pt")
    with pytest.raises(TraceFormatError, match="not an SGLang expert distribution dump"):
        import_trace("sglang", tmp_path / "expert_distribution_recorder_1.pt", tmp_path / "o")
    with pytest.raises(InputError, match="no such file or directory"):
        import_trace("sglang", tmp_path / "nope", tmp_path / "o2")


def test_refuses_existing_destination_unknown_format_and_options(tmp_path):
    dest = tmp_path / "t"
    import_trace("csv", FIX / "tidy.csv", dest)
    with pytest.raises(InputError, match="already exists"):
        import_trace("csv", FIX / "tidy.csv", dest)
    with pytest.raises(InputError, match="unknown 'parquet'"):
        import_trace("parquet", FIX / "tidy.csv", tmp_path / "u")
    with pytest.raises(InputError, match=r"\['ep_size'\] do not apply"):
        import_trace("csv", FIX / "tidy.csv", tmp_path / "v", ep_size=2)


def test_tpe_rank_layout_must_fit(tmp_path):
    src = tmp_path / "tokens_per_expert"
    src.mkdir()
    for r in range(3):
        shutil.copy(FIX / "megatron_tpe/tokens_per_expert/rank0.jsonl", src / f"rank{r}.jsonl")
    with pytest.raises(InputError, match="do not fit"):
        import_trace("megatron-tpe", src, tmp_path / "o", ep_size=2)
