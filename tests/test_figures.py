"""The pictures, the Custom Scalars layout and the order of the tags, as a user sees them.

Pictures are real matplotlib figures (Agg); their pixels are read at the data coordinates of
a cell or a point. The layout and the tags come from real fits with a TensorBoardLogger, read
back with TensorBoard's own EventAccumulator. Tag order is TensorBoard's: a port of the
comparator its Scalars and Time Series pages sort tags with (``compareTagNames``, in
``tensorboard/webapp/util/string.ts`` and ``vz_sorting``; bundled in tensorboard's
``webfiles.zip``): numbers compare as numbers, and digits and ``/`` come before any other
character.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import pytorch_lightning
import torch
from matplotlib import colormaps, pyplot
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import metadata
from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth, tags
from lightning_gradhealth.figures import (
    DECADES_RANGE,
    GATE_COLOURS,
    NONFINITE_COLOUR,
    UNIT_CIRCLE_COLOUR,
    ZERO_COLOUR,
    eigenvalue_figure,
    eigenvalue_image,
    relative_decades,
    timestep_curve_figure,
    timestep_heatmap_figure,
)
from lightning_gradhealth.inits import orthogonal_
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.spectra import full_spectrum
from lightning_gradhealth.tensorboard import custom_scalars_layout

# -- helpers -------------------------------------------------------------------------------------


def _pixel(figure: Figure, axes, x: float, y: float) -> np.ndarray:
    """The RGB (0..255) the drawn figure shows at data point (x, y) of ``axes``."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    column, row = axes.transData.transform((x, y))
    return image[int(image.shape[0] - row), int(column)].astype(int)


def _rgb(colour) -> np.ndarray:
    return np.round(np.array(to_rgb(colour)) * 255).astype(int)


def _decade_rgb(decades: float) -> np.ndarray:
    """The colour of ``decades`` by the documented scale, computed here from its definition."""
    return np.round(np.array(colormaps["viridis"](Normalize(*DECADES_RANGE, clip=True)(decades))[:3]) * 255).astype(int)


def _heatmap_cell(figure: Figure, row: int, column: int) -> np.ndarray:
    return _pixel(figure, figure.axes[0], column, row)


def _legend_texts(figure: Figure) -> list[str]:
    legends = figure.legends + [axes.get_legend() for axes in figure.axes if axes.get_legend()]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


# -- the per-timestep pictures -------------------------------------------------------------------


def test_relative_decades_equal_log10_over_each_rows_last_present_step_and_name_the_rest():
    norms = np.array([[1e-3, 1e-2, 1.0, np.nan], [0.0, np.inf, 10.0, 100.0], [5.0, 1.0, 0.0, 0.0]])
    present = np.array([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    decades, cells = relative_decades(norms, present)
    np.testing.assert_allclose(decades[0, :3], [math.log10(1e-3), math.log10(1e-2), 0.0])
    assert decades[1, 2] == pytest.approx(-1.0) and decades[1, 3] == 0.0
    assert cells.tolist() == [[0, 0, 0, 1], [2, 3, 0, 0], [4, 4, 2, 2]]  # value, missing, zero, NaN/Inf, no reference
    assert np.isnan(decades[cells != 0]).all()
    reverse, _ = relative_decades(norms[:1, :3], present[:1, :3], reverse=True)  # a backward direction ends at t = 0
    np.testing.assert_allclose(reverse[0], [0.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="one shape"):
        relative_decades(norms, present[:, :2])


def test_heatmaps_of_two_runs_give_the_same_colour_to_the_same_decades_on_a_labelled_fixed_colour_bar():
    steps, t = [0, 10, 20], np.arange(20)
    quick = [1e-6 * 10.0 ** (-0.5 * (19 - t))] * 3  # -0.5 decades per step, tiny norms
    slow = [1e3 * 10.0 ** (-0.25 * (19 - t))] * 3  # -0.25 decades per step, large norms
    quick_figure = timestep_heatmap_figure(steps, quick, "quick")
    slow_figure = timestep_heatmap_figure(steps, slow, "slow")
    for figure in (quick_figure, slow_figure):
        heatmap, colour_bar = figure.axes
        assert colour_bar.get_ylim() == pytest.approx(DECADES_RANGE), "the colour scale is fixed, not the data's"
        assert "log10" in colour_bar.get_ylabel() and "same at T" in colour_bar.get_ylabel()
        assert not figure.legends, "nothing to explain: every cell holds a value"
    # -3.5 decades: t = 12 of the quick run and t = 5 of the slow one
    assert np.abs(_heatmap_cell(quick_figure, 1, 12) - _decade_rgb(-3.5)).max() <= 2
    assert np.abs(_heatmap_cell(slow_figure, 1, 5) - _decade_rgb(-3.5)).max() <= 2
    assert np.abs(_heatmap_cell(quick_figure, 1, 19) - _heatmap_cell(slow_figure, 1, 19)).max() <= 2  # both 0 decades
    assert np.abs(_heatmap_cell(quick_figure, 1, 0) - _decade_rgb(-9.5)).max() <= 2
    # beyond the range: the end colour (the colour bar's arrow)
    far = timestep_heatmap_figure([0], [10.0 ** (-2.0 * (19 - t))], "far")  # -38 decades at t = 0
    assert np.abs(_heatmap_cell(far, 0, 0) - _decade_rgb(DECADES_RANGE[0])).max() <= 2


def test_heatmap_cells_without_a_value_have_their_own_colours_named_in_a_legend():
    rows = [np.array([0.0, 1.0, np.nan, 1.0]), np.array([1.0, 1.0])]  # a zero, a NaN; a shorter probe
    figure = timestep_heatmap_figure([0, 1], rows, "rnn.l0")
    assert np.abs(_heatmap_cell(figure, 0, 0) - _rgb(ZERO_COLOUR)).max() <= 2
    assert np.abs(_heatmap_cell(figure, 0, 2) - _rgb(NONFINITE_COLOUR)).max() <= 2
    assert np.abs(_heatmap_cell(figure, 1, 3) - _rgb("white")).max() <= 2
    legend = " ".join(_legend_texts(figure))
    assert "norm 0" in legend and "NaN/Inf" in legend and "no such timestep" in legend


def test_the_curve_has_a_fixed_y_range_in_decades_and_marks_zero_norms():
    small = {"rnn.l0": torch.tensor([0.0, 1e-9, 1e-8, 1e-7])}
    large = {"rnn.l0": torch.tensor([1e2, 1e3, 1e4, 1e5], dtype=torch.float64)}
    limits = []
    for norms in (small, large):
        figure = timestep_curve_figure(norms, "rnn.l0", step=10)
        (axes,) = figure.axes
        limits.append(axes.get_ylim())
        assert "log10" in axes.get_ylabel()
        line = axes.get_lines()[0]
        assert line.get_ydata()[-1] == 0.0, "the last step is the reference"
    assert limits[0] == limits[1] and limits[0][0] < DECADES_RANGE[0] and limits[0][1] > DECADES_RANGE[1]
    figure = timestep_curve_figure(small, "rnn.l0", step=10)
    assert any("norm 0" in text for text in _legend_texts(figure))
    assert any("at T: 1e-07" in text for text in _legend_texts(figure)), "the legend gives the absolute scale"


# -- the eigenvalue picture ----------------------------------------------------------------------


def test_eigenvalue_picture_is_one_panel_whatever_the_gates_with_a_legend_per_gate():
    open_figures = pyplot.get_fignums()
    weight = orthogonal_(torch.empty(4 * 16, 16), gates=4, generator=torch.Generator().manual_seed(7))
    weight[3 * 16, 0] = math.nan
    eigenvalues = full_spectrum(weight, gates=4).eigenvalues
    images = [eigenvalue_image(eigenvalues[:count], gate_names="ifgo"[:count], title="lstm.l0") for count in (1, 3, 4)]
    assert all(image.dtype == np.uint8 and image.shape[2] == 3 for image in images)
    assert images[0].shape[1] == images[2].shape[1] >= 300, "one panel, as wide for one gate as for four"
    figure = eigenvalue_figure(eigenvalues, ("i", "f", "g", "o"), "lstm.l0")
    assert len(figure.axes) == 1
    legend = _legend_texts(figure)
    assert "i: radius 1.000" in legend and "o: NaN/Inf, not drawn" in legend and any("unit circle" in text for text in legend)
    assert pyplot.get_fignums() == open_figures, "no figure left registered"
    with pytest.raises(ValueError, match="gate names"):
        eigenvalue_image(eigenvalues, gate_names=("r", "z", "n"))


def test_eigenvalues_on_the_unit_circle_are_drawn_over_it_and_gates_share_the_axes():
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i, on the circle
    figure = eigenvalue_figure(full_spectrum(torch.cat([torch.eye(2), rotation]), gates=2).eigenvalues, ("r", "z"))
    (axes,) = figure.axes
    circle, *_ = axes.get_lines()
    points = axes.collections
    assert circle.get_linewidth() < 1.0 and all(circle.get_zorder() < p.get_zorder() for p in points)
    first, second = _pixel(figure, axes, 1.0, 0.0), _pixel(figure, axes, 0.0, 1.0)
    for pixel, colour in ((first, GATE_COLOURS[0]), (second, GATE_COLOURS[1])):
        assert np.abs(pixel - _rgb(colour)).sum() < np.abs(pixel - _rgb(UNIT_CIRCLE_COLOUR)).sum(), "the point, not the circle"
    assert np.abs(first - second).sum() > 100, "the gates in distinct colours"


# -- the Custom Scalars layout -------------------------------------------------------------------


def _quantity(tag: str) -> str:
    """A logged tag without its gate or optimizer: what one chart is meant to show."""
    parts = tag.split("/")
    if parts[1] in ("grad_norm", "clip"):
        return "/".join((parts[0], parts[1], parts[-1]))
    return "/".join(parts[:3]) if len(parts) == 4 else tag


def test_the_layout_has_one_regex_per_chart_and_before_and_after_clipping_apart():
    layout = custom_scalars_layout([LayerKey("rnn", 0), LayerKey("rnn", 0, reverse=True)], clipping=True, lyapunov=True)
    logged = [
        tags.grad_norm_tag("total"), tags.grad_norm_tag("total_clipped"), tags.clip_tag("coefficient"),
        tags.clip_tag("clipped_steps_fraction"), tags.grad_norm_tag("total", "optimizer_1"),
        tags.grad_norm_tag("total_clipped", "optimizer_1"), tags.NONFINITE_STEPS, tags.NONFINITE_SKIPPED_STEPS,
    ]  # fmt: skip
    for key in (LayerKey("rnn", 0), LayerKey("rnn", 0, reverse=True)):
        logged += [tags.layer_tag(key, name) for name in (*tags.TIMESTEP_SCALARS, tags.LYAPUNOV_MAX, "saturation")]
        logged += [tags.gate_tag(key, gate, name) for gate in "ifgo" for name in tags.SPECTRUM_SCALARS]
    for category, charts in layout.items():
        for title, (kind, patterns) in charts.items():
            assert kind == "Multiline" and len(patterns) == 1, title
            matched = [tag for tag in logged if re.match(patterns[0], tag)]
            assert matched, (title, patterns)
            assert len({_quantity(tag) for tag in matched}) == 1, (title, matched)
    norms = layout["gradhealth gradient norms"]
    assert [re.match(norms["gradient norm before clipping"][1][0], tag) is not None for tag in logged[:2]] == [True, False]
    assert [re.match(norms["gradient norm after clipping"][1][0], tag) is not None for tag in logged[:2]] == [False, True]
    assert all("count" in title for title in norms if "NaN/Inf" in title)


def test_a_real_fit_writes_the_layout_and_every_chart_matches_one_logged_quantity(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(clip="norm", clip_val=1.0, log_every_n_steps=1, full_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=2, logger=logger)).fit(
        PLSequenceModel(build=lambda: nn.GRU(3, 6, batch_first=True), output_width=6)
    )
    events = tensorboard_events(logger.log_dir)
    scalar_tags = events.Tags()["scalars"]
    (tensor_event,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = Layout.FromString(tensor_event.tensor_proto.string_val[0])
    titles = []
    for category in layout.category:
        for chart in category.chart:
            titles.append(chart.title)
            (regex,) = chart.multiline.tag
            matched = [tag for tag in scalar_tags if re.match(regex, tag)]
            assert matched and len({_quantity(tag) for tag in matched}) == 1, (chart.title, matched)
    assert {"gradient norm before clipping", "gradient norm after clipping", "spectral radius per gate"} <= set(titles)


# -- the order of the tags -----------------------------------------------------------------------


def _number_end(text: str, start: int) -> int:
    """Where TensorBoard's comparator stops reading a number (digits, a fraction, an exponent)."""
    state, index = "natural", start
    while index < len(text):
        char = text[index]
        if state == "natural":
            if char == ".":
                state = "real"
            elif char in "eE":
                state = "sign"
            elif not char.isdigit():
                break
        elif state == "real":
            if char in "eE":
                state = "sign"
            elif not char.isdigit():
                break
        elif state == "sign":
            if not char.isdigit() and char not in "+-":
                break
            state = "exponent"
        elif not char.isdigit():
            break
        index += 1
    return index


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # JavaScript's Number("1e") is NaN, and NaN compares as neither side


def tensorboard_compare(a: str, b: str) -> int:
    """TensorBoard's ``compareTagNames``, character for character."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            start_a, start_b = i, j
            i, j = _number_end(a, i + 1), _number_end(b, j + 1)
            x, y = _number(a[start_a:i]), _number(b[start_b:j])
            if x < y:
                return -1
            if x > y:
                return 1
            continue
        special_a, special_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if special_a and not special_b:
            return -1
        if special_b and not special_a:
            return 1
        if not special_a and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def test_the_comparator_port_orders_as_tensorboard_does():
    ordered = ["a/z", "a_b", "ab", "rnn.l2/x", "rnn.l10/x"]  # "/" first, then by character; numbers as numbers
    assert sorted(reversed(ordered), key=functools.cmp_to_key(tensorboard_compare)) == ordered


def test_in_tensorboards_order_each_layers_tags_are_together_and_start_with_its_key_charts(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(clip="norm", clip_val=1.0, log_every_n_steps=1, full_every_n_steps=1, lyapunov_warmup=0)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=2, logger=logger)).fit(
        PLSequenceModel(build=lambda: nn.LSTM(3, 8, num_layers=2, batch_first=True))
    )
    ours = [tag for tag in tensorboard_events(logger.log_dir).Tags()["scalars"] if tag.startswith("gradhealth/")]
    ordered = sorted(ours, key=functools.cmp_to_key(tensorboard_compare))
    expected_first = [
        "1_transmission", "2_horizon", "3_lyapunov_max",
        *(f"4_spectral_radius/{gate}" for gate in "fgio"), *(f"5_sigma_max/{gate}" for gate in "fgio"),
    ]  # fmt: skip
    for layer in ("rnn.l0", "rnn.l1"):
        positions = [index for index, tag in enumerate(ordered) if tag.startswith(f"gradhealth/{layer}/")]
        assert positions == list(range(positions[0], positions[-1] + 1)), f"{layer}'s tags are not together"
        names = [ordered[index].removeprefix(f"gradhealth/{layer}/") for index in positions]
        assert names[: len(expected_first)] == expected_first, names
        plain = sorted(tag.removeprefix(f"gradhealth/{layer}/") for tag in ours if tag.startswith(f"gradhealth/{layer}/"))
        assert plain[: len(expected_first)] == expected_first, "a plain sort (other loggers) agrees"
    contract_words = ("sigma_max", "sigma_min", "spectral_radius", "orth_error", "transmission", "horizon")
    assert all(any(word in tag for tag in ours) for word in contract_words)
