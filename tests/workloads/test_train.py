import numpy as np
import pytest
import torch

from moeload.errors import InputError
from moeload.workloads import WorkloadConfig, batches, build_model, evaluate, train


def test_loss_decreases_on_tiny():
    res = train("tiny", steps=25, seed=0, progress=False)
    assert res.losses.shape == (25,)
    assert np.isfinite(res.losses).all()
    assert res.lm_losses[-5:].mean() < res.lm_losses[0] - 0.5
    assert res.lm_losses[0] == pytest.approx(np.log(256), abs=0.3)
    assert res.tokens == 25 * 4 * 32 and res.wall_s > 0


def test_same_seed_same_losses_different_seed_differs():
    a = train("tiny", steps=6, seed=1, progress=False).losses
    b = train("tiny", steps=6, seed=1, progress=False).losses
    c = train("tiny", steps=6, seed=2, progress=False).losses
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_micro_batches_and_on_step():
    seen = []
    res = train("tiny", steps=4, micro_batches=3, progress=False, on_step=lambda s, l: seen.append((s, float(l))))
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert np.allclose([l for _, l in seen], res.losses)
    assert res.tokens == 4 * 3 * 4 * 32


def test_checkpointing_gives_same_losses():
    cfg = WorkloadConfig.from_name("tiny", capacity_factor=1.0)
    plain = train(cfg, steps=5, seed=4, progress=False)
    ckpt = train(cfg, steps=5, seed=4, progress=False, checkpoint_activations=True)
    assert np.allclose(plain.losses, ckpt.losses, rtol=1e-5)


def test_progress_bar_and_given_model():
    model = build_model("tiny", seed=5)
    before = model.wte.weight.detach().clone()
    res = train("tiny", steps=3, model=model, progress=True, log_every=1)
    assert res.model is model
    assert not torch.equal(before, model.wte.weight)
    assert 0 < evaluate(model, n_batches=2) < 8


def test_batches_and_build_model_deterministic():
    (x1, y1), (x2, y2) = next(batches("tiny", seed=3)), next(batches("tiny", seed=3))
    assert x1.shape == (4, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    m1, m2 = build_model("tiny", seed=9), build_model("tiny", seed=9)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_bad_arguments():
    with pytest.raises(InputError, match="steps"):
        train("tiny", steps=0, progress=False)
    with pytest.raises(InputError, match="split_name"):
        next(batches("tiny", split_name="test"))
