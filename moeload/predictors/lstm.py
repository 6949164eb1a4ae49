"""`lstm`: an LSTM over the load-proportion history of all experts of all layers (the paper's input).

The history is averaged in blocks of `block` steps; the input at each block is the vector of all
L*E proportions (times E, minus 1, so uniform load is 0). A linear encoder, an LSTM and a linear
head (initialised to zero) predict the next block as the mean of the `lookback` input blocks plus
a learned correction, so an untrained model is a sliding-window average over `lookback * block`
steps. Training: windows of `lookback` blocks -> next block, from every run given to
`fit(p)` / `fit([p_run1, p_run2, ...])` (the forecast starts after the last run), Adam, `epochs`
passes, seeded by `seed` (deterministic on CPU; the global torch RNG is left untouched).
Forecast: blocks rolled out autoregressively, each repeated `block` times. `update(new_p)` extends
the history without retraining (call `fit` to retrain). `save(path)` / `LSTMPredictor.load(path)`
round-trip the weights, hyperparameters and history. torch is imported only inside methods.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeload.errors import InputError
from moeload.predictors._util import check_float, check_int
from moeload.predictors.base import Predictor
from moeload.predictors.registry import register


def _blocks(p: np.ndarray, block: int) -> np.ndarray:
    """Block means aligned to the end. p: [T, L, E] -> [T // block, L * E] (at least one block)."""
    T = p.shape[0]
    b = min(block, T)
    n = T // b
    return p[T - n * b :].reshape(n, b, -1).mean(axis=1)


class _one_thread:
    """Run torch on one intra-op thread (tiny matrices: more threads only contend), then restore."""

    def __enter__(self) -> None:
        import torch

        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.saved)


def _build(n_in: int, hidden: int):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(n_in, hidden)
            self.rnn = nn.LSTM(hidden, hidden, batch_first=True)
            self.head = nn.Linear(hidden, n_in)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, W, n_in] -> [B, n_in]
            h, _ = self.rnn(torch.tanh(self.enc(x)))
            return x.mean(dim=1) + self.head(h[:, -1])

    return Net()


@register("lstm")
class LSTMPredictor(Predictor):
    """LSTM on block-averaged proportions of all experts of all layers; CPU-sized by default."""

    multi_run = True

    def __init__(
        self,
        *,
        block: int = 20,
        lookback: int = 16,
        hidden: int = 32,
        epochs: int = 20,
        lr: float = 3e-3,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.block = block
        self.lookback = lookback
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    def _scale(self) -> float:
        return float(self.mask_.shape[1])

    def _fit(self, p: np.ndarray) -> None:
        self._fit_runs([p])

    def _fit_runs(self, runs: Sequence[np.ndarray]) -> None:
        block, lookback = check_int("block", self.block), check_int("lookback", self.lookback)
        hidden, epochs = check_int("hidden", self.hidden), check_int("epochs", self.epochs, 0)
        lr = check_float("lr", self.lr, 0.0, 10.0)
        bs = check_int("batch_size", self.batch_size)
        seed = check_int("seed", self.seed, 0)
        self.block_, self.lookback_ = block, lookback
        import torch

        E = self._scale()
        xs, ys = [], []
        for r in runs:
            z = _blocks(r, block) * E - 1.0
            w = min(lookback, z.shape[0] - 1)
            for i in range(w, z.shape[0]) if w >= 1 else []:
                xs.append(z[i - w : i])
                ys.append(z[i])
        n_in = runs[-1].shape[1] * runs[-1].shape[2]
        with torch.random.fork_rng(devices=[]), _one_thread():
            torch.manual_seed(seed)
            net = _build(n_in, hidden).double()
            w_min = min(x.shape[0] for x in xs) if xs else 0
            if xs and epochs:
                X = torch.tensor(np.stack([x[-w_min:] for x in xs]))
                Y = torch.tensor(np.stack(ys))
                opt = torch.optim.Adam(net.parameters(), lr=lr)
                for _ in range(epochs):
                    for idx in torch.randperm(X.shape[0]).split(bs):
                        opt.zero_grad()
                        loss = ((net(X[idx]) - Y[idx]) ** 2).mean()
                        loss.backward()
                        opt.step()
        self.net_ = net.eval()

    def _update(self, new_p: np.ndarray) -> None:
        """Keep the trained weights; forecasts start from the extended history."""

    def _predict(self, horizon: int) -> np.ndarray:
        import torch

        block, lookback = self.block_, self.lookback_
        E = self._scale()
        z = _blocks(self.history_, block) * E - 1.0
        window = list(torch.tensor(z[-lookback:]))
        b = min(block, self.history_.shape[0])
        n_blocks = -(-horizon // b)
        out = []
        with torch.no_grad(), _one_thread():
            for _ in range(n_blocks):
                nxt = self.net_(torch.stack(window[-lookback:])[None])[0]
                out.append(nxt)
                window.append(nxt)
        pred = (torch.stack(out).numpy() + 1.0) / E  # [n_blocks, L * E]
        L, Ex = self.mask_.shape
        return np.repeat(pred, b, axis=0)[:horizon].reshape(horizon, L, Ex)

    def save(self, path: str | Path) -> None:
        """Write hyperparameters, weights and history to `path` (torch.save)."""
        import torch

        self._check_fitted()
        torch.save(
            {
                "params": self.get_params(),
                "state": self.net_.state_dict(),
                "history": torch.from_numpy(self.history_),
                "mask": torch.from_numpy(self.mask_),
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> LSTMPredictor:
        """A fitted predictor from a file written by `save`."""
        import torch

        try:
            blob: dict[str, Any] = torch.load(Path(path), weights_only=True)  # tensors and plain types only
            obj = cls(**blob["params"])
            obj._set_state(blob["history"].numpy(), blob["mask"].numpy())
            obj.block_, obj.lookback_ = check_int("block", obj.block), check_int("lookback", obj.lookback)
            net = _build(obj.history_.shape[1] * obj.history_.shape[2], check_int("hidden", obj.hidden)).double()
            net.load_state_dict(blob["state"])
        except (OSError, KeyError, RuntimeError, TypeError, EOFError, AttributeError, pickle.UnpicklingError) as exc:
            raise InputError(f"{path}: not a saved lstm predictor ({exc})") from None
        obj.net_ = net.eval()
        return obj
