"""The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015) trained with GradHealth.

Each input is a sequence of T pairs: a random number in [0, 1] and a marker that is 1 at exactly
two positions, one in each half of the sequence. The target is the sum of the two marked
numbers. Always predicting 1 scores an MSE of 1/6 = 0.167: a model beats that only if gradients
carry the error back to the marked steps, up to T steps earlier.

Usage:
    python examples/adding_problem.py                     # LSTM, orthogonal init, T = 100
    python examples/adding_problem.py --cell rnn --init identity --nonlinearity relu   # IRNN
    python examples/adding_problem.py --smoke             # a few steps, for tests

The data and the model are importable: ``compare_inits.py`` and ``cli.py`` train them too.
"""

from __future__ import annotations

import argparse
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import SCHEME_NAMES, GradHealth

BASELINE_MSE = 1 / 6
HELD_OUT_SAMPLES = 1000

CellName = Literal["rnn", "lstm", "gru"]
Nonlinearity = Literal["tanh", "relu"]


def adding_problem(samples: int, seq_len: int, generator: torch.Generator) -> TensorDataset:
    """``samples`` sequences of shape ``(seq_len, 2)`` and their targets of shape ``(1,)``."""
    values = torch.rand(samples, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (samples,), generator=generator)
    second = torch.randint(half, seq_len, (samples,), generator=generator)
    markers = torch.zeros(samples, seq_len)
    rows = torch.arange(samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values * markers).sum(dim=1, keepdim=True)
    return TensorDataset(torch.stack([values, markers], dim=2), targets)


def recurrent_layer(cell: CellName, input_size: int, hidden: int, nonlinearity: Nonlinearity = "tanh") -> nn.RNNBase:
    """One batch-first ``nn.RNN`` (with ``nonlinearity``), ``nn.LSTM`` or ``nn.GRU`` layer."""
    if cell == "rnn":
        return nn.RNN(input_size, hidden, nonlinearity=nonlinearity, batch_first=True)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[cell](input_size, hidden, batch_first=True)


class AddingData(pl.LightningDataModule):
    """Adding-problem sequences: a fixed training set, and a held-out set drawn from another seed.

    Args:
        seq_len: T, the length of every sequence.
        batch_size: training batch size (the held-out set is one batch).
        train_samples: size of the training set, reshuffled every epoch.
        seed: seed of the training set; the held-out set uses ``seed + 1``.
    """

    def __init__(self, seq_len: int = 100, batch_size: int = 64, train_samples: int = 10_000, seed: int = 0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_samples = train_samples
        self.seed = seed

    def setup(self, stage: str) -> None:
        self.train_set = adding_problem(self.train_samples, self.seq_len, torch.Generator().manual_seed(self.seed))
        self.held_out_set = adding_problem(HELD_OUT_SAMPLES, self.seq_len, torch.Generator().manual_seed(self.seed + 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out_set, batch_size=HELD_OUT_SAMPLES)


class AddingModel(pl.LightningModule):
    """A recurrent layer reading the sequence and a linear read-out of its last hidden state.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        hidden: hidden size.
        nonlinearity: ``"tanh"`` or ``"relu"``, for ``cell="rnn"``.
        lr: Adam's learning rate.
    """

    def __init__(self, cell: CellName = "lstm", hidden: int = 64, nonlinearity: Nonlinearity = "tanh", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rnn = recurrent_layer(cell, 2, hidden, nonlinearity)
        self.readout = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.readout(states[:, -1])

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the predicted sums."""
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/mse", self.loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="lstm")
    parser.add_argument(
        "--init", choices=[*SCHEME_NAMES, "none"], default="orthogonal", help="GradHealth init scheme ('none' keeps PyTorch's)"
    )
    parser.add_argument("--nonlinearity", choices=["tanh", "relu"], default="tanh", help="for --cell rnn")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (used by the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.hidden, args.steps = 20, 8, 5

    pl.seed_everything(args.seed, verbose=False)
    data = AddingData(args.seq_len, args.batch_size, max(args.steps, 100) * args.batch_size // 4, args.seed)
    model = AddingModel(args.cell, args.hidden, args.nonlinearity, args.lr)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[GradHealth(init=None if args.init == "none" else args.init)],
        logger=pl.loggers.TensorBoardLogger(args.logdir, name=f"adding_{args.cell}_{args.init}"),
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        log_every_n_steps=10,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    final_mse = float(trainer.callback_metrics["train/mse"])
    print(f"final train MSE {final_mse:.4f} (predicting 1 always scores {BASELINE_MSE:.3f})")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    return final_mse


if __name__ == "__main__":
    main()
