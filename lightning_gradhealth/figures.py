"""Pictures for TensorBoard, drawn with matplotlib's Agg backend into ``(H, W, 3)`` uint8 arrays.

Examples:
    >>> import torch
    >>> image = timestep_curve_image({"rnn.l0": torch.tensor([1e-3, 1e-2, 1.0])}, "rnn.l0", step=50)
    >>> image.shape[2], image.dtype
    (3, dtype('uint8'))
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["figure_to_array", "timestep_curve_image", "timestep_heatmap_image"]


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render a matplotlib figure (without pyplot, so no global state and no leak) to RGB uint8."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def timestep_curve_image(norms: Mapping[str, Tensor], title: str, step: int) -> np.ndarray:
    """||dL/dh_t|| (and ||dL/dc_t||) over t on a log axis, for the latest probe of one layer."""
    figure = Figure(figsize=(5.0, 3.2), dpi=80)
    axes = figure.add_subplot()
    for label, values in norms.items():
        data = values.detach().double().cpu().numpy()
        linestyle = "--" if label.endswith(".cell") else "-"
        axes.plot(np.arange(len(data)), np.where(data > 0, data, np.nan), label=label, linestyle=linestyle)
    axes.set_yscale("log")
    axes.set_xlabel("timestep t (input position)")
    axes.set_ylabel("||dL/dh_t||")
    axes.set_title(f"{title} at step {step}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure_to_array(figure)


def timestep_heatmap_image(steps: Sequence[int], rows: Sequence[np.ndarray], title: str) -> np.ndarray:
    """log10 ||dL/dh_t|| over (training step, timestep): one row per probe, padded with NaN."""
    width = max(len(row) for row in rows)
    grid = np.full((len(rows), width), np.nan)
    for index, row in enumerate(rows):
        with np.errstate(divide="ignore"):
            grid[index, : len(row)] = np.where(row > 0, np.log10(np.maximum(row, 1e-300)), np.nan)
    figure = Figure(figsize=(5.0, 3.2), dpi=80)
    axes = figure.add_subplot()
    mesh = axes.imshow(
        grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
        extent=(-0.5, width - 0.5, -0.5, len(rows) - 0.5),
    )
    ticks = np.linspace(0, len(rows) - 1, num=min(len(rows), 6)).round().astype(int)
    axes.set_yticks(ticks, [str(steps[i]) for i in ticks])
    axes.set_xlabel("timestep t")
    axes.set_ylabel("training step")
    axes.set_title(f"{title}: log10 ||dL/dh_t||", fontsize=9)
    figure.colorbar(mesh, ax=axes)
    figure.tight_layout()
    return figure_to_array(figure)
