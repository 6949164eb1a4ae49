"""Named configurations of the embedded MoE GPT.

``cpu-demo``
    4 layers, d_model 128, 4 heads, MoE in every layer (4 MoE layers), 8 experts, top-2, expert
    width 256, seq 128, batch 16 (2048 tokens/step). 500 steps on 2 CPU threads took 135-193 s
    (shared machine); loss 5.48 -> 1.99, val 1.90 nats/byte. Expert loads go through a visible
    transient and settle: the mean rolling range (window 10) of expert proportions fell from
    0.19-0.28 in the first 10% of steps to 0.038-0.043 in the last 20%, in every MoE layer.
``tiny``
    2 layers (1 MoE), d_model 32, 4 experts, top-2, seq 32, batch 4: a step takes milliseconds.
    For unit tests.
``gpt3-small-moe``
    GPT-3 Small (125M dense) shape: 12 layers, d_model 768, 12 heads, MoE every other layer
    (layers 1, 3, ..., 11 -> 6 MoE layers), 16 experts, top-2, expert width 4 * 768 = 3072,
    seq 1024 (GPT-3 uses 2048; halved to fit one GPU with a useful batch), batch 16 x 1024 tokens.
``gpt3-medium-moe``
    GPT-3 Medium (350M dense) shape: 24 layers, d_model 1024, 16 heads, MoE every other layer
    (12 MoE layers), 128 experts, top-2. Expert width is reduced to 512 (one eighth of the dense
    4 * d_model): 128 experts x 12 layers would hold 12.9B parameters at full width; at 512 they
    hold 1.6B, which with fp32 AdamW states (~30 GB) fits one 80 GB GPU; seq 1024, batch 8 x 1024.

GPU configs use bf16 autocast (``amp=True``) when trained on CUDA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeload.errors import InputError


@dataclass(frozen=True)
class WorkloadConfig:
    """Model, data and optimiser settings of one workload (all sizes in tokens / features)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_experts: int
    top_k: int = 2
    moe_every: int = 1
    d_ff: int = 0
    """Width of the dense FFNs; 0 means 4 * d_model."""
    expert_d_ff: int = 0
    """Width of each expert FFN; 0 means d_ff."""
    capacity_factor: float | None = None
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_steps: int = 0
    """Length of the cosine decay after warmup; 0 means the number of steps passed to ``train``."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    balance: str = "aux"
    """"aux": Switch-style aux loss (aux_coef); "bias": aux-loss-free (DeepSeek-V3): experts chosen by
    probs + expert_bias, the bias moved by ``bias_update * sign(mean load - load)`` after every
    optimizer step, no aux loss in the objective (it is still computed, for logging)."""
    bias_update: float = 1e-3
    val_fraction: float = 0.05
    amp: bool = False

    def __post_init__(self) -> None:
        checks = {
            "n_layers": self.n_layers >= 1,
            "d_model": self.d_model >= 1 and self.d_model % self.n_heads == 0,
            "n_experts": self.n_experts >= 1,
            "top_k": 1 <= self.top_k <= self.n_experts,
            "moe_every": self.moe_every >= 1,
            "capacity_factor": self.capacity_factor is None or self.capacity_factor > 0,
            "seq_len": self.seq_len >= 1,
            "batch_size": self.batch_size >= 1,
            "balance": self.balance in ("aux", "bias"),
            "bias_update": self.bias_update > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"WorkloadConfig {self.name!r}: invalid {', '.join(bad)}")

    @property
    def ffn_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def expert_width(self) -> int:
        return self.expert_d_ff or self.ffn_width

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is an MoE layer (every ``moe_every``-th, 1-based)."""
        return [i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @classmethod
    def from_name(cls, name: str, **overrides) -> WorkloadConfig:
        """The named config, with any field replaced by ``overrides``."""
        if name not in CONFIGS:
            raise InputError(f"workload config {name!r}: unknown; choose one of {sorted(CONFIGS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise InputError(f"workload config {name!r}: unknown override(s) {unknown}")
        return dataclasses.replace(CONFIGS[name], **overrides)

    def replace(self, **overrides) -> WorkloadConfig:
        return dataclasses.replace(self, **overrides)


CONFIGS: dict[str, WorkloadConfig] = {
    c.name: c
    for c in [
        WorkloadConfig(
            name="cpu-demo",
            n_layers=4,
            d_model=128,
            n_heads=4,
            n_experts=8,
            top_k=2,
            moe_every=1,
            expert_d_ff=256,
            seq_len=128,
            batch_size=16,
            lr=2e-3,
            warmup_steps=30,
            aux_coef=0.01,
        ),
        WorkloadConfig(
            name="tiny",
            n_layers=2,
            d_model=32,
            n_heads=4,
            n_experts=4,
            top_k=2,
            moe_every=2,
            d_ff=64,
            seq_len=32,
            batch_size=4,
            lr=3e-3,
            warmup_steps=5,
        ),
        WorkloadConfig(
            name="gpt3-small-moe",
            n_layers=12,
            d_model=768,
            n_heads=12,
            n_experts=16,
            top_k=2,
            moe_every=2,
            seq_len=1024,
            batch_size=16,
            lr=6e-4,
            warmup_steps=375,
            amp=True,
        ),
        WorkloadConfig(
            name="gpt3-medium-moe",
            n_layers=24,
            d_model=1024,
            n_heads=16,
            n_experts=128,
            top_k=2,
            moe_every=2,
            expert_d_ff=512,
            seq_len=1024,
            batch_size=8,
            lr=3e-4,
            warmup_steps=375,
            amp=True,
        ),
    ]
}


def get_config(config: str | WorkloadConfig) -> WorkloadConfig:
    """A config given by name or object."""
    if isinstance(config, WorkloadConfig):
        return config
    if isinstance(config, str):
        return WorkloadConfig.from_name(config)
    raise InputError(f"config={config!r}: expected a name or a WorkloadConfig")
