"""Real FSDP fits on 2 CPU processes (gloo) with GradHealth, for tests/test_integrations.py.

Stock Lightning refuses FSDP on CPU twice: ``Trainer(strategy="fsdp", accelerator="cpu")``
raises "The strategy `fsdp` requires a GPU accelerator" (a check on ``type(strategy) is
FSDPStrategy`` only), and torch's FullyShardedDataParallel, given ``device_id=None`` (Lightning
passes ``root_device.index``, None on CPU), raises "FSDP needs a non-CPU accelerator device, but
no accelerator device is detected". :class:`CPUFSDPStrategy` passes ``device_id=cpu``: then FSDP
runs on CPU over gloo, sharding exactly as it does on GPUs (``use_orig_params=True``, Lightning's
default: outside forward and backward every parameter is a flat 1-D view of this rank's shard).

Three fits in the same two processes: GradHealth measuring only, with init, and with clipping
(and ``on_nonfinite="skip"``). Each rank saves OUT/{name}_rank{N}.pt: the error (if the fit
raised) or the step reached, what GradHealth measured, its notices, and what :class:`Record` saw.

Usage: python tests/scripts/fsdp_cpu.py OUT
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning
import torch
from pytorch_lightning.strategies import FSDPStrategy
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import PLSequenceModel, trainer_kwargs  # noqa: E402

from lightning_gradhealth import GradHealth  # noqa: E402


PROBED_STEP = 2


def build_lstm() -> nn.Module:
    """The recurrent layer of every fit (the test rebuilds it for the reference)."""
    return nn.LSTM(3, 8, batch_first=True)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with ``device_id=cpu`` for FullyShardedDataParallel."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Record(pytorch_lightning.Callback):
    """What a test needs to judge GradHealth under FSDP. Placed after GradHealth: the recurrent
    weights' shapes as callbacks see them at train start (shards), the whole weights at train
    start and before step ``PROBED_STEP`` with that step's batch (gathered on every rank, a
    collective), and the total gradient norm over all shards after GradHealth's clipping."""

    def __init__(self) -> None:
        self.saved: dict[str, Any] = {"grad_norms_after_clipping": []}

    @staticmethod
    def _whole_weights(trainer: Any, pl_module: Any) -> dict[str, torch.Tensor]:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            return {name: p.detach().clone() for name, p in pl_module.named_parameters()}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.saved["shapes_at_train_start"] = {n: tuple(p.shape) for n, p in pl_module.named_parameters() if n.startswith("rnn.")}
        self.saved["weights_at_start"] = self._whole_weights(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == PROBED_STEP:
            self.saved["probed_batch"] = [tensor.clone() for tensor in batch]
            self.saved["weights_before_probed_step"] = self._whole_weights(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        local = sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters() if p.grad is not None)
        total = torch.tensor(local, dtype=torch.float64)
        torch.distributed.all_reduce(total)
        self.saved["grad_norms_after_clipping"].append(float(total.sqrt()))


def fit(out: Path, name: str, health: GradHealth) -> None:
    torch.manual_seed(0)
    record = Record()
    strategy = CPUFSDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = pytorch_lightning.Trainer(callbacks=[health, record], **trainer_kwargs(strategy=strategy, devices=2))
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(PLSequenceModel(build=build_lstm))
        except Exception as exception:  # recorded for the test, which names it
            error = f"{type(exception).__name__}: {exception}".splitlines()[0]
            traceback.print_exc()
    torch.save(
        {
            **record.saved,
            "name": name,
            "error": error,
            "global_step": trainer.global_step,
            "timestep_grad_norms": dict(health.timestep_grad_norms),
            "spectra": {name: spectrum.sigma_max for name, spectrum in health.spectra.items()},
            "init_parameters": [record.parameter for record in health.init_report],
            "notices": [str(w.message) for w in caught if "GradHealth" in str(w.message)],
        },
        out / f"{name}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit(out, "measure", GradHealth(log_every_n_steps=1, full_every_n_steps=2))
    fit(out, "init", GradHealth(init="orthogonal", log_every_n_steps=1))
    fit(out, "clip", GradHealth(log_every_n_steps=1, clip="norm", clip_val=0.01, on_nonfinite="skip"))
    print(f"rank {os.environ.get('LOCAL_RANK', '0')} finished", flush=True)
