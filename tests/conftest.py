"""Shared test fixtures: small real LightningModules for both Lightning namespaces."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as lightning_pytorch
import pytest
import pytorch_lightning
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, fast CPU Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return kwargs


class _SequenceRegression:
    """A recurrent layer (built by ``build``) and a linear head, regressing one number per sequence."""

    def __init__(
        self,
        build: Callable[[], nn.Module] | None = None,
        input_size: int = 3,
        output_width: int = 8,
        seq_len: int = 6,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.seq_len = seq_len
        self.rnn = build() if build else nn.LSTM(input_size, output_width, batch_first=True)
        self.head = nn.Linear(output_width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, self.seq_len, self.input_size, generator=generator)
        y = x.sum(dim=(1, 2)).unsqueeze(1) / 10
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class PLSequenceModel(_SequenceRegression, pytorch_lightning.LightningModule):
    """The test model as a ``pytorch_lightning`` module."""


class LSequenceModel(_SequenceRegression, lightning_pytorch.LightningModule):
    """The test model as a ``lightning.pytorch`` module."""


class PLManualSequenceModel(PLSequenceModel):
    """The test model with manual optimization; its loss is multiplied by ``loss_multiplier``."""

    def __init__(self, loss_multiplier: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.loss_multiplier = loss_multiplier

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx) * self.loss_multiplier)
        optimizer.step()


def tensorboard_events(log_dir: Any) -> EventAccumulator:
    """TensorBoard's own reader over the event files in ``log_dir``, fully loaded."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(1234)
