"""LoadTracer on the embedded workload: round trip, conservation, micro-batches, eval, checkpointing, resume."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from _loop import TINY_DROP, Loop
from torch.utils.checkpoint import checkpoint

from moeload import LoadTracer, open_trace
from moeload.errors import InputError, NoGatingModulesError
from moeload.workloads import train

T_K = TINY_DROP.batch_size * TINY_DROP.seq_len * TINY_DROP.top_k  # routes per forward per layer


def test_round_trip_matches_reference_and_conserves(tmp_path):
    lp = Loop()
    path = tmp_path / "run.moeload"
    with LoadTracer(lp.model, path, flush_every=4) as tr:
        ref_r, ref_k = lp.run(10, tr)
        assert tr.step_count == 10
    t = open_trace(path)
    assert t.layers == ["blocks.0.moe.router", "blocks.1.moe.router"]
    assert t.steps.tolist() == list(range(10))
    assert len(t.parts) == 3  # 4 + 4 + partial 2, written by close()
    assert t.meta["count_kind"] == "both" and t.meta["framework"] == "moeload" and t.meta["flush_every"] == 4
    assert t.meta["tokens_per_step"] == TINY_DROP.batch_size * TINY_DROP.seq_len
    routed, kept = t.counts(), t.counts(kind="kept")
    np.testing.assert_array_equal(routed, ref_r)
    np.testing.assert_array_equal(kept, ref_k)
    assert (routed.sum(-1) == T_K).all()  # conservation: tokens x top_k per step and layer
    assert (kept <= routed).all()
    drops = T_K - kept.sum(-1)
    assert drops.sum() > 0  # capacity 1.0 really drops here, so kept != routed is exercised
    np.testing.assert_array_equal(kept.sum(-1), routed.sum(-1) - drops)
    assert (t.tokens() == TINY_DROP.batch_size * TINY_DROP.seq_len).all()
    assert tr.last_flushed_step == 9 and tr.flushes == 3 and tr.collectives == 0 and tr.errors == []


def test_micro_batches_are_summed(tmp_path):
    lp = Loop()
    with LoadTracer(lp.model, tmp_path / "t", flush_every=3) as tr:
        ref_r, ref_k = lp.run(4, tr, micro=2)
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), ref_r)
    np.testing.assert_array_equal(t.counts(kind="kept"), ref_k)
    assert (t.counts().sum(-1) == 2 * T_K).all()


def test_eval_forwards_excluded_or_recorded(tmp_path):
    for record_eval in (False, True):
        lp = Loop()
        path = tmp_path / f"e{record_eval}"
        with LoadTracer(lp.model, path, flush_every=2, record_eval=record_eval) as tr:
            ref_r, _ = lp.run(2, tr)
            lp.model.eval()
            x, _ = next(lp.data)
            with torch.no_grad():
                lp.model(x)  # one eval forward during step 2
            lp.model.train()
            ref_r3, _ = lp.run(1, tr)
        t = open_trace(path)
        assert t.steps.tolist() == [0, 1, 2]
        np.testing.assert_array_equal(t.counts(), np.concatenate([ref_r, ref_r3]))
        if record_eval:
            assert t.splits == ["eval", "train"]
            # Loop's reference forwards run in eval mode, so every step has one eval forward (same
            # routing as the training forward that follows); step 2 has the extra one as well
            assert t.steps_of("eval").tolist() == [0, 1, 2]
            ev = t.counts(split="eval")
            np.testing.assert_array_equal(ev[:2], ref_r)
            assert (ev.sum(-1) == [[T_K, T_K], [T_K, T_K], [2 * T_K, 2 * T_K]]).all()
        else:
            assert t.splits == ["train"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_recompute_not_double_counted(tmp_path, reentrant):
    lp = Loop()
    blocks = lp.model.blocks
    if reentrant:
        for b in blocks:
            fwd = b.forward
            b.forward = lambda x, _f=fwd: checkpoint(_f, x, use_reentrant=True) if torch.is_grad_enabled() else _f(x)
    else:
        lp.model.checkpoint_activations = True  # the workload's own non-reentrant checkpointing
    calls = []
    h = blocks[0].moe.router.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    with LoadTracer(lp.model, tmp_path / "t", flush_every=2) as tr:
        ref_r, _ = lp.run(3, tr)
    h.remove()
    # 3 reference (eval) forwards + 3 training forwards + 3 recomputes: the recompute really ran
    assert len(calls) == 9
    t = open_trace(tmp_path / "t")
    np.testing.assert_array_equal(t.counts(), ref_r)
    assert (t.counts().sum(-1) == T_K).all()


def test_resume_appends_with_state_dict(tmp_path):
    lp = Loop()
    path = tmp_path / "t"
    with LoadTracer(lp.model, path, flush_every=3) as tr:
        first, _ = lp.run(4, tr)
        state = tr.state_dict()
    assert state["step"] == 4
    tr2 = LoadTracer(lp.model, path, flush_every=3)
    tr2.load_state_dict(state)
    with tr2:
        second, _ = lp.run(2, tr2)
    t = open_trace(path)
    assert t.steps.tolist() == list(range(6))
    np.testing.assert_array_equal(t.counts(), np.concatenate([first, second]))
    assert len(t.meta["sessions"]) == 2
    with pytest.raises(InputError, match="load_state_dict"):
        tr2.load_state_dict({"step": 1})


def test_callback_with_workload_train_loop(tmp_path):
    from moeload.workloads import build_model

    model = build_model("tiny")
    tr = LoadTracer(model, tmp_path / "t", flush_every=5)
    with tr:
        train("tiny", steps=7, model=model, on_step=tr.callback(), progress=False)
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == list(range(7))
    assert (t.counts().sum(-1) == 4 * 32 * 2).all()
    assert t.meta["count_kind"] == "routed"  # no capacity in `tiny`: nothing dropped, no kept column


def test_sink_receives_blocks_without_path():
    lp = Loop()
    blocks = []
    with LoadTracer(lp.model, sink=blocks.append, flush_every=2) as tr:
        ref_r, ref_k = lp.run(3, tr)
    assert [b.steps.tolist() for b in blocks] == [[0, 1], [2]]
    routed = np.concatenate([b.routed for b in blocks])[:, 0]  # [S, R=1, L, E]
    np.testing.assert_array_equal(routed, ref_r)
    assert blocks[0].split == "train" and blocks[0].kept is not None


def test_writer_failure_warns_once_and_training_continues(tmp_path):
    lp = Loop()
    path = tmp_path / "t"
    tr = LoadTracer(lp.model, path, flush_every=1).start()
    lp.run(1, tr)
    # a real fault: the trace directory is replaced by a file, so writing the next parts fails
    deadline = time.time() + 10
    while (tr.last_flushed_step != 0 or tr._writer.pending) and time.time() < deadline:
        time.sleep(0.01)  # the block written, its manifest update and sinks done: the writer is idle
    shutil.rmtree(path)
    path.write_text("not a directory")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lp.run(4, tr)
        tr.close()
    msgs = [str(x.message) for x in w if "trace writing failed" in str(x.message)]
    assert len(msgs) == 1
    assert sum(e.startswith("writer:") for e in tr.errors) == 4
    assert tr.step_count == 5


def test_no_gating_modules_error_names_what_was_looked_for(tmp_path):
    with pytest.raises(NoGatingModulesError, match="TopKRouter.*gates="):
        LoadTracer(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "t")
    with pytest.raises(InputError, match="path or a sink"):
        LoadTracer(Loop().model)
    with pytest.raises(InputError, match="flush_every"):
        LoadTracer(Loop().model, tmp_path / "t", flush_every=0)
    with pytest.raises(InputError, match="hooks_in_graph='yes': expected True or False"):
        LoadTracer(Loop().model, tmp_path / "t", hooks_in_graph="yes")


def test_manifest_notes_and_rank_map(tmp_path):
    lp = Loop()
    with LoadTracer(lp.model, tmp_path / "t", flush_every=2, model_name="tiny-drop") as tr:
        lp.run(2, tr)
    meta = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert meta["model_name"] == "tiny-drop"
    assert meta["world_size"] == 1 and meta["ranks_recorded"] is False and meta["ep_size"] == 1
    assert meta["extra"]["gate_classes"] == ["TopKRouter"]


def test_exit_on_exception_flushes_partial_block_and_step_needs_start(tmp_path):
    lp = Loop()
    with pytest.raises(RuntimeError, match="boom"):
        with LoadTracer(lp.model, tmp_path / "t", flush_every=10) as tr:
            ref_r, _ = lp.run(3, tr)
            raise RuntimeError("boom")
    t = open_trace(tmp_path / "t")
    assert t.steps.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(t.counts(), ref_r)
    with pytest.raises(InputError, match="before start"):
        tr.step()
    with pytest.raises(InputError, match="before start"):
        LoadTracer(lp.model, tmp_path / "u").step()


def test_adapter_expert_to_rank_map_reaches_the_manifest(tmp_path):
    from moeload.tracing import Adapter, GateSpec, Routing

    class ShardedRouters(Adapter):
        """An adapter that knows expert parallelism: experts 0, 2 on EP rank 0; 1, 3 on EP rank 1."""

        name = "sharded-test"

        def find(self, model):
            return [
                GateSpec(m, n, m.num_experts, m.top_k, lambda mod, i, o: Routing(indices=o.indices),
                         framework="sharded-test", expert_to_rank=[0, 1, 0, 1], ep_size=2)
                for n, m in model.routers().items()
            ]

    lp = Loop()
    with LoadTracer(lp.model, tmp_path / "t", adapters=[ShardedRouters()], flush_every=2) as tr:
        ref_r, _ = lp.run(2, tr)
    t = open_trace(tmp_path / "t")
    assert t.meta["ep_size"] == 2 and t.meta["expert_to_rank"] == [[0, 1, 0, 1]] * 2
    assert t.meta["framework"] == "sharded-test" and t.meta["count_kind"] == "routed"
    np.testing.assert_array_equal(t.gpu_loads(), np.stack([ref_r[..., 0::2].sum(-1), ref_r[..., 1::2].sum(-1)], -1))
