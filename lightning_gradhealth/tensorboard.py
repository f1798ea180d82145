"""Where GradHealth writes: scalars to every logger; histograms, images and text to TensorBoard writers.

Scalars go through ``logger.log_metrics(metrics, step)`` on each of ``trainer.loggers``, as
Lightning's own monitors do (``self.log`` is forbidden in some hooks and takes scalars only).
Histograms and images need a TensorBoard ``SummaryWriter``: that is ``logger.experiment`` of a
``TensorBoardLogger`` from either Lightning namespace (on non-zero ranks Lightning hands out a
no-op stand-in, so only rank 0 writes). Pictures arrive as data
(:class:`~lightning_gradhealth.output.Picture`) and are drawn here, only when a writer takes them.

:func:`custom_scalars_layout` arranges the key charts on TensorBoard's "Custom Scalars" page;
:func:`write_step_output` writes a monitor's output to a plain ``SummaryWriter`` (loops without
Lightning).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pytorch_lightning.loggers
from torch import Tensor

from lightning_gradhealth import tags
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.output import Picture, StepOutput

__all__ = ["write_step_output"]

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


def log_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """Send plain-float scalars to every Lightning logger at ``step``."""
    if not metrics:
        return
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def add_pictures(
    writers: list[Any], pictures: Mapping[str, Picture], step: int, on_error: Optional[Callable[[str, Exception], None]] = None
) -> None:
    """Draw each picture once (only if there is a writer) and write it to every writer. A picture
    that cannot be drawn is left out and handed to ``on_error(tag, error)`` (default: a warning):
    a picture never stops training."""
    if not writers:
        return
    for tag, picture in pictures.items():
        try:
            image = picture.render()
        except Exception as error:  # a picture must never stop the user's training
            if on_error is None:
                warnings.warn(f"GradHealth: could not draw {tag} ({type(error).__name__}: {error}); it is left out.")
            else:
                on_error(tag, error)
            continue
        for writer in writers:
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


def write_step_output(writer: Any, output: StepOutput, step: int) -> None:
    """Write a :class:`~lightning_gradhealth.StepOutput` to a ``SummaryWriter``:
    scalars, histograms and pictures, under the same tags the callback uses."""
    for tag, value in output.scalars.items():
        writer.add_scalar(tag, value, step)
    add_histograms([writer], output.histograms, step)
    add_pictures([writer], output.pictures, step)


def write_outputs(
    loggers: Iterable[Any],
    writers: list[Any],
    output: StepOutput,
    step: int,
    on_error: Optional[Callable[[str, Exception], None]] = None,
) -> None:
    """The callback's way out: scalars to every Lightning logger, histograms and pictures to the
    TensorBoard writers among them (``on_error``: see :func:`add_pictures`)."""
    log_scalars(loggers, output.scalars, step)
    add_histograms(writers, output.histograms, step)
    add_pictures(writers, output.pictures, step, on_error)


def custom_scalars_layout(
    layer_keys: Sequence[LayerKey], clipping: bool, lyapunov: bool = False
) -> dict[str, dict[str, list[Any]]]:
    """The "Custom Scalars" page: one category per recurrent layer and one for gradient norms.

    One chart per quantity, as one tag regular expression: the Custom Scalars page colours the
    lines of a chart by run (a symbol per tag), so two quantities on one chart of several runs
    could not be told apart. Per layer: transmission, horizon, the largest Lyapunov exponent
    (when they are computed, ``lyapunov``), the spectral radius and sigma_max (one chart each,
    one line per gate block). Then the total gradient norm, and with ``clipping`` the norm after
    clipping, the clip coefficient and the fraction of clipped steps, each on its own chart (one
    line per optimizer when there are several); and the two NaN/Inf counts. The layout format
    (``tensorboard.plugins.custom_scalar.layout_pb2``) holds no axis range: the count charts say
    in their titles that a flat line at 0 means none. The result is the ``layout`` argument of
    ``SummaryWriter.add_custom_scalars``.

    Examples:
        >>> layout = custom_scalars_layout([LayerKey("rnn", 0)], clipping=False)
        >>> list(layout)
        ['gradhealth rnn.l0', 'gradhealth gradient norms']
        >>> chart_type, tag_patterns = layout["gradhealth rnn.l0"]["spectral radius per gate"]
        >>> print(chart_type, *tag_patterns)
        Multiline ^gradhealth/rnn\\.l0/4_spectral_radius/[^/]+$
    """

    def chart(pattern: str) -> list[Any]:
        return ["Multiline", [pattern]]

    layout: dict[str, dict[str, list[Any]]] = {}
    for key in layer_keys:
        charts = {
            "transmission (decades, last step back to first)": chart(tags.layer_pattern(key, "transmission")),
            "horizon (steps that keep gradient)": chart(tags.layer_pattern(key, "horizon")),
        }
        if lyapunov:
            charts["lambda_1, largest Lyapunov exponent (per step)"] = chart(tags.layer_pattern(key, tags.LYAPUNOV_MAX))
        charts["spectral radius per gate"] = chart(tags.gate_pattern(key, "spectral_radius"))
        charts["sigma_max per gate"] = chart(tags.gate_pattern(key, "sigma_max"))
        layout[f"{tags.ROOT} {key}"] = charts
    norms = {"gradient norm" + (" before clipping" if clipping else ""): chart(tags.optimizer_pattern("grad_norm", "total"))}
    if clipping:
        norms["gradient norm after clipping"] = chart(tags.optimizer_pattern("grad_norm", "total_clipped"))
        norms["clip coefficient (1: not clipped)"] = chart(tags.optimizer_pattern("clip", "coefficient"))
        norms["fraction of steps clipped since the last log"] = chart(tags.optimizer_pattern("clip", "clipped_steps_fraction"))
    norms["steps with NaN/Inf gradients (count; a flat line at 0: none)"] = chart(tags.exact_pattern(tags.NONFINITE_STEPS))
    norms["steps skipped for NaN/Inf (count; a flat line at 0: none)"] = chart(tags.exact_pattern(tags.NONFINITE_SKIPPED_STEPS))
    layout[f"{tags.ROOT} gradient norms"] = norms
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
