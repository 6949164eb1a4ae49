"""The Hugging Face `Trainer` callback on a tiny Mixtral (CPU): steps, counts, TensorBoard, resume.

Needs `accelerate` (the Trainer requires it); skipped where it is not installed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from test_callbacks import check_tensorboard  # noqa: E402
from test_hf import B, K, P, V, Reference, tiny_model  # noqa: E402

from moeload import open_trace  # noqa: E402
from moeload.tracing.callbacks.hf import MoeLoadCallback  # noqa: E402


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        self.x = torch.randint(1, V, (n, P), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class TakeReference(transformers.TrainerCallback):
    """The test's own per-optimizer-step bucket of the reference counts."""

    def __init__(self, ref: Reference) -> None:
        self.ref, self.steps = ref, []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(self.ref.take("train")[0])


def trainer(tmp_path, model, cb, max_steps, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=B,
        gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=cb)


def test_trainer_callback(tmp_path):
    model = tiny_model("mixtral")
    path = tmp_path / "t"
    cb = MoeLoadCallback(path, flush_every=2, tensorboard=True)  # -> <output_dir>/moeload-tb
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    take = TakeReference(Reference(routers))
    trainer(tmp_path, model, [cb, take], 3, save_strategy="steps", save_steps=2).train()
    t = open_trace(path)
    assert t.steps.tolist() == [0, 1, 2]
    assert t.layers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    np.testing.assert_array_equal(t.counts(), np.stack(take.steps))
    assert (t.counts().sum(-1) == 2 * B * P * K).all()  # 2 micro-batches of B x P tokens, top-2
    check_tensorboard(tmp_path / "out" / "moeload-tb", path, [1, 2], [slice(0, 2), slice(2, 3)])

    # resume from checkpoint-2 in a new Trainer: numbering follows state.global_step
    resumed = tiny_model("mixtral")
    cb2 = MoeLoadCallback(tmp_path / "r", flush_every=4)
    trainer(tmp_path, resumed, [cb2], 4, save_strategy="no").train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert open_trace(tmp_path / "r").steps.tolist() == [2, 3]
