"""Pictures for TensorBoard, drawn with matplotlib's Agg backend into ``(H, W, 3)`` uint8 arrays.

Examples:
    >>> import torch
    >>> image = timestep_curve_image({"rnn.l0": torch.tensor([1e-3, 1e-2, 1.0])}, "rnn.l0", step=50)
    >>> image.shape[2], image.dtype
    (3, dtype('uint8'))
"""

from __future__ import annotations

from typing import AbstractSet, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from lightning_gradhealth.output import bin_max, heatmap_bin_width

__all__ = ["eigenvalue_image", "figure_to_array", "heatmap_grid", "timestep_curve_image", "timestep_heatmap_image"]


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure (without pyplot, so no global state and no leak) to RGB uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def timestep_curve_image(
    norms: Mapping[str, Tensor], title: str, step: int, dashed: AbstractSet[str] = frozenset()
) -> np.ndarray:
    """||dL/dh_t|| (and ||dL/dc_t||) over t on a log axis, for the latest probe of one layer;
    the curves labelled in ``dashed`` (cell states) are drawn dashed."""
    figure = Figure(figsize=(5.0, 3.2), dpi=80)
    axes = figure.add_subplot()
    for label, values in norms.items():
        data = values.detach().double().cpu().numpy()
        linestyle = "--" if label in dashed else "-"
        axes.plot(np.arange(len(data)), np.where(data > 0, data, np.nan), label=label, linestyle=linestyle)
    axes.set_yscale("log")
    axes.set_xlabel("timestep t (input position)")
    axes.set_ylabel("||dL/dh_t||")
    axes.set_title(f"{title} at step {step}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure_to_array(figure)


def heatmap_grid(rows: Sequence[np.ndarray], timesteps: Sequence[int] = ()) -> tuple[np.ndarray, int]:
    """The heatmap's cells, log10 of the norms (NaN where a norm is 0 or missing), one row per
    probe, and the timesteps per column. ``timesteps``: each row's probe length T when its columns
    are bins (:func:`~lightning_gradhealth.output.heatmap_bin_width`), empty when every column is
    one timestep. The grid takes the coarsest row's bins; a finer row is re-binned to them by the
    largest norm (exact: the widths are powers of two, and a max of maxima is the max).

    Examples:
        >>> grid, width = heatmap_grid([np.array([1.0, 10.0, 100.0, 0.1]), np.array([1000.0, 0.0])], timesteps=(4, 4))
        >>> grid.tolist(), width
        ([[1.0, 2.0], [3.0, nan]], 2)
    """
    lengths = list(timesteps) or [len(row) for row in rows]
    widths = [heatmap_bin_width(length, len(row)) for length, row in zip(lengths, rows)]
    width = max(widths)
    grid = np.full((len(rows), -(-max(lengths) // width)), np.nan)
    for index, (row, row_width) in enumerate(zip(rows, widths)):
        binned = bin_max(row, width // row_width).astype(np.float64)
        with np.errstate(divide="ignore"):
            grid[index, : len(binned)] = np.where(binned > 0, np.log10(np.maximum(binned, 1e-300)), np.nan)
    return grid, width


def timestep_heatmap_image(
    steps: Sequence[int], rows: Sequence[np.ndarray], title: str, timesteps: Sequence[int] = ()
) -> np.ndarray:
    """log10 ||dL/dh_t|| over (training step, timestep): one row per probe, padded with NaN; with
    bins of timesteps (``timesteps``, see :func:`heatmap_grid`) each cell is the largest norm of
    its bin, and the axis says so."""
    grid, width = heatmap_grid(rows, timesteps)
    figure = Figure(figsize=(5.0, 3.2), dpi=80)
    axes = figure.add_subplot()
    mesh = axes.imshow(
        grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
        extent=(-0.5, grid.shape[1] * width - 0.5, -0.5, len(rows) - 0.5),
    )
    ticks = np.linspace(0, len(rows) - 1, num=min(len(rows), 6)).round().astype(int)
    axes.set_yticks(ticks, [str(steps[i]) for i in ticks])
    axes.set_xlabel("timestep t" if width == 1 else f"timestep t (bins of {width}: the largest norm in each)")
    axes.set_ylabel("training step")
    norm = "||dL/dh_t||" if width == 1 else f"max ||dL/dh_t|| per {width} timesteps"
    axes.set_title(f"{title}: log10 {norm}", fontsize=9)
    figure.colorbar(mesh, ax=axes)
    figure.tight_layout()
    return figure_to_array(figure)


def eigenvalue_image(
    eigenvalues: Tensor,
    gate_names: Sequence[str] = (),
    title: str = "",
    panel_inches: float = 2.4,
    dpi: int = 80,
) -> np.ndarray:
    """The eigenvalues of each gate block on the complex plane, with the unit circle, as an RGB image.

    One panel per gate block (in a row for up to 3 blocks, else 2 per row, so an LSTM's 4 stay
    legible at TensorBoard's card size), titled with its name and spectral radius; a block whose
    eigenvalues are not finite shows "non-finite". Drawn on a bare ``matplotlib.figure.Figure``
    with the Agg canvas: no pyplot, no window, no change to the user's backend, nothing left
    registered once the array is returned.

    Args:
        eigenvalues: ``[G, n]`` complex, e.g. :attr:`~lightning_gradhealth.spectra.MatrixSpectrum.eigenvalues`;
            any device.
        gate_names: one name per block (PyTorch's ``i, f, g, o``...); default ``block 0``, ...
        title: a line above the panels, e.g. the layer key.
        panel_inches: width and height of one panel.
        dpi: pixels per inch.

    Returns:
        ``uint8`` array of shape ``(height, width, 3)`` (HWC), for TensorBoard's
        ``add_image(tag, image, step, dataformats="HWC")``.

    Examples:
        >>> import torch
        >>> from lightning_gradhealth.spectra import full_spectrum
        >>> image = eigenvalue_image(full_spectrum(torch.randn(8, 4), gates=2).eigenvalues, ("r", "z"))
        >>> image.dtype, image.shape
        (dtype('uint8'), (216, 384, 3))
    """
    values = eigenvalues.detach().cpu().numpy().astype(np.complex128)
    names = list(gate_names) or [f"block {k}" for k in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"got {len(names)} gate names for {len(values)} gate blocks")
    columns = len(values) if len(values) <= 3 else 2
    rows = -(-len(values) // columns)
    width, height = panel_inches * columns, panel_inches * rows + 0.3
    figure = Figure(figsize=(width, height), dpi=dpi)
    # fixed margins (inches): tight_layout would double the drawing time
    margins = {"left": 0.3 / width, "right": 1 - 0.1 / width, "bottom": 0.25 / height, "top": 1 - 0.5 / height}
    circle = np.exp(1j * np.linspace(0.0, 2.0 * np.pi, 256))
    panels = figure.subplots(rows, columns, squeeze=False, gridspec_kw={**margins, "wspace": 0.2, "hspace": 0.35}).ravel()
    for axes in panels[len(values) :]:
        axes.set_visible(False)
    for axes, name, block_values in zip(panels, names, values):
        axes.plot(circle.real, circle.imag, color="0.6", linewidth=0.8)
        if np.isfinite(block_values).all():
            radius = float(np.abs(block_values).max())
            axes.scatter(block_values.real, block_values.imag, s=4, color="tab:blue", linewidths=0)
            axes.set_title(f"{name}   radius {radius:.3f}", fontsize=8)
        else:
            radius = 0.0
            axes.text(0.0, 0.0, "non-finite", ha="center", va="center", color="tab:red", fontsize=9)
            axes.set_title(name, fontsize=8)
        limit = max(1.1, 1.05 * radius)
        axes.set_xlim(-limit, limit)
        axes.set_ylim(-limit, limit)
        axes.set_aspect("equal")
        axes.set_xticks([-1.0, 0.0, 1.0])
        axes.set_yticks([-1.0, 0.0, 1.0])
        axes.tick_params(labelsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure_to_array(figure)
