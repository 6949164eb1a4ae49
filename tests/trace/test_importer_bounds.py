"""Importers refuse inputs that would size huge arrays or overflow int64, with one-line errors that
name the file (and line), before allocating: dense-size estimate, .npy/.npz headers, --first-step,
JSON Lines that are not UTF-8, gzip without .gz, deeply nested JSON, over-long integers, empty .pt."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from moeload.errors import InputError, TraceFormatError
from moeload.trace.importers import import_trace
from moeload.trace.importers._common import MAX_DENSE_BYTES, check_dense, jsonl_records
from moeload.trace.importers.arrays import read_numpy
from moeload.trace.importers.megatron import read_router_trace, read_tokens_per_expert
from moeload.trace.importers.sglang import read_sglang
from moeload.trace.importers.tabular import read_csv


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


def _npy_header_only(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


# --- dense size estimate -------------------------------------------------------------------------

def test_check_dense_allows_the_limit_and_refuses_beyond():
    check_dense("f", (1, 1, 1, MAX_DENSE_BYTES // 8))
    with pytest.raises(InputError) as e:
        check_dense("f.csv", (1, 131072, 1, 65536))
    _one_line(e, "f.csv", "1 x 131072 x 1 x 65536", "64 GiB")


def test_csv_with_a_huge_rank_and_expert_is_refused_before_allocating(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("step,layer,expert,count,rank\n0,0,65535,5,131071\n")
    with pytest.raises(InputError) as e:
        read_csv(p, top_k=1)
    _one_line(e, str(p), "131072 x 1 x 65536", "GiB")


def test_csv_of_ordinary_ranks_still_imports(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("step,layer,expert,count,rank\n0,0,3,5,1\n1,0,0,2,0\n")
    imp = read_csv(p, top_k=1)
    assert imp.counts.shape == (2, 2, 1, 4) and imp.counts[0, 1, 0, 3] == 5


# --- .npy / .npz headers and --first-step --------------------------------------------------------

def test_npy_header_claiming_1e11_elements_is_refused(tmp_path):
    p = tmp_path / "a.npy"
    p.write_bytes(_npy_header_only((100_000, 1_000, 1_000)))
    with pytest.raises(InputError) as e:
        read_numpy(p, top_k=1)
    _one_line(e, str(p), "(100000, 1000, 1000)", "GiB")


def test_npz_member_claiming_1e11_elements_is_refused(tmp_path):
    p = tmp_path / "a.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("counts.npy", _npy_header_only((100_000, 1_000, 1_000)))
    with pytest.raises(InputError) as e:
        read_numpy(p, top_k=1)
    _one_line(e, str(p), "'counts.npy'", "(100000, 1000, 1000)")


def test_real_npz_still_imports(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, counts=np.ones((3, 2, 4), np.int64), steps=np.array([5, 6, 9]))
    imp = read_numpy(p, top_k=1)
    assert imp.steps.tolist() == [5, 6, 9] and imp.counts.shape == (3, 1, 2, 4)


@pytest.mark.parametrize("first", [10**30, 2**63])
def test_first_step_beyond_int64_is_refused(tmp_path, first):
    p = tmp_path / "a.npy"
    np.save(p, np.ones((2, 1, 4), np.int64))
    with pytest.raises(InputError) as e:
        read_numpy(p, top_k=1, first_step=first)
    _one_line(e, "--first-step", "int64")


def test_first_step_whose_last_step_overflows_is_refused_and_the_edge_is_accepted(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.ones((2, 1, 4), np.int64))
    with pytest.raises(InputError) as e:
        read_numpy(p, top_k=1, first_step=2**63 - 1)
    _one_line(e, "--first-step", "2 steps")
    assert read_numpy(p, top_k=1, first_step=2**63 - 2).steps.tolist() == [2**63 - 2, 2**63 - 1]


# --- JSON Lines ----------------------------------------------------------------------------------

def _lines(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = _lines(tmp_path / "rank0.jsonl", b'{"iter": 1, "layer": 0, "tpe": [[1]]}\n{"iter": 2, "la\xffyer": 0}\n')
    with pytest.raises(TraceFormatError) as e:
        list(jsonl_records(p, ("iter",)))
    _one_line(e, f"{p}:2", "UTF-8")


def test_gzip_without_suffix_is_named(tmp_path):
    p = _lines(tmp_path / "rank0.jsonl", gzip.compress(b'{"iter": 1, "layer": 0, "tpe": [[1]]}\n'))
    with pytest.raises(InputError) as e:
        read_tokens_per_expert(p)
    _one_line(e, str(p), "gzip")


def test_deeply_nested_line_is_refused(tmp_path):
    p = _lines(tmp_path / "rank0.jsonl", b'{"iter": 1, "layer": 0, "tpe": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    with pytest.raises(TraceFormatError) as e:
        read_tokens_per_expert(p)
    _one_line(e, f"{p}:1", "nested")


def test_5000_digit_integer_is_refused(tmp_path):
    line = '{"step": 0, "layer": 0, "num_tokens": ' + "9" * 5000 + ', "top_indices": [[0]]}\n'
    p = _lines(tmp_path / "router_trace_rank0.jsonl", line.encode())
    with pytest.raises(TraceFormatError) as e:
        read_router_trace(p)
    msg = _one_line(e, f"{p}:1")
    assert len(msg) < 400


def test_iter_beyond_int64_is_refused(tmp_path):
    p = _lines(tmp_path / "rank0.jsonl", b'{"iter": 1' + b"0" * 23 + b', "layer": 0, "tpe": [[3, 1]]}\n')
    with pytest.raises(TraceFormatError) as e:
        read_tokens_per_expert(p)
    _one_line(e, f"{p}:1", "'iter'", "int64")


def test_iter_at_int64_max_imports(tmp_path):
    p = _lines(tmp_path / "rank0.jsonl", f'{{"iter": {2**63 - 1}, "layer": 0, "tpe": [[3, 1]]}}\n'.encode())
    assert read_tokens_per_expert(p, top_k=1).steps.tolist() == [2**63 - 1]


def test_router_trace_whose_dense_counts_are_too_large_is_refused(tmp_path):
    # 131,071 ranks from the file name would need [1, 131072, 1, 65536] int64 = 64 GiB
    p = _lines(tmp_path / "router_trace_rank131071.jsonl",
               b'{"step": 0, "layer": 0, "top_indices": [[65535]]}\n')
    with pytest.raises(InputError) as e:
        read_router_trace(p)
    _one_line(e, str(p), "GiB")


# --- SGLang --------------------------------------------------------------------------------------

def test_empty_sglang_dump_is_one_line(tmp_path):
    p = tmp_path / "expert_distribution_recorder_1.pt"
    p.write_bytes(b"")
    with pytest.raises(TraceFormatError) as e:
        read_sglang(p, top_k=1)
    _one_line(e, str(p), "empty")


def test_the_cli_path_turns_these_into_input_errors(tmp_path):
    """Through import_trace (what `moeload import` calls) the error type and message are unchanged."""
    p = tmp_path / "a.npy"
    p.write_bytes(_npy_header_only((100_000, 1_000, 1_000)))
    with pytest.raises(InputError):
        import_trace("numpy", p, tmp_path / "out", top_k=1)
    assert not (tmp_path / "out").exists()
