r"""Summaries of per-timestep gradient norms, and the verdicts drawn from them.

Given the norms :math:`g_t = \|\partial L/\partial h_t\|` of one layer for t = 0..T-1:

- ``transmission`` :math:`= \log_{10}(g_0 / g_{T-1})`: how many orders of magnitude the gradient
  gains (> 0) or loses (< 0) on its way from the last step back to the first. With the loss on
  the last step only this is the classic vanishing/exploding measure. When the loss is spread
  over all steps every :math:`g_t` also holds that step's own direct gradient, which keeps the
  curve flatter than the recurrent path alone: read it together with ``horizon``.
- ``rate_per_step``: the factor by which the gradient norm changes per step back in time, from
  a least-squares fit of :math:`\log_{10} g_t` against the number of steps back,
  :math:`T - 1 - t`, over the steps whose norm float resolves (see below). Below 1 it vanishes
  geometrically, above 1 it explodes. With fewer than two such steps (one step: ``T = 1``)
  there is no rate: NaN, never logged.
- ``horizon``: how many timesteps, counting back from the last one, keep the gradient within a
  factor ``horizon_factor`` (default 1000) of :math:`g_{T-1}` before it first falls below
  :math:`g_{T-1} / \mathrm{horizon\_factor}`; ``T`` when it never falls that far (the whole
  sequence receives signal).

"First" and "last" are in the layer's own processing order: for the backward direction of a
bidirectional layer (keys ending in ``_reverse``) the first step is input position T-1, so its
norms are read from the end (``reverse=True``).

Underflow. Float resolves a norm down to the smallest positive normal number of its dtype,
:math:`\epsilon_{\min}` = ``torch.finfo(dtype).tiny`` (float32 1.2e-38, float64 2.2e-308); below
it a value is subnormal (few significant bits) or 0. A long vanishing sequence (T = 5000, say)
drives :math:`g_t` there, and the norms keep what float computed: zeros. When the first steps'
norms are below :math:`\epsilon_{\min}` (``underflow_steps`` of them) while the last step's is
positive, the true :math:`g_0` is below about :math:`\epsilon_{\min}` too: the recursion rounds a
product to 0 only below the smallest subnormal number (:math:`2^{-23} \epsilon_{\min}` in float32,
:math:`2^{-52} \epsilon_{\min}` in float64), a margin that the sums over H units and the norm over
B x H entries do not use up while :math:`H \sqrt{B H} < 2^{23}`. So ``transmission`` is then the
bound :math:`\log_{10}(\epsilon_{\min} / g_{T-1})`: finite, the true value below it, and never
given as a measurement. The verdict is "vanishing", its reason saying "below", when the bound is
under the vanishing threshold (always, unless :math:`g_{T-1}` itself is within a factor
``1 / vanish_below`` of :math:`\epsilon_{\min}`: then nothing is decided, "unmeasured").

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
    "describe_rate",
    "diagnose_timesteps",
    "layer_verdict",
    "summarize_timesteps",
]


@dataclass(frozen=True)
class TimestepSummary:
    r"""Scalars that describe one layer's gradient norms over time (definitions in the module docs).

    Attributes:
        underflow_steps: how many of the layer's first steps have a norm below ``floor`` (while
            the last step's is positive): float did not resolve them, and ``transmission`` is
            then an upper bound, :math:`\log_{10}(\mathrm{floor} / g_{T-1})`, not a measurement.
        floor: the smallest positive normal number of the norms' dtype, ``torch.finfo(dtype).tiny``.
    """

    steps: int
    first_norm: float
    last_norm: float
    transmission: float
    rate_per_step: float
    horizon: int
    finite: bool
    underflow_steps: int = 0
    floor: float = torch.finfo(torch.float32).tiny

    @property
    def transmission_is_bound(self) -> bool:
        """Whether ``transmission`` is an upper bound (the first steps underflowed), not a measurement."""
        return self.underflow_steps > 0


def describe_rate(summary: TimestepSummary) -> str:
    """The rate per step back in words, e.g. ``"x0.1 per step"``; plainly none where there is none.

    Examples:
        >>> describe_rate(summarize_timesteps(torch.tensor([0.01, 0.1, 1.0])))
        'x0.1 per step'
        >>> describe_rate(summarize_timesteps(torch.tensor([1.0])))
        'one step: no rate'
    """
    if math.isfinite(summary.rate_per_step):
        return f"x{summary.rate_per_step:.2g} per step"
    if summary.steps == 1:
        return "one step: no rate"
    return "no rate: fewer than two steps with a norm float resolves"


def summarize_timesteps(norms: Tensor, horizon_factor: float = HORIZON_FACTOR, reverse: bool = False) -> TimestepSummary:
    """Summarize the ``(T,)`` norms of one layer; see the module docs for the definitions.

    Non-finite norms give ``finite=False`` and NaN summaries. A zero last norm (the loss does not
    reach the layer's last step) gives a NaN ``transmission``: nothing to compare against. Norms
    below the dtype's smallest normal number (zero: steps the loss does not reach, or where
    float underflowed) are left out of the rate's fit; leading ones make ``transmission`` a bound.
    ``reverse=True`` reads the norms from the end, for the backward direction of a bidirectional
    layer.

    Examples:
        >>> summary = summarize_timesteps(torch.tensor([0.0, 0.0, 1e-30, 1e-20, 1e-10, 1.0]))  # float32
        >>> summary.underflow_steps, round(summary.transmission, 2), f"{summary.rate_per_step:.2g}"
        (2, -37.93, '1e-10')
    """
    values = norms.detach().double().cpu()
    if reverse:
        values = values.flip(0)
    steps = values.numel()
    floor = torch.finfo(norms.dtype).tiny
    if steps == 0 or not bool(torch.isfinite(values).all()):
        first, last = (float(values[0]), float(values[-1])) if steps else (math.nan, math.nan)
        return TimestepSummary(steps, first, last, math.nan, math.nan, 0, False, floor=floor)
    first, last = float(values[0]), float(values[-1])
    resolved = values >= floor
    unresolved_first = int(resolved[:-1].cumsum(0).eq(0).sum()) if last > 0 else 0
    if last == 0:
        transmission = math.nan
    elif unresolved_first:
        transmission = math.log10(floor / last)
    else:
        transmission = math.log10(first / last)
    steps_back = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    rate = math.nan
    if int(resolved.sum()) >= 2:
        x, y = steps_back[resolved], values[resolved].log10()
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        rate = 10.0**slope
    horizon = steps
    if last > 0:
        fallen = (values < last / horizon_factor).nonzero()
        if fallen.numel():
            horizon = steps - 1 - int(fallen[-1])
    else:
        horizon = 0
    return TimestepSummary(steps, first, last, transmission, rate, horizon, True, unresolved_first, floor)


def diagnose_timesteps(
    summary: TimestepSummary, vanish_below: float = VANISH_BELOW, explode_above: float = EXPLODE_ABOVE
) -> Optional[str]:
    """``"nonfinite"``, ``"vanishing"``, ``"exploding"`` or ``None`` (healthy) for one summary.

    Vanishing: the gradient at the first step is below ``vanish_below`` times the gradient at
    the last step (transmission < log10(vanish_below)); exploding: above ``explode_above`` times.
    An underflowed first step (``transmission`` a bound) is vanishing when the bound is below
    the threshold, and never exploding.

    Examples:
        >>> diagnose_timesteps(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])))
        'vanishing'
    """
    if not summary.finite:
        return "nonfinite"
    if summary.transmission < math.log10(vanish_below):
        return "vanishing"
    if summary.transmission > math.log10(explode_above) and not summary.transmission_is_bound:
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

    @property
    def square(self) -> bool:
        """Whether the gate blocks are square, with eigenvalues. Reduced over the blocks, the
        spectral radius is NaN beside a finite ``sigma_max`` only for non-square blocks (an LSTM's
        ``weight_hh`` with ``proj_size``, ``(H, P)`` each): a finite square block always has one."""
        return not (math.isnan(self.spectral_radius) and math.isfinite(self.sigma_max))


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
        lyapunov_max: the latest largest Lyapunov exponent of the layer's dynamics, natural log
            per step (:mod:`~lightning_gradhealth.lyapunov`; ``None``: not computed).
    """

    layer: str
    init: Optional[str]
    spectrum_start: Optional[SpectrumSummary]
    spectrum_end: Optional[SpectrumSummary]
    timesteps: Optional[TimestepSummary]
    saturation: Optional[float]
    verdict: str
    reason: str
    lyapunov_max: Optional[float] = None


def layer_verdict(
    summary: Optional[TimestepSummary],
    saturation: Optional[float] = None,
    vanish_below: float = VANISH_BELOW,
    explode_above: float = EXPLODE_ABOVE,
    saturating_above: float = SATURATING_ABOVE,
    unmeasured_reason: Optional[str] = None,
) -> tuple[str, str]:
    """The verdict on one layer and its reason in numbers: ``(verdict, reason)``.

    In order: no summary is ``"unmeasured"`` (for ``unmeasured_reason``, when the probe gave one);
    NaN/Inf gradients through time are ``"exploding"``; a zero gradient at the last step (the loss
    does not reach the layer through time) is ``"unmeasured"``; then :func:`diagnose_timesteps`'
    ``"exploding"`` or ``"vanishing"`` (for an underflowed first step, "vanishing" below the
    bound, or ``"unmeasured"`` when the bound decides nothing); then ``"saturating"`` when more
    than ``saturating_above`` of the tanh candidate units are saturated; else ``"healthy"``.

    Examples:
        >>> layer_verdict(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])))
        ('vanishing', '||dL/dh|| falls 10^-5.0 over 3 steps back (x0.0032 per step); horizon 2 of 3 steps')
        >>> verdict, reason = layer_verdict(summarize_timesteps(torch.tensor([0.0, 1e-20, 1.0])))   # float32
        >>> verdict, reason.split(" (")[0]
        ('vanishing', '||dL/dh|| falls below 10^-37.9 over 3 steps back: it underflows below 1.2e-38')
        >>> layer_verdict(summarize_timesteps(torch.tensor([0.5, 1.0])), saturation=0.8)[0]
        'saturating'
    """
    if summary is None:
        if unmeasured_reason is not None:
            return "unmeasured", f"no gradient through time measured in the latest measured step: {unmeasured_reason}"
        return "unmeasured", "no gradient through time measured (timesteps=False, or no measured step ran it with gradient)"
    if summary.finite and math.isnan(summary.transmission):
        return "unmeasured", (
            f"||dL/dh|| is 0 at the layer's last step: the loss does not reach it through time ({summary.steps} steps)"
        )
    saturated = "" if saturation is None else f"; {saturation:.0%} of tanh units saturated"
    condition = diagnose_timesteps(summary, vanish_below, explode_above)
    if condition == "nonfinite":
        return "exploding", f"||dL/dh_t|| is NaN/Inf over its {summary.steps} steps"
    trend = f"over {summary.steps} steps back ({describe_rate(summary)})"
    if summary.steps == 1:
        trend = f"over one step ({describe_rate(summary)})"
    underflow = f"it underflows below {summary.floor:.2g} (the smallest normal float) at the layer's first " + (
        "step" if summary.underflow_steps == 1 else f"{summary.underflow_steps} steps"
    )
    if condition == "exploding":
        return "exploding", f"||dL/dh|| grows 10^{summary.transmission:+.1f} {trend}{saturated}"
    if condition == "vanishing" and summary.transmission_is_bound:
        return "vanishing", (
            f"||dL/dh|| falls below 10^{summary.transmission:+.1f} over {summary.steps} steps back: {underflow} "
            f"({describe_rate(summary)}); horizon {summary.horizon} of {summary.steps} steps{saturated}"
        )
    if condition == "vanishing":
        return "vanishing", (
            f"||dL/dh|| falls 10^{summary.transmission:+.1f} {trend}; "
            f"horizon {summary.horizon} of {summary.steps} steps{saturated}"
        )
    if summary.transmission_is_bound:
        return "unmeasured", (
            f"||dL/dh|| is only {summary.last_norm:.3g} at the layer's last step and {underflow}: the bound on its transmission, "
            f"10^{summary.transmission:+.1f}, decides nothing"
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
        """The table's cells, one dict per layer (column name -> text); the Lyapunov column when
        some layer has an exponent."""
        lyapunov = any(layer.lyapunov_max is not None for layer in self.layers)
        return [
            {
                "layer": layer.layer,
                "init": layer.init or "-",
                "radius start>end": _radius_range(layer.spectrum_start, layer.spectrum_end),
                "sigma start": _sigma_range(layer.spectrum_start),
                "sigma end": _sigma_range(layer.spectrum_end),
                "transmission": _transmission(layer.timesteps),
                "horizon": "-" if layer.timesteps is None else f"{layer.timesteps.horizon}/{layer.timesteps.steps}",
                **({"lambda_1 (1/|lambda_1|)": _lyapunov(layer.lyapunov_max)} if lyapunov else {}),
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


def _radius_range(start: Optional[SpectrumSummary], end: Optional[SpectrumSummary]) -> str:
    """``"start > end"``, or plainly no radius for non-square blocks."""
    if any(spectrum is not None and not spectrum.square for spectrum in (start, end)):
        return "n/a (non-square)"
    return f"{_radius(start)} > {_radius(end)}"


def _transmission(summary: Optional[TimestepSummary]) -> str:
    """``"+0.42"``; ``"<-37.90"`` for a bound (an underflowed first step); ``"-"`` for none."""
    if summary is None or math.isnan(summary.transmission):
        return "-"
    return f"{'<' if summary.transmission_is_bound else ''}{summary.transmission:+.2f}"


def _lyapunov(exponent: Optional[float]) -> str:
    """``"-0.052 (19)"``: the exponent per step and the horizon it implies, 1 / |exponent| steps."""
    if exponent is None:
        return "-"
    return f"{exponent:+.3f} ({horizon_text(exponent)})"


def horizon_text(exponent: float) -> str:
    """The horizon a Lyapunov exponent implies, 1 / |exponent| steps, rounded, as text.

    Examples:
        >>> horizon_text(-0.052), horizon_text(0.0), horizon_text(-1e-9)
        ('19', 'inf', '>1e6')
    """
    if not math.isfinite(exponent):
        return "0"
    if exponent == 0:
        return "inf"
    steps = 1 / abs(exponent)
    return ">1e6" if steps > 1e6 else f"{steps:.0f}"


def _sigma_range(spectrum: Optional[SpectrumSummary]) -> str:
    return "-" if spectrum is None else f"{spectrum.sigma_min:.3g}..{spectrum.sigma_max:.3g}"
