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

from lightning_gradhealth.defaults import EXPLODE_ABOVE, HORIZON_FACTOR, SATURATED_TANH, SATURATING_ABOVE, VANISH_BELOW

__all__ = [
    "VERDICTS",
    "HealthReport",
    "LayerHealth",
    "SpectrumSummary",
    "TimestepSummary",
    "diagnose_timesteps",
    "layer_verdict",
    "summarize_timesteps",
]


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


def summarize_timesteps(norms: Tensor, horizon_factor: float = HORIZON_FACTOR, reverse: bool = False) -> TimestepSummary:
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
    summary: TimestepSummary, vanish_below: float = VANISH_BELOW, explode_above: float = EXPLODE_ABOVE
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


VERDICTS = ("healthy", "vanishing", "exploding", "saturating", "unmeasured")


@dataclass(frozen=True)
class SpectrumSummary:
    """The spectrum of one hidden-to-hidden matrix at one step, reduced over its gate blocks.

    Attributes:
        step: the optimizer step the weights are from.
        spectral_radius: the largest :math:`|\\lambda|` of any gate block (NaN for non-square blocks).
        sigma_min: the smallest singular value of any gate block.
        sigma_max: the largest singular value of any gate block.
    """

    step: int
    spectral_radius: float
    sigma_min: float
    sigma_max: float


@dataclass(frozen=True)
class LayerHealth:
    """One row of the end-of-fit report: a recurrent layer (one direction) and its verdict.

    Attributes:
        layer: the layer key, e.g. ``"encoder.rnn.l1_reverse"``.
        init: what init wrote to its hidden-to-hidden matrix (``None``: left as it was).
        spectrum_start: its spectrum at the first full pass of the run (right after init).
        spectrum_end: its spectrum at the end of fit.
        timesteps: the latest summary of ||dL/dh_t|| (``None``: never measured).
        saturation: the latest fraction of saturated tanh candidate units (``None``: not
            measured, e.g. a cell loop or a ReLU RNN).
        verdict: one of :data:`VERDICTS`.
        reason: the verdict's evidence, in numbers.
    """

    layer: str
    init: Optional[str]
    spectrum_start: Optional[SpectrumSummary]
    spectrum_end: Optional[SpectrumSummary]
    timesteps: Optional[TimestepSummary]
    saturation: Optional[float]
    verdict: str
    reason: str


def layer_verdict(
    summary: Optional[TimestepSummary],
    saturation: Optional[float] = None,
    vanish_below: float = VANISH_BELOW,
    explode_above: float = EXPLODE_ABOVE,
    saturating_above: float = SATURATING_ABOVE,
) -> tuple[str, str]:
    """The verdict on one layer and its reason in numbers: ``(verdict, reason)``.

    In order: NaN/Inf gradients through time are ``"exploding"``; a zero gradient at the last
    step (the loss does not reach the layer through time) is ``"unmeasured"``; then
    :func:`diagnose_timesteps`' ``"exploding"`` or ``"vanishing"``; then ``"saturating"`` when
    more than ``saturating_above`` of the tanh candidate units are saturated; else ``"healthy"``.

    Examples:
        >>> layer_verdict(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])))
        ('vanishing', '||dL/dh|| falls 10^-5.0 over 3 steps back (x0.0032 per step); horizon 2 of 3 steps')
        >>> layer_verdict(summarize_timesteps(torch.tensor([0.5, 1.0])), saturation=0.8)[0]
        'saturating'
    """
    if summary is None:
        return "unmeasured", "no gradient through time measured (timesteps=False, or no training step reached it)"
    if summary.finite and math.isnan(summary.transmission):
        return "unmeasured", (
            f"||dL/dh|| is 0 at the layer's last step: the loss does not reach it through time ({summary.steps} steps)"
        )
    saturated = "" if saturation is None else f"; {saturation:.0%} of tanh units saturated"
    condition = diagnose_timesteps(summary, vanish_below, explode_above)
    if condition == "nonfinite":
        return "exploding", f"||dL/dh_t|| is NaN/Inf over its {summary.steps} steps"
    trend = f"over {summary.steps} steps back (x{summary.rate_per_step:.2g} per step)"
    if condition == "exploding":
        return "exploding", f"||dL/dh|| grows 10^{summary.transmission:+.1f} {trend}{saturated}"
    if condition == "vanishing":
        return "vanishing", (
            f"||dL/dh|| falls 10^{summary.transmission:+.1f} {trend}; "
            f"horizon {summary.horizon} of {summary.steps} steps{saturated}"
        )
    if saturation is not None and saturation > saturating_above:
        return "saturating", (
            f"{saturation:.0%} of tanh candidate units at |tanh| > {SATURATED_TANH:g}, where the gradient through them "
            f"is < {1 - SATURATED_TANH**2:.2g}x"
        )
    return "healthy", (
        f"transmission 10^{summary.transmission:+.1f} {trend}, horizon {summary.horizon} of {summary.steps}{saturated}"
    )


@dataclass(frozen=True)
class HealthReport:
    """The end-of-fit health report: one :class:`LayerHealth` per recurrent layer and direction,
    and the run's gradient statistics.

    Attributes:
        step: the optimizer step at the end of fit.
        layers: the per-layer rows.
        clipped_fraction: the fraction of optimizer steps clipped (``None`` without clipping).
        nonfinite_steps: optimizer steps whose gradients held NaN/Inf.
        skipped_steps: those of them skipped (``on_nonfinite="skip"``).
        suggested_clip_val: a ``clip_val`` for ``clip="norm"`` from the norms seen, or ``None``.
        clipped_by: who clips, when it is not GradHealth (e.g. the Trainer, with its value);
            ``clipped_fraction`` is then that clipping's rate.
        caller_clipping: ``(clipped, checked)``: in manual optimization, of the ``checked``
            logging steps, those on which the training step's own clipping (``self.clip_gradients``)
            lowered the gradient norm between the backward pass and the optimizer step; ``None``
            when it never did.
        optimizer_steps: the optimizer steps taken, when there can be several per ``step``
            (manual optimization: truncated BPTT, several optimizers).
    """

    step: int
    layers: tuple[LayerHealth, ...]
    clipped_fraction: Optional[float]
    nonfinite_steps: int
    skipped_steps: int
    suggested_clip_val: Optional[float]
    clipped_by: Optional[str] = None
    caller_clipping: Optional[tuple[int, int]] = None
    optimizer_steps: Optional[int] = None

    @property
    def healthy(self) -> bool:
        """Whether every measured layer is healthy and no step had NaN/Inf gradients."""
        return self.nonfinite_steps == 0 and all(layer.verdict in ("healthy", "unmeasured") for layer in self.layers)

    def rows(self) -> list[dict[str, str]]:
        """The table's cells, one dict per layer (column name -> text)."""
        return [
            {
                "layer": layer.layer,
                "init": layer.init or "-",
                "radius start>end": f"{_radius(layer.spectrum_start)} > {_radius(layer.spectrum_end)}",
                "sigma start": _sigma_range(layer.spectrum_start),
                "sigma end": _sigma_range(layer.spectrum_end),
                "transmission": "-" if layer.timesteps is None else f"{layer.timesteps.transmission:+.2f}",
                "horizon": "-" if layer.timesteps is None else f"{layer.timesteps.horizon}/{layer.timesteps.steps}",
                "verdict": layer.verdict,
            }
            for layer in self.layers
        ]

    def _title(self) -> str:
        counted = "" if self.optimizer_steps in (None, self.step) else f" ({self.optimizer_steps} optimizer steps)"
        return f"GradHealth health report at step {self.step}{counted}: {'healthy' if self.healthy else 'needs attention'}"

    def _footer(self) -> list[str]:
        clipped = "off" if self.clipped_fraction is None else f"{self.clipped_fraction:.1%} of steps"
        if self.clipped_by is not None and self.clipped_fraction is not None:
            clipped = f"by {self.clipped_by}, on {clipped}"
        if self.caller_clipping is not None:
            by_caller = (
                f"by the training step on {self.caller_clipping[0]} of {self.caller_clipping[1]} sampled steps (the "
                "gradient norm fell between the backward pass and the optimizer step; the logged total is the norm before)"
            )
            clipped = by_caller if self.clipped_fraction is None else f"{clipped}, after {by_caller}"
        suggestion = "" if self.suggested_clip_val is None else f"; suggested clip_val {self.suggested_clip_val:.3g}"
        nonfinite = f"{self.nonfinite_steps} steps" + (f" ({self.skipped_steps} skipped)" if self.skipped_steps else "")
        return [f"clipping: {clipped}{suggestion}; non-finite gradients: {nonfinite}"]

    def format(self) -> str:
        """The report as a plain-text table with each verdict's reason below it."""
        rows = self.rows()
        lines = [self._title()]
        if rows:
            widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in rows[0]}
            lines.append("  ".join(column.ljust(width) for column, width in widths.items()).rstrip())
            lines.extend("  ".join(row[column].ljust(width) for column, width in widths.items()).rstrip() for row in rows)
            lines.extend(f"  {layer.layer}: {layer.verdict}: {layer.reason}" for layer in self.layers)
        else:
            lines.append("no recurrent layer found")
        return "\n".join(lines + self._footer())

    def markdown(self) -> str:
        """The report as Markdown, for TensorBoard's text dashboard."""
        rows = self.rows()
        lines = [f"**{self._title()}**", ""]
        if rows:
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
            lines += [""] + [f"- `{layer.layer}`: **{layer.verdict}**: {layer.reason}" for layer in self.layers]
        return "\n".join(lines + [""] + self._footer())


def _radius(spectrum: Optional[SpectrumSummary]) -> str:
    return "-" if spectrum is None else f"{spectrum.spectral_radius:.3g}"


def _sigma_range(spectrum: Optional[SpectrumSummary]) -> str:
    return "-" if spectrum is None else f"{spectrum.sigma_min:.3g}..{spectrum.sigma_max:.3g}"
