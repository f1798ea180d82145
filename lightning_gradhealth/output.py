"""What one optimizer step gives the logs: scalars, histograms, and pictures as data.

The engine returns data and never draws: a picture is a small record of what to draw, and only
the side that writes it (:mod:`~lightning_gradhealth.tensorboard`) calls :meth:`Picture.render`,
so a run without a TensorBoard writer renders nothing.

Examples:
    >>> import torch
    >>> curve = TimestepCurve({"rnn.l0": torch.tensor([1e-3, 1e-2, 1.0])}, title="rnn.l0", step=50)
    >>> curve.render().shape[2]
    3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Mapping, Protocol, Sequence

import numpy as np
from torch import Tensor

from lightning_gradhealth.defaults import HEATMAP_COLUMNS

__all__ = ["EigenvalueChart", "Picture", "StepOutput", "TimestepCurve", "TimestepHeatmap", "bin_max", "heatmap_bin_width"]


class Picture(Protocol):
    """Anything :func:`~lightning_gradhealth.write_step_output` can draw."""

    def render(self) -> np.ndarray:
        """The picture as an ``(H, W, 3)`` uint8 array."""
        ...


@dataclass(frozen=True)
class TimestepCurve:
    """||dL/dh_t|| (and ||dL/dc_t||) over t of one layer's latest probe; ``norms``: label -> ``(T,)``,
    the labels in ``cell_states`` (LSTM cell states) drawn dashed. Each curve is drawn in decades
    relative to the layer's last step: input position T-1, or position 0 with ``reverse`` (the
    backward direction of a bidirectional layer, which computes position 0 last)."""

    norms: Mapping[str, Tensor]
    title: str
    step: int
    cell_states: AbstractSet[str] = frozenset()
    reverse: bool = False

    def render(self) -> np.ndarray:
        from lightning_gradhealth.figures import timestep_curve_image

        return timestep_curve_image(self.norms, self.title, self.step, dashed=self.cell_states, reverse=self.reverse)


def heatmap_bin_width(timesteps: int, columns: int = HEATMAP_COLUMNS) -> int:
    """Timesteps per column of a heatmap row of a probe over ``timesteps`` steps: the smallest power
    of two w with ceil(timesteps / w) <= ``columns``. Powers of two nest, so rows of different
    lengths are drawn on one grid exactly, and a row's width is found again from its length and
    its number of columns (``heatmap_bin_width(timesteps, len(row))``).

    Examples:
        >>> heatmap_bin_width(200), heatmap_bin_width(5000), heatmap_bin_width(100_000)
        (1, 32, 512)
        >>> heatmap_bin_width(5000, columns=-(-5000 // 32))
        32
    """
    width = 1
    while -(-timesteps // width) > columns:
        width *= 2
    return width


def bin_max(values: np.ndarray, width: int) -> np.ndarray:
    """The largest of each ``width`` consecutive ``values`` (the last bin may be shorter), as a new
    float32 array. A NaN makes its bin NaN. The largest, not a mean: a gradient that explodes at
    one timestep shows at any bin width, and a decaying profile is shifted by less than one bin.

    Examples:
        >>> bin_max(np.array([1.0, 5.0, 2.0, 0.5, 3.0]), 2)
        array([5., 2., 3.], dtype=float32)
    """
    values = np.asarray(values, dtype=np.float32)
    if width == 1 or not len(values):
        return values.copy()
    return np.maximum.reduceat(values, np.arange(0, len(values), width))


@dataclass(frozen=True)
class TimestepHeatmap:
    """log10 ||dL/dh_t|| over (training step, t): one row of norms per probed step; ``timesteps``
    gives each row's probe length T when its columns are bins (:func:`heatmap_bin_width`, each
    bin's largest norm, :func:`bin_max`), empty when every column is one timestep. Each row is
    drawn in decades relative to the layer's last step: its last column, or column 0 with
    ``reverse`` (the backward direction of a bidirectional layer)."""

    steps: Sequence[int]
    rows: Sequence[np.ndarray]
    title: str
    timesteps: Sequence[int] = ()
    reverse: bool = False

    def render(self) -> np.ndarray:
        from lightning_gradhealth.figures import timestep_heatmap_image

        return timestep_heatmap_image(self.steps, self.rows, self.title, self.timesteps, reverse=self.reverse)


@dataclass(frozen=True)
class EigenvalueChart:
    """The eigenvalues of each gate block of a hidden-to-hidden matrix: ``[G, n]`` complex."""

    eigenvalues: Tensor
    gates: Sequence[str]
    title: str

    def render(self) -> np.ndarray:
        from lightning_gradhealth.figures import eigenvalue_image

        return eigenvalue_image(self.eigenvalues, self.gates, self.title)


@dataclass
class StepOutput:
    """What one optimizer step produced for the logs.

    Attributes:
        scalars: tag -> value, for every logger (empty on steps that are not logging steps).
        histograms: tag -> 1-D tensor of values, for TensorBoard.
        pictures: tag -> :class:`Picture` (drawn only by a writer, see :attr:`images`).
        skip_step: the gradients held NaN/Inf and ``on_nonfinite="skip"`` set them to ``None``:
            ``optimizer.step()`` leaves those parameters and their optimizer state as they are.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    pictures: dict[str, Picture] = field(default_factory=dict)
    skip_step: bool = False

    @property
    def images(self) -> dict[str, np.ndarray]:
        """Every picture drawn: tag -> ``(H, W, 3)`` uint8 array. Each access draws them all
        (matplotlib): read it only to write them."""
        return {tag: picture.render() for tag, picture in self.pictures.items()}

    def update(self, other: StepOutput) -> None:
        """Add ``other``'s scalars, histograms and pictures to this output."""
        self.scalars.update(other.scalars)
        self.histograms.update(other.histograms)
        self.pictures.update(other.pictures)
