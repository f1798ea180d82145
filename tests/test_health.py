"""Timestep summaries against numpy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradhealth.health import diagnose_timesteps, summarize_timesteps


def test_summary_matches_numpy_fit_and_hand_computed_horizon():
    generator = np.random.default_rng(0)
    norms = 10.0 ** (-0.3 * np.arange(40)[::-1] + generator.normal(0, 0.05, 40))
    summary = summarize_timesteps(torch.tensor(norms))
    steps_back = np.arange(39, -1, -1)
    slope = np.polyfit(steps_back, np.log10(norms), 1)[0]
    assert summary.rate_per_step == pytest.approx(10**slope, rel=1e-9)
    assert summary.transmission == pytest.approx(math.log10(norms[0] / norms[-1]), rel=1e-12)
    below = np.nonzero(norms < norms[-1] / 1e3)[0]
    assert summary.horizon == 39 - below[-1]
    assert (summary.first_norm, summary.last_norm, summary.steps) == (norms[0], norms[-1], 40)


def test_flat_norms_have_full_horizon_and_unit_rate():
    summary = summarize_timesteps(torch.full((25,), 0.5))
    assert (summary.transmission, summary.horizon) == (0.0, 25)
    assert summary.rate_per_step == pytest.approx(1.0)
    assert diagnose_timesteps(summary) is None


def test_reverse_direction_is_read_from_the_end():
    norms = torch.tensor([1.0, 0.1, 0.01, 0.001, 0.0001], dtype=torch.float64)
    forward, backward = summarize_timesteps(norms), summarize_timesteps(norms, reverse=True)
    assert forward.transmission == pytest.approx(4.0) and diagnose_timesteps(forward) == "exploding"
    assert backward.transmission == pytest.approx(-4.0) and diagnose_timesteps(backward) == "vanishing"


def test_nonfinite_and_unreached_layers():
    nonfinite = summarize_timesteps(torch.tensor([1.0, float("nan"), 1.0]))
    assert not nonfinite.finite and diagnose_timesteps(nonfinite) == "nonfinite"
    unreached = summarize_timesteps(torch.zeros(4))
    assert math.isnan(unreached.transmission) and unreached.horizon == 0
    assert diagnose_timesteps(unreached) is None


def test_thresholds_are_configurable():
    summary = summarize_timesteps(torch.tensor([0.05, 1.0]))
    assert diagnose_timesteps(summary) is None
    assert diagnose_timesteps(summary, vanish_below=0.1) == "vanishing"
