"""benchmarks/fairkv_longctx.py on CPU (--tiny): window scores, the budget path, and the files it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moeload.placement import adakv_budgets

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mod():
    return _load("fairkv_longctx")


def test_window_scores_equal_explicit_gqa_attention(mod):
    torch.manual_seed(0)
    args = mod.parse_args(["--tiny", "--device", "cpu", "--out", "x"])
    model = mod.build_model(args, torch).eval()
    s, w, g = 48, 8, args.q_heads // args.kv_heads
    x = torch.randn(1, s, args.d_model)
    cos, sin = model.rotary(s)
    attn = model.blocks[0].attn
    with torch.no_grad():
        q, k, _ = attn.qkv(x, cos, sin)
        got = mod.window_scores(torch, q, k, w)  # [Hkv, S - w]
        kk = k.repeat_interleave(g, 1)
        logits = (q @ kk.transpose(-1, -2))[0] / args.head_dim ** 0.5  # [Hq, S, S], the full matrix
        probs = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        want = probs[:, -w:, : s - w].mean(1).view(args.kv_heads, g, s - w).mean(1)
    assert got.shape == (args.kv_heads, s - w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the model's SDPA output is the same attention: its rows of the window equal probs @ v
    with torch.no_grad():
        _, _, v = attn.qkv(x, cos, sin)
        torch.testing.assert_close(attn.attend(q, k, v)[0], probs @ v.repeat_interleave(g, 1)[0], rtol=1e-4, atol=1e-5)


def test_allocate_is_adakv_budgets_of_the_score_rows(mod):
    rng = np.random.default_rng(1)
    scores = rng.random((2, 4, 40)) ** 6  # [L, H, T]
    attn = np.zeros((2, 4, 40, 40))
    attn[:, :, -1, :] = scores  # adakv_budgets with window=1 reads only the last query row
    for per_head, alpha in ((5, 0.2), (9, 0.0), (40, 0.5)):
        got = mod.allocate(scores, per_head, alpha)
        np.testing.assert_array_equal(got, adakv_budgets(attn, total=per_head * 4, window=1, alpha=alpha))
        np.testing.assert_array_equal(got.sum(1), [per_head * 4] * 2)


def test_budget_spec_and_statistics(mod):
    assert mod.budget_per_head("20%", 480) == 96
    assert mod.budget_per_head("2048", 1000) == 1000  # a head cannot keep more keys than exist
    for bad in ("0", "many", "0.1%"):
        with pytest.raises(ValueError):
            mod.budget_per_head(bad, 100)
    assert mod.file_tag("20%") == "pct20" and mod.file_tag("1024") == "b1024"
    assert mod.gini(np.ones(4)) == pytest.approx(0.0)
    assert mod.gini(np.array([0, 0, 0, 1.0])) == pytest.approx(0.75)
    st = mod.layer_stats(np.array([[1.0, 1, 1, 5], [2, 2, 2, 2]]))
    assert st["max_over_mean"] == [2.5, 1.0] and st["top25_share"] == [0.625, 0.25]
    assert st["cv"][1] == 0.0 and st["over_layers"]["max_over_mean"] == 1.75


def test_tiny_run_writes_conserved_budgets_that_fairkv_decode_reads(mod, tmp_path):
    res = mod.main(["--tiny", "--device", "cpu", "--steps", "8", "--budget", "20%,64", "--out", str(tmp_path)])
    cfg = res["config"]
    L, H, P = cfg["layers"], cfg["kv_heads"], len(res["prompts"])
    assert "error" not in res and P == cfg["prompts"] == 4
    assert res["train"]["steps"] == 8 and np.isfinite(res["train"]["val_loss"])
    assert len(res["train"]["losses"]) == 8 and res["train"]["tokens"] == 8 * cfg["batch"] * cfg["seq_len"]
    assert json.loads((tmp_path / "fairkv_longctx.json").read_text())["train"]["steps"] == 8
    assert (tmp_path / "fairkv_longctx_budgets.png").stat().st_size > 10_000
    decode = _load("fairkv_decode")
    for n in (256, 512):
        st = res["contexts"][str(n)]
        mean = np.load(tmp_path / f"budgets_ctx{n}.npy")
        per = np.load(tmp_path / f"budgets_ctx{n}_per_prompt.npy")
        assert st["status"] == "ok" and mean.shape == (L, H) and per.shape == (P, L, H)
        total = st["budget_per_head"] * H
        assert st["budget_per_head"] == round(0.2 * (n - cfg["window"]))  # --tiny: 20% of the scored keys
        assert per.dtype == np.int64 and np.all(per >= 0) and np.all(per <= n - cfg["window"])
        np.testing.assert_array_equal(per.sum(2), total)  # conservation, every prompt and layer
        np.testing.assert_allclose(mean.sum(1), total)
        np.testing.assert_allclose(mean, per.mean(0))
        assert len(st["tail_loss"]) == P and all(np.isfinite(st["tail_loss"]))
        other = st["other_budgets"]["64"]  # the second --budget: 64 keys per head, its own files
        per64 = np.load(tmp_path / f"budgets_ctx{n}_b64_per_prompt.npy")
        assert other["budget_per_head"] == 64 and other["files"][0] == f"budgets_ctx{n}_b64.npy"
        np.testing.assert_array_equal(per64.sum(2), 64 * H)
        np.testing.assert_allclose(np.load(tmp_path / f"budgets_ctx{n}_b64.npy"), per64.mean(0))
        args = decode.parse_args(["--device", "cpu", "--tiny", "--budgets", str(tmp_path / f"budgets_ctx{n}.npy"),
                                  "--out", "x"])
        lengths = decode.head_lengths(args)
        assert lengths.shape == (L, H) and np.all(lengths.sum(1) == args.kv_mean * H)
    ctl = res["init_control"]
    assert ctl["context"] == 256 and ctl["total_per_layer"] == res["contexts"]["256"]["total_per_layer"]


def test_a_context_out_of_memory_is_reported_and_skipped(mod, tmp_path, monkeypatch):
    real = mod.context_budgets

    def short_of_memory(model, args, torch_, device, val, prompts, n):
        if n == 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, args, torch_, device, val, prompts, n)

    monkeypatch.setattr(mod, "context_budgets", short_of_memory)
    res = mod.main(["--tiny", "--device", "cpu", "--steps", "2", "--out", str(tmp_path)])
    assert res["contexts"]["512"] == {"status": "oom", "error": "CUDA out of memory (simulated)"}
    assert res["contexts"]["256"]["status"] == "ok" and (tmp_path / "budgets_ctx256.npy").is_file()
    assert not (tmp_path / "budgets_ctx512.npy").exists() and (tmp_path / "fairkv_longctx_budgets.png").is_file()
    assert json.loads((tmp_path / "fairkv_longctx.json").read_text())["contexts"]["512"]["status"] == "oom"
