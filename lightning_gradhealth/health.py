r"""Summaries of per-timestep gradient norms, and the verdicts drawn from them.

Given the norms :math:`g_t = \|\partial L/\partial h_t\|` of one layer for t = 0..T-1:

- ``transmission`` :math:`= \log_{10}(g_0 / g_{T-1})`: how many orders of magnitude the gradient
  gains (> 0) or loses (< 0) on its way from the last step back to the first. With the loss on
  the last step only this is the classic vanishing/exploding measure. When the loss is spread
  over all steps every :math:`g_t` also holds that step's own direct gradient, which keeps the
  curve flatter than the recurrent path alone: read it together with ``horizon``.
- ``rate_per_step``: the factor by which the gradient norm changes per step back in time, from
  a least-squares fit of :math:`\log_{10} g_t` against the number of steps back,
  :math:`T - 1 - t`. Below 1 it vanishes geometrically, above 1 it explodes.
- ``horizon``: how many timesteps, counting back from the last one, keep the gradient within a
  factor ``horizon_factor`` (default 1000) of :math:`g_{T-1}` before it first falls below
  :math:`g_{T-1} / \mathrm{horizon\_factor}`; ``T`` when it never falls that far (the whole
  sequence receives signal).

"First" and "last" are in the layer's own processing order: for the backward direction of a
bidirectional layer (keys ending in ``_reverse``) the first step is input position T-1, so its
norms are read from the end (``reverse=True``).

Examples:
    >>> import torch
    >>> summary = summarize_timesteps(torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64))
    >>> summary.transmission, round(summary.rate_per_step, 6), summary.horizon
    (-4.0, 0.1, 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TimestepSummary", "diagnose_timesteps", "summarize_timesteps"]


@dataclass(frozen=True)
class TimestepSummary:
    """Scalars that describe one layer's gradient norms over time (definitions in the module docs)."""

    steps: int
    first_norm: float
    last_norm: float
    transmission: float
    rate_per_step: float
    horizon: int
    finite: bool


def summarize_timesteps(norms: Tensor, horizon_factor: float = 1e3, reverse: bool = False) -> TimestepSummary:
    """Summarize the ``(T,)`` norms of one layer; see the module docs for the definitions.

    Non-finite norms give ``finite=False`` and NaN summaries; zero norms (steps the loss does not
    reach) are left out of the fit. ``reverse=True`` reads the norms from the end, for the
    backward direction of a bidirectional layer.
    """
    values = norms.detach().double().cpu()
    if reverse:
        values = values.flip(0)
    steps = values.numel()
    first, last = float(values[0]), float(values[-1])
    finite = bool(torch.isfinite(values).all())
    if not finite or steps == 0:
        return TimestepSummary(steps, first, last, math.nan, math.nan, 0, False)
    with_signal = values > 0
    # a zero last norm means the loss never reaches the layer: nothing to compare against
    transmission = math.log10(first / last) if first > 0 and last > 0 else (-math.inf if last > 0 else math.nan)
    steps_back = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    rate = math.nan
    if int(with_signal.sum()) >= 2:
        x, y = steps_back[with_signal], values[with_signal].log10()
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        rate = 10.0**slope
    horizon = steps
    if last > 0:
        fallen = (values < last / horizon_factor).nonzero()
        if fallen.numel():
            horizon = steps - 1 - int(fallen[-1])
    else:
        horizon = 0
    return TimestepSummary(steps, first, last, transmission, rate, horizon, True)


def diagnose_timesteps(
    summary: TimestepSummary, vanish_below: float = 1e-3, explode_above: float = 1e3
) -> Optional[str]:
    """``"nonfinite"``, ``"vanishing"``, ``"exploding"`` or ``None`` (healthy) for one summary.

    Vanishing: the gradient at the first step is below ``vanish_below`` times the gradient at
    the last step (transmission < log10(vanish_below)); exploding: above ``explode_above`` times.

    Examples:
        >>> diagnose_timesteps(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])))
        'vanishing'
    """
    if not summary.finite:
        return "nonfinite"
    if summary.transmission < math.log10(vanish_below):
        return "vanishing"
    if summary.transmission > math.log10(explode_above):
        return "exploding"
    return None
