"""The copying memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016) trained with GradHealth.

Each input is 10 symbols drawn from an alphabet of 8, then T - 1 blanks, a delimiter and 10 more
blanks (T + 20 steps in all). The target is blank for the first T + 10 steps and then the 10
symbols, in order: the network must hold them in its state for T steps. The memoryless strategy
(blanks, then a uniform guess among the 8 symbols) scores a cross-entropy of 10 ln 8 / (T + 20)
per step; a model beats that only if gradients reach back across the T blanks.

Usage:
    python examples/copy_task.py                          # GRU, orthogonal init, T = 10: about a minute
    python examples/copy_task.py --cell lstm --init uniform --seq-len 50 --steps 5000
    python examples/copy_task.py --smoke                  # a few steps, for tests
"""

from __future__ import annotations

import argparse
import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adding_problem import CellName, Nonlinearity, recurrent_layer
from lightning_gradhealth import SCHEME_NAMES, GradHealth

SYMBOLS = 8  # symbols are 1..8
COPY_LENGTH = 10
BLANK, DELIMITER = 0, SYMBOLS + 1
INPUT_CLASSES = SYMBOLS + 2  # blank, the symbols, the delimiter
OUTPUT_CLASSES = SYMBOLS + 1  # the delimiter is never a target
HELD_OUT_SAMPLES = 1000


def copy_baseline(delay: int) -> float:
    """Cross-entropy per step of the memoryless strategy: 10 ln 8 / (T + 20)."""
    return COPY_LENGTH * math.log(SYMBOLS) / (delay + 2 * COPY_LENGTH)


def copy_task(samples: int, delay: int, generator: torch.Generator) -> TensorDataset:
    """``samples`` one-hot inputs of shape ``(T + 20, 10)`` and their target classes of shape ``(T + 20,)``."""
    length = delay + 2 * COPY_LENGTH
    symbols = torch.randint(1, SYMBOLS + 1, (samples, COPY_LENGTH), generator=generator)
    inputs = torch.full((samples, length), BLANK)
    inputs[:, :COPY_LENGTH] = symbols
    inputs[:, delay + COPY_LENGTH - 1] = DELIMITER
    targets = torch.full((samples, length), BLANK)
    targets[:, -COPY_LENGTH:] = symbols
    return TensorDataset(nn.functional.one_hot(inputs, INPUT_CLASSES).float(), targets)


class CopyData(pl.LightningDataModule):
    """Copy-task sequences: a fixed training set, and a held-out set drawn from another seed.

    Args:
        delay: T, the number of steps between the last symbol and the first one to recall.
        batch_size: training batch size (the held-out set is one batch).
        train_samples: size of the training set, reshuffled every epoch.
        seed: seed of the training set; the held-out set uses ``seed + 1``.
    """

    def __init__(self, delay: int = 20, batch_size: int = 64, train_samples: int = 10_000, seed: int = 0) -> None:
        super().__init__()
        self.delay = delay
        self.batch_size = batch_size
        self.train_samples = train_samples
        self.seed = seed

    def setup(self, stage: str) -> None:
        self.train_set = copy_task(self.train_samples, self.delay, torch.Generator().manual_seed(self.seed))
        self.held_out_set = copy_task(HELD_OUT_SAMPLES, self.delay, torch.Generator().manual_seed(self.seed + 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.held_out_set, batch_size=HELD_OUT_SAMPLES)


class CopyModel(pl.LightningModule):
    """A recurrent layer and a linear read-out that classifies the output symbol at every step.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        hidden: hidden size.
        nonlinearity: ``"tanh"`` or ``"relu"``, for ``cell="rnn"``.
        lr: Adam's learning rate.
    """

    def __init__(self, cell: CellName = "lstm", hidden: int = 64, nonlinearity: Nonlinearity = "tanh", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.rnn = recurrent_layer(cell, INPUT_CLASSES, hidden, nonlinearity)
        self.readout = nn.Linear(hidden, OUTPUT_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.rnn(x)
        return self.readout(states)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy per step, averaged over all T + 20 steps, as in Arjovsky et al."""
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/cross_entropy", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/cross_entropy", self.loss(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="gru")
    parser.add_argument(
        "--init", choices=[*SCHEME_NAMES, "none"], default="orthogonal", help="GradHealth init scheme ('none' keeps PyTorch's)"
    )
    parser.add_argument("--nonlinearity", choices=["tanh", "relu"], default="tanh", help="for --cell rnn")
    parser.add_argument("--seq-len", type=int, default=10, help="T, the delay between the symbols and their recall")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (used by the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.hidden, args.steps = 5, 8, 5

    pl.seed_everything(args.seed, verbose=False)
    data = CopyData(args.seq_len, args.batch_size, max(args.steps, 100) * args.batch_size // 4, args.seed)
    model = CopyModel(args.cell, args.hidden, args.nonlinearity, args.lr)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[GradHealth(init=None if args.init == "none" else args.init, clip="norm", clip_val=1.0)],
        logger=pl.loggers.TensorBoardLogger(args.logdir, name=f"copy_{args.cell}_{args.init}_T{args.seq_len}"),
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=False,
        log_every_n_steps=10,
        val_check_interval=min(100, args.steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    final_loss = float(trainer.callback_metrics["val/cross_entropy"])
    print(
        f"final held-out cross-entropy {final_loss:.4f} per step "
        f"(the memoryless baseline 10 ln 8 / (T + 20) scores {copy_baseline(args.seq_len):.4f})"
    )
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    return final_loss


if __name__ == "__main__":
    main()
