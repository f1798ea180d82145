"""Where GradHealth writes: scalars to every logger; histograms, images and text to TensorBoard writers.

Scalars go through ``logger.log_metrics(metrics, step)`` on each of ``trainer.loggers``, as
Lightning's own monitors do (``self.log`` is forbidden in some hooks and takes scalars only).
Histograms and images need a TensorBoard ``SummaryWriter``: that is ``logger.experiment`` of a
``TensorBoardLogger`` from either Lightning namespace (on non-zero ranks Lightning hands out a
no-op stand-in, so only rank 0 writes).

:func:`custom_scalars_layout` arranges the key charts on TensorBoard's "Custom Scalars" page;
:func:`write_step_output` writes a monitor's output to a plain ``SummaryWriter`` (loops without
Lightning).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pytorch_lightning.loggers
from torch import Tensor

if TYPE_CHECKING:
    from lightning_gradhealth.monitor import StepOutput

__all__ = [
    "add_histograms",
    "add_images",
    "add_text",
    "config_markdown",
    "custom_scalars_layout",
    "log_scalars",
    "tensorboard_writers",
    "write_step_output",
]

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


def add_text(writers: list[Any], tag: str, markdown: str, step: int) -> None:
    """Write a Markdown text summary to every writer (TensorBoard's "Text" tab)."""
    for writer in writers:
        writer.add_text(tag, markdown, step)


def write_step_output(writer: Any, output: "StepOutput", step: int) -> None:
    """Write a :class:`~lightning_gradhealth.monitor.StepOutput` to a ``SummaryWriter``:
    scalars, histograms and pictures, under the same tags the callback uses."""
    for tag, value in output.scalars.items():
        writer.add_scalar(tag, value, step)
    add_histograms([writer], output.histograms, step)
    add_images([writer], output.images, step)


def custom_scalars_layout(layer_keys: Sequence[str], clipping: bool) -> dict[str, dict[str, list[Any]]]:
    """The "Custom Scalars" page: one category per recurrent layer and one for gradient norms.

    Per layer: transmission, horizon, the spectral radius of every gate block, and sigma_max of
    every gate block on one chart each (tags as regular expressions, one line per gate). Then the
    total gradient norm before and after clipping, the clip coefficient and the NaN/Inf counts.
    The result is the ``layout`` argument of ``SummaryWriter.add_custom_scalars``.

    Examples:
        >>> layout = custom_scalars_layout(["rnn.l0"], clipping=False)
        >>> list(layout)
        ['gradhealth rnn.l0', 'gradhealth gradient norms']
        >>> chart_type, tag_patterns = layout["gradhealth rnn.l0"]["spectral radius per gate"]
        >>> print(chart_type, *tag_patterns)
        Multiline ^gradhealth/rnn\\.l0/[^/]+/spectral_radius$
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for key in layer_keys:
        prefix = "^gradhealth/" + re.escape(key)
        layout[f"gradhealth {key}"] = {
            "transmission (decades, last step back to first)": ["Multiline", [prefix + "/transmission$"]],
            "horizon (steps that keep gradient)": ["Multiline", [prefix + "/horizon$"]],
            "spectral radius per gate": ["Multiline", [prefix + "/[^/]+/spectral_radius$"]],
            "sigma_max per gate": ["Multiline", [prefix + "/[^/]+/sigma_max$"]],
        }
    norms = {"gradient norm" + (" before / after clipping" if clipping else ""): ["Multiline", ["^gradhealth/grad_norm/"]]}
    if clipping:
        norms["clip coefficient and clipped fraction"] = ["Multiline", ["^gradhealth/clip/"]]
    norms["non-finite gradient steps"] = ["Multiline", ["^gradhealth/nonfinite/"]]
    layout["gradhealth gradient norms"] = norms
    return layout


def config_markdown(settings: Mapping[str, Any]) -> str:
    """A two-column Markdown table of settings, for TensorBoard's "Text" tab.

    Examples:
        >>> print(config_markdown({"init": "orthogonal", "clip": None}))
        | setting | value |
        |---|---|
        | init | `'orthogonal'` |
        | clip | `None` |
    """
    rows = [f"| {name} | `{value!r}` |" for name, value in settings.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])
