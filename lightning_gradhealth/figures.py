"""Pictures for TensorBoard, drawn with matplotlib's Agg backend into ``(H, W, 3)`` uint8 arrays.

The pictures of two runs are meant to be put side by side, so none of them scales to its own data:

- the per-timestep curve and heatmap show decades relative to the layer's last step,
  ``log10(||dL/dh_t|| / ||dL/dh_T||)`` (T: the layer's last step in its own order, input
  position 0 for a backward direction), on one fixed range, :data:`DECADES_RANGE`; values
  beyond it are drawn at its edge (the colour bar's end arrows, the curve's edge markers);
- what has no such value is drawn in a colour of its own, named in a legend on the picture:
  a norm of exactly 0 (:data:`ZERO_COLOUR`), a NaN/Inf norm (:data:`NONFINITE_COLOUR`), a step of a
  probe whose last step has no usable norm (:data:`NO_REFERENCE_COLOUR`) and, in the heatmap,
  timesteps a shorter sequence did not have (white);
- the eigenvalues of all gate blocks share one panel, each gate in its own colour and marker,
  over a thin unit circle.

Examples:
    >>> import torch
    >>> image = timestep_curve_image({"rnn.l0": torch.tensor([1e-3, 1e-2, 1.0])}, "rnn.l0", step=50)
    >>> image.shape[2], image.dtype
    (3, dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from lightning_gradhealth.output import bin_max, heatmap_bin_width

__all__ = [
    "DECADES_RANGE",
    "DECADE_COLOURMAP",
    "GATE_COLOURS",
    "NONFINITE_COLOUR",
    "NO_REFERENCE_COLOUR",
    "UNIT_CIRCLE_COLOUR",
    "ZERO_COLOUR",
    "Cell",
    "binned_norms",
    "decade_colours",
    "eigenvalue_figure",
    "eigenvalue_image",
    "figure_to_array",
    "heatmap_grid",
    "relative_decades",
    "timestep_curve_figure",
    "timestep_curve_image",
    "timestep_heatmap_figure",
    "timestep_heatmap_image",
]

DECADES_RANGE = (-20.0, 5.0)
"""The fixed scale of the per-timestep pictures, in decades relative to the layer's last step:
from 20 decades below it (a factor 0.1 per step back spends it in 20 steps; past that a run is
vanishing whatever the exact figure) to 5 above (a gradient 10^5 times the last step's is
exploding). The heatmap's colour bar and the curve's y axis both span it."""

DECADE_COLOURMAP = "viridis"
"""The heatmap's colour map over :data:`DECADES_RANGE` (dark: vanished, yellow: grown)."""

ZERO_COLOUR = "0.6"
"""A norm of exactly 0: the loss does not reach that step, or float underflowed (grey)."""

NONFINITE_COLOUR = "tab:red"
"""A NaN or Inf norm."""

NO_REFERENCE_COLOUR = "tab:pink"
"""A step of a probe whose last step's norm is 0 or NaN/Inf: nothing to be relative to."""

GATE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
"""The eigenvalue points of the gate blocks, in PyTorch's gate order (cycled beyond four)."""

_GATE_MARKERS = ("o", "s", "^", "D")

UNIT_CIRCLE_COLOUR = "0.35"
"""The unit circle under the eigenvalues: thin and dark grey, no gate's colour."""


class Cell:
    """What a heatmap cell or curve point shows (the codes of :func:`relative_decades`)."""

    VALUE = 0
    """A finite number of decades."""
    MISSING = 1
    """No timestep: the row's probe was shorter."""
    ZERO = 2
    NONFINITE = 3
    NO_REFERENCE = 4


_CELL_LABELS = {
    Cell.MISSING: "white: no such timestep (a shorter sequence)",
    Cell.ZERO: "norm 0 (not reached, or underflow)",
    Cell.NONFINITE: "NaN/Inf norm",
    Cell.NO_REFERENCE: "last step's norm 0 or NaN/Inf: no reference",
}
_CELL_COLOURS = {
    Cell.MISSING: "white", Cell.ZERO: ZERO_COLOUR, Cell.NONFINITE: NONFINITE_COLOUR, Cell.NO_REFERENCE: NO_REFERENCE_COLOUR
}  # fmt: skip


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure (without pyplot, so no global state and no leak) to RGB uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def relative_decades(norms: np.ndarray, present: np.ndarray, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's norms in decades relative to its last step, and what each cell shows.

    ``decades[r, t] = log10(norms[r, t] / norms[r, last])``, where ``last`` is the row's last
    present column (``reverse``: column 0, a backward direction's last step). ``cells`` holds a
    :class:`Cell` code per entry; ``decades`` is NaN wherever the code is not ``Cell.VALUE``.

    Args:
        norms: ``[R, C]`` non-negative norms (NaN/Inf allowed).
        present: ``[R, C]`` bool, False where a row has no such timestep; each row's present
            columns come first.
        reverse: take column 0 as each row's last step.

    Examples:
        >>> decades, cells = relative_decades(np.array([[1e-3, 0.0, 1e-1]]), np.array([[True, True, True]]))
        >>> decades.round(6).tolist(), cells.tolist()
        ([[-2.0, nan, 0.0]], [[0, 2, 0]])
    """
    norms = np.asarray(norms, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if norms.shape != present.shape or norms.ndim != 2:
        raise ValueError(f"norms and present must be [rows, columns] arrays of one shape, got {norms.shape} and {present.shape}")
    rows = np.arange(len(norms))
    last = np.zeros(len(norms), dtype=np.int64) if reverse else np.maximum(present.sum(axis=1) - 1, 0)
    reference = norms[rows, last] if norms.size else np.zeros(len(norms))
    cells = np.full(norms.shape, Cell.VALUE, dtype=np.int8)
    has_reference = (np.isfinite(reference) & (reference > 0))[:, None]
    cells[~has_reference & present] = Cell.NO_REFERENCE
    cells[norms == 0] = Cell.ZERO
    cells[~np.isfinite(norms)] = Cell.NONFINITE
    cells[~present] = Cell.MISSING
    decades = np.full(norms.shape, np.nan)
    value = cells == Cell.VALUE
    decades[value] = np.log10((norms / np.where(has_reference, reference[:, None], 1.0))[value])
    return decades, cells


def decade_colours(decades: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """RGBA in [0, 1] for each cell: :data:`DECADE_COLOURMAP` over the fixed :data:`DECADES_RANGE`
    (clipped to its ends) for values, the colour of its kind for the others. The same number of
    decades gets the same colour in every picture of every run.

    Examples:
        >>> colours = decade_colours(np.array([[0.0, -30.0, np.nan]]), np.array([[0, 0, 2]]))
        >>> colours.shape, bool((colours[0, 1] == decade_colours(np.array([[-20.0]]), np.array([[0]]))[0, 0]).all())
        ((1, 3, 4), True)
    """
    colourmap = colormaps[DECADE_COLOURMAP]
    scale = Normalize(*DECADES_RANGE, clip=True)
    colours = colourmap(scale(np.where(cells == Cell.VALUE, decades, DECADES_RANGE[0])))
    for kind, colour in _CELL_COLOURS.items():
        colours[cells == kind] = to_rgba(colour)
    return colours


def _reference_words(reverse: bool) -> str:
    return "T = input position 0, the backward direction's last step" if reverse else "T = the last step"


def timestep_curve_figure(
    norms: Mapping[str, Tensor], title: str, step: int, dashed: AbstractSet[str] = frozenset(), reverse: bool = False
) -> Figure:
    """The latest probe of one layer: each curve's norms over t in decades relative to its own
    last step (``reverse``: position 0), on the fixed y range :data:`DECADES_RANGE`. The legend
    gives each curve's norm at that step, the absolute scale. Points beyond the range sit on its
    edge as triangles; a norm of 0 (grey) and NaN/Inf (red) as crosses on the bottom and top
    edges; a curve whose last step's norm is 0 or NaN/Inf is not drawn and says so. The curves
    labelled in ``dashed`` (cell states) are dashed."""
    low, high = DECADES_RANGE
    figure = Figure(figsize=(5.0, 3.4), dpi=80)
    axes = figure.add_subplot()
    marks: dict[str, tuple[str, str]] = {}  # legend text -> (marker, colour), once per kind
    for label, values in norms.items():
        data = values.detach().double().cpu().numpy()
        decades, cells = (a[0] for a in relative_decades(data[None, :], np.ones((1, len(data)), dtype=bool), reverse))
        t = np.arange(len(data))
        reference = data[0 if reverse else -1] if len(data) else np.nan
        if np.isfinite(reference) and reference > 0:
            linestyle = "--" if label in dashed else "-"
            (line,) = axes.plot(t, np.clip(decades, low, high), linestyle=linestyle, label=f"{label} (at T: {reference:.3g})")
            for beyond, edge, marker in ((decades < low, low, "v"), (decades > high, high, "^")):
                if beyond.any():
                    edges = np.full(int(beyond.sum()), edge)
                    axes.plot(t[beyond], edges, marker, color=line.get_color(), markersize=5, clip_on=False)
                    marks["triangle: beyond the axis, drawn at its edge"] = (marker, "0.3")
        else:
            axes.plot([], [], " ", label=f"{label}: {reference:.3g} at T, no reference: not drawn")
        for kind, edge in ((Cell.ZERO, low), (Cell.NONFINITE, high)):
            chosen = cells == kind
            if chosen.any():
                edges = np.full(int(chosen.sum()), edge)
                axes.plot(t[chosen], edges, "x", color=_CELL_COLOURS[kind], markersize=6, clip_on=False)
                marks[f"x: {_CELL_LABELS[kind]}"] = ("x", _CELL_COLOURS[kind])
    for text, (marker, colour) in marks.items():
        axes.plot([], [], marker, color=colour, label=text)
    axes.axhline(0.0, color="0.5", linewidth=0.6, zorder=0)
    axes.set_ylim(low - 0.6, high + 0.6)
    axes.set_yticks(np.arange(low, high + 1, 5.0))
    axes.set_xlabel("timestep t (input position)")
    axes.set_ylabel("log10(||dL/dh_t|| / ||dL/dh_T||)", fontsize=8)
    axes.set_title(f"{title} at step {step}: decades vs. the last step ({_reference_words(reverse)})", fontsize=8)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def timestep_curve_image(
    norms: Mapping[str, Tensor], title: str, step: int, dashed: AbstractSet[str] = frozenset(), reverse: bool = False
) -> np.ndarray:
    """:func:`timestep_curve_figure` as an ``(H, W, 3)`` uint8 array."""
    return figure_to_array(timestep_curve_figure(norms, title, step, dashed, reverse))


@dataclass(frozen=True)
class BinnedNorms:
    """The heatmap's rows on one grid of bins: ``norms[r, c]`` (NaN where absent), ``present``,
    and ``width``, the timesteps per column."""

    norms: np.ndarray
    present: np.ndarray
    width: int


def binned_norms(rows: Sequence[np.ndarray], timesteps: Sequence[int] = ()) -> BinnedNorms:
    """The heatmap's rows, one per probe, on one grid. ``timesteps``: each row's probe length T
    when its columns are bins (:func:`~lightning_gradhealth.output.heatmap_bin_width`), empty when
    every column is one timestep. The grid takes the coarsest row's bins; a finer row is re-binned
    to them by the largest norm (exact: the widths are powers of two, and a max of maxima is the max).

    Examples:
        >>> binned = binned_norms([np.array([1.0, 10.0, 100.0, 0.1]), np.array([1000.0, 0.0])], timesteps=(4, 4))
        >>> binned.norms.tolist(), binned.present.tolist(), binned.width
        ([[10.0, 100.0], [1000.0, 0.0]], [[True, True], [True, True]], 2)
    """
    lengths = list(timesteps) or [len(row) for row in rows]
    widths = [heatmap_bin_width(length, len(row)) for length, row in zip(lengths, rows)]
    width = max(widths)
    norms = np.full((len(rows), -(-max(lengths) // width)), np.nan)
    present = np.zeros(norms.shape, dtype=bool)
    for index, (row, row_width) in enumerate(zip(rows, widths)):
        binned = bin_max(row, width // row_width).astype(np.float64)
        norms[index, : len(binned)] = binned
        present[index, : len(binned)] = True
    return BinnedNorms(norms, present, width)


def heatmap_grid(rows: Sequence[np.ndarray], timesteps: Sequence[int] = ()) -> tuple[np.ndarray, int]:
    """log10 of :func:`binned_norms` (NaN where a norm is 0, missing or NaN) and the timesteps per column.

    Examples:
        >>> grid, width = heatmap_grid([np.array([1.0, 10.0, 100.0, 0.1]), np.array([1000.0, 0.0])], timesteps=(4, 4))
        >>> grid.tolist(), width
        ([[1.0, 2.0], [3.0, nan]], 2)
    """
    binned = binned_norms(rows, timesteps)
    with np.errstate(divide="ignore", invalid="ignore"):
        grid = np.where(binned.norms > 0, np.log10(np.maximum(binned.norms, 1e-300)), np.nan)
    return grid, binned.width


def timestep_heatmap_figure(
    steps: Sequence[int], rows: Sequence[np.ndarray], title: str, timesteps: Sequence[int] = (), reverse: bool = False
) -> Figure:
    """||dL/dh_t|| over (training step, timestep), one row per probe, each row in decades relative
    to its own last step (``reverse``: position 0), coloured on the fixed :data:`DECADES_RANGE`
    (:func:`decade_colours`) with a labelled colour bar; cells without a value in the colours of
    their kind, named in a legend under the picture. With bins of timesteps (``timesteps``, see
    :func:`binned_norms`) each cell is the largest norm of its bin and the reference is the largest
    norm of the row's last bin: the labels say so."""
    binned = binned_norms(rows, timesteps)
    decades, cells = relative_decades(binned.norms, binned.present, reverse)
    kinds = [kind for kind in _CELL_LABELS if (cells == kind).any()]
    figure = Figure(figsize=(5.0, 3.6 if kinds else 3.2), dpi=80)
    axes = figure.add_subplot()
    axes.imshow(
        decade_colours(decades, cells), aspect="auto", origin="lower", interpolation="nearest",
        extent=(-0.5, cells.shape[1] * binned.width - 0.5, -0.5, len(rows) - 0.5),
    )  # fmt: skip
    ticks = np.linspace(0, len(rows) - 1, num=min(len(rows), 6)).round().astype(int)
    axes.set_yticks(ticks, [str(steps[i]) for i in ticks])
    width = binned.width
    axes.set_xlabel("timestep t" if width == 1 else f"timestep t (bins of {width}: the largest norm in each)", fontsize=8)
    axes.set_ylabel("training step")
    axes.set_title(f"{title}: decades vs. the last step ({_reference_words(reverse)})", fontsize=8)
    colour_bar = figure.colorbar(
        ScalarMappable(Normalize(*DECADES_RANGE), colormaps[DECADE_COLOURMAP]), ax=axes, extend="both"
    )
    norm = "||dL/dh_t||" if width == 1 else f"max ||dL/dh_t|| per {width} steps"
    colour_bar.set_label(f"log10({norm} / same at T)", fontsize=8)
    colour_bar.ax.tick_params(labelsize=7)
    if kinds:
        handles = [Patch(facecolor=_CELL_COLOURS[kind], edgecolor="0.3", label=_CELL_LABELS[kind]) for kind in kinds]
        figure.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
        figure.tight_layout(rect=(0.0, 0.06 * -(-len(kinds) // 2), 1.0, 1.0))
    else:
        figure.tight_layout()
    return figure


def timestep_heatmap_image(
    steps: Sequence[int], rows: Sequence[np.ndarray], title: str, timesteps: Sequence[int] = (), reverse: bool = False
) -> np.ndarray:
    """:func:`timestep_heatmap_figure` as an ``(H, W, 3)`` uint8 array."""
    return figure_to_array(timestep_heatmap_figure(steps, rows, title, timesteps, reverse))


def eigenvalue_figure(
    eigenvalues: Tensor, gate_names: Sequence[str] = (), title: str = "", inches: float = 4.0, dpi: int = 80
) -> Figure:
    """The eigenvalues of every gate block of one matrix on one complex plane (see :func:`eigenvalue_image`)."""
    values = eigenvalues.detach().cpu().numpy().astype(np.complex128)
    names = list(gate_names) or [f"block {k}" for k in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"got {len(names)} gate names for {len(values)} gate blocks")
    legend_rows = -(-(len(values) + 1) // 2)
    # fixed margins (inches): tight_layout would double the drawing time
    left, right, top, bottom = 0.45, 0.15, 0.35, 0.35 + 0.2 * legend_rows
    side = inches - left - right
    width, height = inches, side + top + bottom
    figure = Figure(figsize=(width, height), dpi=dpi)
    axes = figure.add_axes((left / width, bottom / height, side / width, side / height))
    circle = np.exp(1j * np.linspace(0.0, 2.0 * np.pi, 256))
    axes.plot(circle.real, circle.imag, color=UNIT_CIRCLE_COLOUR, linewidth=0.6, zorder=1, label="unit circle |z| = 1")
    radius = 0.0
    for index, (name, block_values) in enumerate(zip(names, values)):
        colour, marker = GATE_COLOURS[index % len(GATE_COLOURS)], _GATE_MARKERS[index % len(_GATE_MARKERS)]
        if not np.isfinite(block_values).all():
            axes.scatter([], [], s=18, color=colour, marker=marker, label=f"{name}: NaN/Inf, not drawn")
            continue
        block_radius = float(np.abs(block_values).max(initial=0.0))
        radius = max(radius, block_radius)
        axes.scatter(
            block_values.real, block_values.imag, s=18, color=colour, marker=marker, alpha=0.8, linewidths=0, zorder=3,
            label=f"{name}: radius {block_radius:.3f}",
        )  # fmt: skip
    limit = max(1.1, 1.05 * radius)
    axes.set_xlim(-limit, limit)
    axes.set_ylim(-limit, limit)
    axes.set_aspect("equal")
    axes.set_xticks([-1.0, 0.0, 1.0])
    axes.set_yticks([-1.0, 0.0, 1.0])
    axes.tick_params(labelsize=8)
    axes.grid(True, alpha=0.25, zorder=0)
    figure.legend(loc="lower center", ncol=2, fontsize=8, frameon=False, markerscale=1.3)
    figure.suptitle(f"{title + ': ' if title else ''}eigenvalues per gate", fontsize=9, y=1 - 0.08 / height)
    return figure


def eigenvalue_image(
    eigenvalues: Tensor, gate_names: Sequence[str] = (), title: str = "", inches: float = 4.0, dpi: int = 80
) -> np.ndarray:
    """The eigenvalues of each gate block on the complex plane, over the unit circle, as an RGB image.

    All gate blocks share one square panel (the same axes for every gate, legible at
    TensorBoard's card size): each gate in its own colour and marker (:data:`GATE_COLOURS`),
    drawn over a thin unit circle (:data:`UNIT_CIRCLE_COLOUR`), so eigenvalues on the circle, as
    right after an orthogonal init, stay visible. The legend gives each gate's spectral radius; a
    block whose eigenvalues are not finite is named there and not drawn. Drawn on a bare
    ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, no window, no change to the
    user's backend, nothing left registered once the array is returned.

    Args:
        eigenvalues: ``[G, n]`` complex, e.g. :attr:`~lightning_gradhealth.spectra.MatrixSpectrum.eigenvalues`;
            any device.
        gate_names: one name per block (PyTorch's ``i, f, g, o``...); default ``block 0``, ...
        title: the picture's title, e.g. the layer key.
        inches: the picture's width (the panel is square; the legend adds height).
        dpi: pixels per inch.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)`` (HWC), for TensorBoard's
        ``add_image(tag, image, step, dataformats="HWC")``.

    Raises:
        ValueError: ``gate_names`` does not name every block.

    Examples:
        >>> import torch
        >>> from lightning_gradhealth.spectra import full_spectrum
        >>> image = eigenvalue_image(full_spectrum(torch.randn(8, 4), gates=2).eigenvalues, ("r", "z"))
        >>> image.dtype, image.shape
        (dtype('uint8'), (360, 320, 3))
    """
    return figure_to_array(eigenvalue_figure(eigenvalues, gate_names, title, inches, dpi))
