"""Where GradHealth writes: scalars to every logger, histograms and images to TensorBoard writers.

Scalars go through ``logger.log_metrics(metrics, step)`` on each of ``trainer.loggers``, as
Lightning's own monitors do (``self.log`` is forbidden in some hooks and takes scalars only).
Histograms and images need a TensorBoard ``SummaryWriter``: that is ``logger.experiment`` of a
``TensorBoardLogger`` from either Lightning namespace (on non-zero ranks Lightning hands out a
no-op stand-in, so only rank 0 writes).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pytorch_lightning.loggers
from torch import Tensor

__all__ = ["add_histograms", "add_images", "log_scalars", "tensorboard_writers"]

_TENSORBOARD_LOGGERS: tuple[type, ...] = (pytorch_lightning.loggers.TensorBoardLogger,)
try:
    import lightning.pytorch.loggers
except ImportError:  # the `lightning` package is optional
    pass
else:
    _TENSORBOARD_LOGGERS += (lightning.pytorch.loggers.TensorBoardLogger,)


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer``."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, _TENSORBOARD_LOGGERS)]


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send plain-float scalars to every logger of ``trainer`` at ``step``."""
    if not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def add_images(writers: list[Any], images: Mapping[str, np.ndarray], step: int) -> None:
    """Write ``(H, W, 3)`` uint8 images to every writer."""
    for writer in writers:
        for tag, image in images.items():
            writer.add_image(tag, image, step, dataformats="HWC")


def add_histograms(writers: list[Any], histograms: Mapping[str, Tensor], step: int) -> None:
    """Write the distribution of each 1-D tensor's finite values to every writer."""
    for tag, values in histograms.items():
        finite = values.detach().double().cpu()
        finite = finite[finite.isfinite()]
        if finite.numel():
            for writer in writers:
                writer.add_histogram(tag, finite.numpy(), step)
