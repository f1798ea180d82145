"""A real 2-process CPU DDP fit (gloo) with GradHealth(init=...), for tests/test_ddp.py.

Each rank starts from a different torch seed, so the framework's init and the default init
seed differ per rank; each rank saves the weights it holds at train start to OUT/rank{N}.pt.
Usage: python tests/scripts/ddp_init.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytorch_lightning
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import PLSequenceModel, trainer_kwargs, weights  # noqa: E402

from lightning_gradhealth import GradHealth  # noqa: E402


class SaveWeightsAtTrainStart(pytorch_lightning.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save(weights(pl_module), self.out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))
    trainer = pytorch_lightning.Trainer(
        callbacks=[GradHealth(init="orthogonal", chrono_t_max=20), SaveWeightsAtTrainStart(out)],
        **trainer_kwargs(strategy="ddp", devices=2, max_steps=2),
    )
    trainer.fit(PLSequenceModel())
