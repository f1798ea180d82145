"""Two real fits under 2-process CPU DDP (gloo) with GradHealth, for tests/test_integrations.py.

Fit "skip": ``GradHealth(init="orthogonal", clip="norm", on_nonfinite="skip")``, the timestep
probe and the full spectra on every logging step, a TensorBoard logger; rank 1's loss is NaN at
step 1 only. Fit "warn": ``GradHealth(clip="norm", on_nonfinite="warn")``, probing every step;
rank 1's loss is NaN from step 1 on, so after the all-reduce every rank's weights turn NaN.

Rank 0's output goes where the caller reads it; rank 1 (spawned by Lightning, ``LOCAL_RANK=1``
in its environment from the start) sends its stdout and stderr to OUT/rank1.out. Each rank saves
OUT/{fit}_rank{N}.pt: its process id, the weights at train start and at the end, the batch and
the weights before the probed step ``PROBED_STEP``, and what GradHealth measured and counted.

Usage: python tests/scripts/ddp_integration.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__" and os.environ.get("LOCAL_RANK", "0") != "0":
    # a child rank: its own output file, opened before anything prints
    _output = os.open(Path(sys.argv[1]) / f"rank{os.environ['LOCAL_RANK']}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(_output, 1)
    os.dup2(_output, 2)

from typing import Any  # noqa: E402

import pytorch_lightning  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import PLSequenceModel, trainer_kwargs, weights  # noqa: E402

from lightning_gradhealth import GradHealth  # noqa: E402

PROBED_STEP = 2


def build_lstm() -> nn.Module:
    """The recurrent layer of both fits (the test rebuilds it for the reference)."""
    return nn.LSTM(3, 8, num_layers=2, batch_first=True)


class NaNOnRank1(PLSequenceModel):
    """The test model; on rank 1 its loss is NaN at the optimizer steps in ``nan_steps``."""

    def __init__(self, nan_steps: range) -> None:
        super().__init__(build=build_lstm)
        self.nan_steps = nan_steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_rank == 1 and self.trainer.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss


class Record(pytorch_lightning.Callback):
    """The weights at train start, and the batch and weights before step ``PROBED_STEP``."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.saved["weights_at_start"] = weights(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == PROBED_STEP:
            self.saved["probed_batch"] = [tensor.clone() for tensor in batch]
            self.saved["weights_before_probed_step"] = weights(pl_module)


def fit(out: Path, name: str, health: GradHealth, nan_steps: range, **overrides: Any) -> None:
    """One DDP fit of :class:`NaNOnRank1`; each rank saves what it saw to OUT/{name}_rank{N}.pt."""
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))  # ranks start from different weights
    record = Record()
    logger = TensorBoardLogger(out / "tb", name=name, version=0)
    trainer = pytorch_lightning.Trainer(
        callbacks=[record, health], **trainer_kwargs(strategy="ddp", devices=2, logger=logger, **overrides)
    )
    trainer.fit(NaNOnRank1(nan_steps))
    torch.save(
        {
            **record.saved,
            "pid": os.getpid(),
            "final_weights": weights(trainer.lightning_module),
            "timestep_grad_norms": dict(health.timestep_grad_norms),
            "history_steps": {key: [step for step, _ in rows] for key, rows in health.timestep_history.items()},
            "spectra": sorted(health.spectra),
            "init_parameters": [record.parameter for record in health.init_report],
            "init_seed": health.init_seed,
            "nonfinite_steps": health.nonfinite_steps,
            "skipped_steps": health.skipped_steps,
            "clip_steps": health.monitor.clip_steps,
            "global_step": trainer.global_step,
            "report": health.health_report.format() if health.health_report else None,
        },
        out / f"{name}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit(
        out,
        "skip",
        GradHealth(init="orthogonal", log_every_n_steps=2, full_every_n_steps=2, clip="norm", clip_val=0.5, on_nonfinite="skip"),
        nan_steps=range(1, 2),
        max_steps=4,
    )
    fit(
        out,
        "warn",
        GradHealth(log_every_n_steps=1, clip="norm", clip_val=0.5, on_nonfinite="warn"),
        nan_steps=range(1, 99),
        max_steps=3,
    )
    print(f"rank {os.environ.get('LOCAL_RANK', '0')} finished", flush=True)
