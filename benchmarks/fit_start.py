"""The fixed cost of a fit: from ``trainer.fit`` to the end of step 0, with and without GradHealth.

Forecasting libraries refit in loops (backtesting, ``historical_forecasts(retrain=True)``), and
every refit pays what a fit costs before its first step is done. Each fit here builds a fresh
model and a real ``pytorch_lightning.Trainer`` with a ``TensorBoardLogger`` writing to a temporary
directory, runs one step (``max_steps=1``: Trainer start-up, GradHealth's ``on_fit_start`` and
``on_train_start``, step 0 with its probe and its full pass, and the end of fit with its report),
and is timed from the call of ``trainer.fit`` to the end of step 0 (``on_train_batch_end``, after
the optimizer step) and to its return: the end of fit adds the report and, on the first fit of
a GradHealth (not on the refits of its copies in a retrain loop), the final pictures. Variants
alternate fit by fit in one process; the first round, which pays for imports and first-call
initialization, is shown apart and left out. The extra cost is the median over rounds of each
round's difference.

Workloads: the reference LSTM (1 x 256, input 32, T = 100, batch 64) and a small forecasting
model (2 x 32 LSTM, input 8, T = 24, batch 32). Variants: no GradHealth, ``GradHealth()`` and
``GradHealth(init="orthogonal")``.

Usage:
    python benchmarks/fit_start.py            # 8 rounds, about 2 minutes on 2 cores
    python benchmarks/fit_start.py --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_gradhealth import GradHealth

WORKLOADS = {
    # name: (input size, hidden size, layers, T, batch)
    "LSTM 1 x 256, T = 100, batch 64": (32, 256, 1, 100, 64),
    "LSTM 2 x 32, T = 24, batch 32": (8, 32, 2, 24, 32),
}
VARIANTS: dict[str, Callable[[], Optional[GradHealth]]] = {
    "no GradHealth": lambda: None,
    "GradHealth()": lambda: GradHealth(),
    'GradHealth(init="orthogonal")': lambda: GradHealth(init="orthogonal"),
}


class _Forecaster(pl.LightningModule):
    """LSTM, linear head on the last step, MSE, Adam; its data generated, one batch."""

    def __init__(self, input_size: int, hidden: int, layers: int, seq_len: int, batch: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.data = (torch.randn(batch, seq_len, input_size), torch.randn(batch, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.rnn(x)[0][:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.data), batch_size=len(self.data[0]))


class _EndOfStepZero(pl.Callback):
    """The time step 0 ends (after the optimizer step and every other callback's hooks of it)."""

    at: float = 0.0

    def on_train_batch_end(self, *args: object) -> None:
        self.at = time.perf_counter()


def time_fit(workload: tuple[int, int, int, int, int], health: Optional[GradHealth], log_dir: str) -> tuple[float, float]:
    """Seconds from ``trainer.fit`` to the end of step 0 and to its return, for one step of a fresh model."""
    model = _Forecaster(*workload)
    step_end = _EndOfStepZero()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=TensorBoardLogger(log_dir),
        callbacks=([] if health is None else [health]) + [step_end],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model)
    return step_end.at - start, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds after the first (default 8)")
    args = parser.parse_args()
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds + 1):
            for workload_name, workload in WORKLOADS.items():
                for variant, make in VARIANTS.items():
                    seconds = time_fit(workload, make(), log_dir)
                    if round_index == 0:
                        print(f"first round: {workload_name}, {variant}: {seconds[0]:.2f} s to the end of step 0")
                    else:
                        times.setdefault((workload_name, variant), []).append(seconds)
    print(f"\nmedian over {args.rounds} rounds, seconds from trainer.fit to the end of step 0 and of the one-step fit:\n")
    print("| workload | variant | to the end of step 0, s | more than without | whole fit, s | more than without |")
    print("|---|---|---|---|---|---|")
    for workload_name in WORKLOADS:
        plain = times[(workload_name, "no GradHealth")]
        for variant in VARIANTS:
            fits = times[(workload_name, variant)]
            cells = []
            for part in (0, 1):
                # paired: each round's fit against the same round's fit without GradHealth
                extra = statistics.median(fit[part] - without[part] for fit, without in zip(fits, plain))
                shown = "" if variant == "no GradHealth" else f"{extra:+.3f}"
                cells += [f"{statistics.median(fit[part] for fit in fits):.3f}", shown]
            print(f"| {workload_name} | {variant} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
