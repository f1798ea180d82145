"""The heatmap history (issue 13, item 5): rows spread evenly over the whole run at any length,
rows of at most ``HEATMAP_COLUMNS`` columns, a checkpoint of bounded size, a resume that keeps
what the uninterrupted run keeps, and checkpoints of the earlier layout still restored."""

from __future__ import annotations

import io
from typing import Any, Callable

import numpy as np
import pytest
import torch

from lightning_gradhealth.config import MonitorConfig
from lightning_gradhealth.defaults import HEATMAP_COLUMNS, HISTORY_SIZE
from lightning_gradhealth.figures import heatmap_grid
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.output import TimestepHeatmap, bin_max, heatmap_bin_width
from lightning_gradhealth.probe import ProbeResult
from lightning_gradhealth.trackers import Notices, TimestepTracker, thin_history

KEY = LayerKey("rnn", 0)


def _tracker(**kwargs: Any) -> TimestepTracker:
    return TimestepTracker(MonitorConfig(), Notices(lambda message: None), **kwargs)


def _norms(step: int, timesteps: int = 8) -> torch.Tensor:
    """Distinct positive norms for each step."""
    return torch.rand(timesteps, generator=torch.Generator().manual_seed(step)) + 0.1


def _update(tracker: TimestepTracker, step: int, norms: Callable[[int], torch.Tensor] = _norms) -> None:
    tracker.update(ProbeResult({KEY: norms(step)}, {}), step)


def _steps(tracker: TimestepTracker) -> list[int]:
    return [step for step, _ in tracker.history[KEY]]


def _assert_spread_evenly(steps: list[int], latest: int, size: int) -> None:
    """The first step, the latest, at most ``size`` rows, and no gap wider than twice the mean gap."""
    assert steps[0] == 0 and steps[-1] == latest and len(steps) <= size, (steps, latest)
    gaps = np.diff(steps)
    if len(gaps) > 1:
        assert gaps.max() <= 2 * gaps.mean(), (latest, steps)


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Through ``torch.save`` and ``torch.load``, as a checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same_history(a: TimestepTracker, b: TimestepTracker) -> bool:
    rows_a, rows_b = a.history[KEY], b.history[KEY]
    return len(rows_a) == len(rows_b) and all(sa == sb and np.array_equal(na, nb) for (sa, na), (sb, nb) in zip(rows_a, rows_b))


# the thinning rule, alone


def test_thin_history_keeps_the_multiples_of_a_doubling_stride_and_the_latest_row():
    for size in (2, 3, 4, 7, 16):
        for seen in range(1, 200):
            kept = thin_history(range(seen), size)
            stride = 1
            while len([i for i in range(seen) if i % stride == 0 or i == seen - 1]) > size:
                stride *= 2
            assert kept == [i for i in range(seen) if i % stride == 0 or i == seen - 1], (size, seen)


def test_thinning_as_rows_come_equals_thinning_once_at_the_end():
    """What is kept after n + 1 rows is a subset of what was kept after n, plus the new row: the
    history thinned row by row (and restored from a checkpoint mid-way) is the one thinned at once."""
    for size in (2, 5, 16):
        kept: list[int] = []
        for index in range(300):
            candidates = [*kept, index]
            kept = [candidates[i] for i in thin_history(candidates, size)]
            assert kept == thin_history(range(index + 1), size), (size, index)


def test_thin_history_needs_room_for_the_first_and_the_latest_row():
    assert thin_history([], 2) == []
    with pytest.raises(ValueError, match="at least 2"):
        thin_history(range(5), 1)


# the tracker


@pytest.mark.parametrize("size", [4, 16, HISTORY_SIZE])
def test_the_rows_kept_spread_evenly_over_runs_of_every_length(size: int):
    tracker = _tracker(history_size=size)
    for step in range(1200):
        _update(tracker, step)
        _assert_spread_evenly(_steps(tracker), step, size)


def test_a_100000_step_run_keeps_rows_spread_over_the_whole_run():
    """At the default interval of 50 steps: rows between step 0 and 51,200 too."""
    tracker = _tracker()
    for step in range(0, 100_000, 50):
        _update(tracker, step)
    steps = _steps(tracker)
    _assert_spread_evenly(steps, 99_950, HISTORY_SIZE)
    assert len(steps) > HISTORY_SIZE // 2
    assert max(np.diff(steps)) <= 400  # 2,000 probes at a stride of 8


def test_a_run_that_starts_at_another_step_is_spread_over_its_own_steps():
    tracker = _tracker(history_size=16)
    for step in range(7, 5_000, 7):
        _update(tracker, step)
        steps = _steps(tracker)
        assert steps[0] == 7 and steps[-1] == step and len(steps) <= 16
        gaps = np.diff(steps)
        assert len(gaps) < 2 or gaps.max() <= 2 * gaps.mean()


@pytest.mark.parametrize("stop", [1, 5, 16, 17, 31, 33, 100, 257])
def test_a_resumed_run_keeps_what_the_uninterrupted_run_keeps(stop: int):
    uninterrupted, first = _tracker(history_size=16, history_columns=4), _tracker(history_size=16, history_columns=4)
    norms = lambda step: _norms(step, timesteps=11)  # noqa: E731
    for step in range(300):
        _update(uninterrupted, 10 * step, norms)
        if step < stop:
            _update(first, 10 * step, norms)
    resumed = _tracker(history_size=16, history_columns=4)
    assert resumed.load_state_dict(_roundtrip(first.state_dict())) == ([], [])
    for step in range(stop, 300):
        _update(resumed, 10 * step, norms)
    assert _same_history(resumed, uninterrupted)
    assert torch.equal(  # and the state it saves again
        resumed.state_dict()["history"][0]["binned_norms"], uninterrupted.state_dict()["history"][0]["binned_norms"]
    )


def test_rows_keep_at_most_heatmap_columns_columns_each_the_largest_norm_of_its_bin():
    tracker = _tracker()
    norms = torch.full((5000,), 1e-3)
    norms[1234] = 1e4  # one timestep explodes
    norms[4999] = 2.0
    tracker.update(ProbeResult({KEY: norms}, {}), 0)
    (step, row), = tracker.history[KEY]
    width = heatmap_bin_width(5000)
    assert (step, width, len(row)) == (0, 32, 157) and len(row) <= HEATMAP_COLUMNS
    assert row[1234 // 32] == np.float32(1e4) and row[-1] == np.float32(2.0)
    np.testing.assert_array_equal(row, [norms[i : i + 32].max() for i in range(0, 5000, 32)])
    short = _tracker()
    short.update(ProbeResult({KEY: norms[:200]}, {}), 0)
    np.testing.assert_array_equal(short.history[KEY][0][1], norms[:200].numpy())  # short probes are kept whole


@pytest.mark.parametrize("timesteps, probes", [(512, HISTORY_SIZE), (5000, 10), (100_000, 10)])  # 256, 157, 196 columns
def test_the_checkpoint_is_bounded_whatever_the_sequence_length(timesteps: int, probes: int):
    """At most 4 * HEATMAP_COLUMNS bytes (1 KiB) and a few more per row per layer, at most
    HISTORY_SIZE rows (the run-length test above): where a row of a probe over 5000 timesteps took
    20 KB before."""
    tracker = _tracker()
    for step in range(0, probes * 50, 50):
        _update(tracker, 1_000_000 + step, lambda step: _norms(step, timesteps))
    rows = len(tracker.history[KEY])
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    assert rows == min(probes, HISTORY_SIZE)
    assert len(buffer.getvalue()) <= rows * (4 * HEATMAP_COLUMNS + 32) + 4096, (rows, len(buffer.getvalue()))


def test_a_new_run_drops_the_rows_from_its_start_step_on_and_goes_on_numbering():
    tracker = _tracker(history_size=8)
    for step in range(40):
        _update(tracker, step)
    tracker.start_run(20)
    assert _steps(tracker)[-1] < 20
    for step in range(20, 400):
        _update(tracker, step)
        steps = _steps(tracker)
        assert steps[0] == 0 and steps[-1] == step and len(steps) <= 8
    _assert_spread_evenly(_steps(tracker), 399, 8)
    tracker.start_run(0)
    assert _steps(tracker) == []
    assert tracker.load_state_dict(_roundtrip(tracker.state_dict())) == ([], []) and _steps(tracker) == []
    _update(tracker, 0)
    assert _steps(tracker) == [0]


# checkpoints of the earlier layout


def test_a_checkpoint_of_full_rows_kept_by_the_old_halving_is_restored_binned_and_thinned():
    """The earlier layout: ``steps`` and full ``norms`` rows, thinned by ``del history[-2::-2]``
    (after 3,000 probes at interval 50 it kept 0, 102400, ...). The rows are numbered from their
    steps, binned, thinned by the rule, and the run goes on evenly."""
    old_history: list[tuple[int, torch.Tensor]] = []
    for step in range(0, 3000 * 50, 50):
        old_history.append((step, _norms(step, timesteps=600)))
        if len(old_history) > HISTORY_SIZE:
            del old_history[-2::-2]
    assert old_history[1][0] == 102_400
    state = {"history": [{"key": KEY.to_dict(), "steps": [s for s, _ in old_history], "norms": [n for _, n in old_history]}]}
    tracker = _tracker()
    assert tracker.load_state_dict(_roundtrip(state)) == ([], [])
    restored = dict(tracker.history[KEY])
    assert set(restored) <= {s for s, _ in old_history} and 0 in restored and 149_950 in restored
    assert all(step % (16 * 50) == 0 for step in list(restored)[:-1])  # the stride of 3000 probes: 16
    width = heatmap_bin_width(600)
    for step, norms in old_history:
        if step in restored:
            np.testing.assert_array_equal(restored[step], bin_max(norms.numpy(), width))
    for step in range(150_000, 300_000, 50):
        _update(tracker, step, lambda step: _norms(step, timesteps=600))
    steps = _steps(tracker)
    assert steps[0] == 0 and steps[-1] == 299_950 and len(steps) <= HISTORY_SIZE
    later = np.diff([s for s in steps if s >= 150_000])
    assert later.max() <= 2 * later.mean()  # what follows the restore is even again
    assert max(np.diff(steps)) <= 102_400  # and the old gap is not widened


def test_a_checkpoint_written_with_more_columns_is_binned_again():
    wide = _tracker(history_columns=64)
    for step in range(10):
        _update(wide, step, lambda step: _norms(step, timesteps=100))
    narrow = _tracker(history_columns=16)
    assert narrow.load_state_dict(wide.state_dict()) == ([], [])
    for (step, wide_row), (narrow_step, narrow_row) in zip(wide.history[KEY], narrow.history[KEY]):
        assert step == narrow_step and (len(wide_row), len(narrow_row)) == (50, 13)
        np.testing.assert_array_equal(narrow_row, bin_max(wide_row, 4))


@pytest.mark.parametrize(
    "edit",
    [
        lambda entry: entry.update(indices=[0, 2, 1]),
        lambda entry: entry.update(timesteps=[100, 100, 3]),  # 13 columns cannot be 3 timesteps
        lambda entry: entry.update(columns=[7, 7]),
        lambda entry: entry.update(binned_norms=torch.ones(20)),
        lambda entry: entry.pop("indices"),
    ],
)
def test_a_malformed_history_is_dropped_whole(edit: Callable[[dict[str, Any]], Any]):
    tracker = _tracker(history_columns=16)
    for step in range(3):
        _update(tracker, step, lambda step: _norms(step, timesteps=100))
    state = tracker.state_dict()
    edit(state["history"][0])
    restored = _tracker(history_columns=16)
    assert restored.load_state_dict(state) == ([], ["history"]) and restored.history == {}


def test_unsorted_old_rows_are_dropped_whole():
    state = {"history": [{"key": KEY.to_dict(), "steps": [0, 5, 3], "norms": [torch.ones(4)] * 3}]}
    tracker = _tracker()
    assert tracker.load_state_dict(state) == ([], ["history"]) and tracker.history == {}


# the picture


def test_the_picture_draws_rows_of_other_lengths_on_one_grid_of_bins():
    tracker = _tracker(history_columns=8)
    for step, timesteps in enumerate((10, 40, 5, 40)):
        _update(tracker, step, lambda step: _norms(step, timesteps))
    picture = tracker.pictures(3).pictures["gradhealth/rnn.l0/timestep_heatmap"]
    assert isinstance(picture, TimestepHeatmap) and list(picture.timesteps) == [10, 40, 5, 40]
    grid, width = heatmap_grid(picture.rows, picture.timesteps)
    assert width == 8 and grid.shape == (4, 5)
    np.testing.assert_allclose(grid[0, :2], np.log10(bin_max(_norms(0, 10).numpy(), 8)))
    assert np.isnan(grid[0, 2:]).all() and np.isnan(grid[2, 1:]).all()
    image = picture.render()
    assert image.dtype == np.uint8 and image.shape[2] == 3
