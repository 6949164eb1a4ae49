"""Hugging Face adapter on tiny randomly initialised transformers MoE models (no download).

Reference counts are independent of the adapter: a forward pre-hook of the test recomputes each
router's top-k from its input (`softmax(x @ W.T).topk(k)`), split into training and eval forwards.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from moeload import LoadTracer, open_trace  # noqa: E402
from moeload.errors import NoGatingModulesError  # noqa: E402

V, H, E, K, B, P, NEW = 64, 16, 4, 2, 2, 6, 3  # vocab, hidden, experts, top-k, batch, prompt, new tokens
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32, max_position_embeddings=64, eos_token_id=None, pad_token_id=0)


def tiny_config(family: str):
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(**COMMON, num_local_experts=E, num_experts_per_tok=K)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                                shared_expert_intermediate_size=16, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=16,
                                decoder_sparse_step=1, head_dim=8)
    if family == "olmoe":
        return t.OlmoeConfig(**COMMON, num_experts=E, num_experts_per_tok=K)
    if family == "dbrx":  # the router returns logits only; the block does the top-k (as 4.x gates do)
        return t.DbrxConfig(vocab_size=V, d_model=H, n_heads=2, n_layers=2, max_seq_len=64, pad_token_id=0,
                            eos_token_id=None, attn_config={"kv_n_heads": 1, "rope_theta": 1e4, "clip_qkv": 8.0},
                            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": E, "moe_top_k": K})
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family))


class Reference:
    """Per router: top-k of its logits, recomputed from its input; bucketed by split until taken."""

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.acc = {"train": np.zeros((len(routers), E), np.int64), "eval": np.zeros((len(routers), E), np.int64)}
        self.tokens = {"train": 0, "eval": 0}
        for i, r in enumerate(routers):
            r.register_forward_pre_hook(lambda m, a, i=i: self._add(i, m, a[0]))

    def _add(self, i: int, router: torch.nn.Module, x: torch.Tensor) -> None:
        lin = getattr(router, "layer", None)  # DBRX keeps its projection in a child Linear
        w = lin.weight if lin is not None else router.weight
        logits = x.detach().reshape(-1, H) @ w.detach().t()
        idx = logits.float().softmax(-1).topk(K, dim=-1).indices
        split = "train" if router.training else "eval"
        self.acc[split][i] += np.bincount(idx.reshape(-1).numpy(), minlength=E)
        if i == 0:
            self.tokens[split] += x.reshape(-1, H).shape[0]

    def take(self, split: str) -> tuple[np.ndarray, int]:
        out, tok = self.acc[split].copy(), self.tokens[split]
        self.acc[split][:] = 0
        self.tokens[split] = 0
        return out, tok


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"])
def test_training_and_generate(tmp_path, family):
    model = tiny_model(family)
    with LoadTracer(model, tmp_path / "t", flush_every=2, record_eval=True) as tr:
        routers = [s.module for s in tr.specs]
        ref = Reference(routers)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        train_ref, eval_ref = [], None

        def train_step():
            x = torch.randint(1, V, (B, P), generator=gen)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            train_ref.append(ref.take("train"))
            tr.step()

        model.train()
        train_step()
        train_step()
        model.eval()
        with torch.no_grad():
            out = model.generate(torch.randint(1, V, (B, P), generator=gen), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False)
        assert out.shape == (B, P + NEW)
        eval_ref = ref.take("eval")
        model.train()
        train_step()
    t = open_trace(tmp_path / "t")
    assert len(t.layers) == 2 and all(n.endswith((".gate", ".router")) for n in t.layers)
    assert t.meta["framework"] == "transformers" and t.meta["count_kind"] == "routed"
    assert t.steps.tolist() == [0, 1, 2]
    c = t.counts()
    np.testing.assert_array_equal(c, np.stack([r[0] for r in train_ref]))
    assert (c.sum(-1) == B * P * K).all() and (c > 0).sum() > 2 * 3  # conserved, and not all on one expert
    assert t.steps_of("eval").tolist() == [2]
    ev = t.counts(split="eval")[0]
    np.testing.assert_array_equal(ev, eval_ref[0])
    assert eval_ref[1] == B * P + B * (NEW - 1)  # prefill, then one token per sequence per new token
    assert (ev.sum(-1) == eval_ref[1] * K).all()


def test_no_moe_model_fails_clearly(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(NoGatingModulesError, match="LlamaForCausalLM: no MoE gating module found"):
        LoadTracer(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_discovery_spans_frameworks():
    """One model holding a transformers MoE block and a DeepSpeed MoE layer: every gate is found."""
    ds_layer = pytest.importorskip("deepspeed.moe.layer")
    model = torch.nn.ModuleDict({"hf": tiny_model("mixtral"), "ds": ds_layer.MoE(H, torch.nn.Linear(H, H), num_experts=E, k=2)})
    specs = LoadTracer(model, sink=lambda block: None).specs
    assert [(s.name, s.framework) for s in specs] == [
        ("hf.model.layers.0.mlp.gate", "transformers"),
        ("hf.model.layers.1.mlp.gate", "transformers"),
        ("ds.deepspeed_moe.gate", "deepspeed"),
    ]
