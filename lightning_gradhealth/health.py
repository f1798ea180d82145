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

The layer or the loss. A transmission far below 0 has three causes, which call for different
responses: the layer cannot carry a gradient even a few steps (it is broken, whatever the task);
it carries one some steps, but not across the sequence (its memory is short: enough for a task
whose dependencies are shorter, not for one whose are longer); or the loss does not ask it to
(it reads the last steps only, or sends its gradient into directions the layer lets fade). No
gradient measurement tells which dependencies the task has: a loss on the last step of the
adding problem, whose target depends on the first steps, and a loss on the last 10 steps of a
forecaster that needs 10 steps of memory send the same gradient. What can be measured is the
layer's own memory. Its largest Lyapunov exponent :math:`\lambda_1`
(:mod:`~lightning_gradhealth.lyapunov`) measures the layer whatever the loss:
:math:`e^{\lambda_1 n}` is the most that the product of n of its state-to-state Jacobians keeps
of any perturbation, and the transposed product carries dL/dh back over the same steps with the
same singular values. From it:

- :func:`carried_decades`, :math:`\lambda_1 (T - 1) / \ln 10`: the best transmission the layer
  could give any gradient entering at the last step;
- :func:`memory_steps`, :math:`\ln(\mathrm{vanish\_below}) / \lambda_1`: over how many steps
  the layer keeps a gradient within ``vanish_below`` (1e-3 by default: 3 decades), its memory
  in the terms the transmission is judged in (:math:`1 / |\lambda_1|`, the steps per factor e,
  is the report's column).

The rule, for a gradient that vanishes (transmission below :math:`\log_{10}` ``vanish_below``):

- the layer carries it across the sequence (memory at least T - 1 steps): the loss asks for
  short memory only (:data:`RECENT_LOSS`). The verdict is "healthy", its reason saying so;
- the layer's memory is shorter than the sequence but at least :data:`MEMORY_STEPS` (10) steps:
  "short memory" (:data:`SHORT_MEMORY`), information, not a problem. The reason gives the memory
  and :math:`1 / |\lambda_1|`, says that it is enough for dependencies shorter than that, and
  what usually lengthens it, for a task that needs longer ones. A GRU or LSTM at PyTorch's
  default or orthogonal init on random inputs has :math:`\lambda_1` of -0.3 to -0.5 (memory 14
  to 21 steps: hidden 32, T = 60), a tanh RNN at PyTorch's default -0.55 (13 steps): a loss on
  their last 10 steps leaves a transmission of -5 to -12 decades, and nothing is wrong;
- the layer's memory is shorter than :data:`MEMORY_STEPS` steps (or than the sequence, when
  that is shorter): "vanishing". Losing the factor ``vanish_below`` within 10 steps means more
  than halving every gradient at every step (:math:`2^{10} = 1024`): the layer cannot relate
  even the steps of a short window, whatever the task. The reason gives the layer's own numbers
  (:math:`\lambda_1`, its memory, the saturation, and for a plain RNN the bound
  :math:`\sigma_{\max}` of its recurrent matrix puts on every step, tanh and ReLU having slopes
  of at most 1, so that :math:`\lambda_1 \le \ln \sigma_{\max}`). A tanh RNN with the small
  uniform init (:math:`\lambda_1 \approx -3.5`, :math:`\sigma_{\max} < 0.1` at init) or with
  60% of its units saturated (:math:`\lambda_1 \approx -1.9`) is vanishing.

A gradient that grows toward the first step (transmission above :math:`\log_{10}`
``explode_above``) while the layer contracts (:math:`\lambda_1 \le 0`) grows by the loss's doing,
whose gradient is larger at the early steps (:data:`EARLY_LOSS`): "healthy" too; with
:math:`\lambda_1 > 0`, "exploding". Without :math:`\lambda_1` (``lyapunov_k=0``, a custom cell)
the transmission decides alone, and the reason says that the cause was not told apart.

The exponent comes from the probe's sampled sequences and a fixed starting frame, which can only
underestimate the growth of the most persistent direction: the rule errs toward "vanishing",
never toward hiding a layer that forgets.

Examples:
    >>> import torch
    >>> summary = summarize_timesteps(torch.tensor([1e-4, 1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64))
    >>> summary.transmission, round(summary.rate_per_step, 6), summary.horizon
    (-4.0, 0.1, 4)
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from lightning_gradhealth.defaults import (
    EXPLODE_ABOVE,
    HORIZON_FACTOR,
    MEMORY_STEPS,
    SATURATED_TANH,
    SATURATING_ABOVE,
    VANISH_BELOW,
)

__all__ = [
    "EARLY_LOSS",
    "NEEDS_ATTENTION",
    "RECENT_LOSS",
    "REPORT_WIDTH",
    "SHORT_MEMORY",
    "VERDICTS",
    "HealthReport",
    "LayerHealth",
    "LayerKind",
    "SpectrumSummary",
    "TimestepSummary",
    "advice",
    "carried_decades",
    "describe_rate",
    "diagnose_timesteps",
    "layer_verdict",
    "memory_steps",
    "summarize_timesteps",
]

REPORT_WIDTH = 100
"""Advice paragraphs (in the report and the notices) are wrapped to this many characters a line."""

RECENT_LOSS = "recent_loss"
"""The condition of a layer whose gradient through time vanishes while the layer itself carries
it across the sequence (see the module docs): the loss asks for short memory only. Not a problem."""

SHORT_MEMORY = "short_memory"
"""The condition of a layer whose gradient through time vanishes and whose own memory
(:func:`memory_steps`) is shorter than the sequence but at least :data:`MEMORY_STEPS` steps:
enough for a task whose dependencies are shorter, not for one whose are longer. Information,
not a problem: the verdict "short memory"."""

EARLY_LOSS = "early_loss"
"""The condition of a layer whose gradient through time grows toward the first step while the
layer itself contracts: the loss's gradient is larger at the early steps. Not a problem."""


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


def carried_decades(lyapunov_max: float, steps: int) -> float:
    r"""The most the layer's dynamics keep of a gradient over ``steps`` timesteps, in decades:
    :math:`\lambda_1 (T - 1) / \ln 10`, from its largest Lyapunov exponent (natural log per step).

    0 means the layer's most persistent direction neither fades nor grows over the sequence;
    -14 means that every gradient entering at the last step is at least 1e14 times smaller at
    the first; -inf for :math:`\lambda_1 = -\infty` (a direction mapped to zero: nothing carried).

    Examples:
        >>> round(carried_decades(-0.33, 100), 2), round(carried_decades(-0.01, 100), 2)
        (-14.19, -0.43)
    """
    if steps <= 1:
        return 0.0
    return lyapunov_max * (steps - 1) / math.log(10)


def memory_steps(lyapunov_max: float, vanish_below: float = VANISH_BELOW) -> float:
    r"""The layer's memory: over how many steps its dynamics keep a gradient within ``vanish_below``,
    :math:`\ln(\mathrm{vanish\_below}) / \lambda_1` from its largest Lyapunov exponent (natural
    log per step); ``inf`` when :math:`\lambda_1 \ge 0` (nothing fades), 0 for
    :math:`\lambda_1 = -\infty` (a direction mapped to zero).

    Examples:
        >>> round(memory_steps(-0.33), 1), round(memory_steps(-3.5), 1), memory_steps(0.0)
        (20.9, 2.0, inf)
    """
    if lyapunov_max >= 0:
        return math.inf
    return math.log(vanish_below) / lyapunov_max


def diagnose_timesteps(
    summary: TimestepSummary,
    vanish_below: float = VANISH_BELOW,
    explode_above: float = EXPLODE_ABOVE,
    lyapunov_max: Optional[float] = None,
) -> Optional[str]:
    """``"nonfinite"``, ``"vanishing"``, ``"exploding"``, :data:`SHORT_MEMORY`, :data:`RECENT_LOSS`,
    :data:`EARLY_LOSS` or ``None`` (healthy) for one summary; the last four are not problems.

    Vanishing: the gradient at the first step is below ``vanish_below`` times the gradient at
    the last step (transmission < log10(vanish_below)); exploding: above ``explode_above`` times.
    An underflowed first step (``transmission`` a bound) is vanishing when the bound is below
    the threshold, and never exploding. With the layer's largest Lyapunov exponent
    ``lyapunov_max`` the cause is told apart (module docs): a vanishing gradient through a layer
    whose memory (:func:`memory_steps`) spans the sequence is :data:`RECENT_LOSS`, through one
    whose memory is shorter than the sequence but at least :data:`MEMORY_STEPS` steps
    :data:`SHORT_MEMORY`; a growing one through a layer that contracts (``lyapunov_max <= 0``)
    is :data:`EARLY_LOSS`.

    Examples:
        >>> summary = summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0]))
        >>> diagnose_timesteps(summary), diagnose_timesteps(summary, lyapunov_max=-0.01)
        ('vanishing', 'recent_loss')
        >>> diagnose_timesteps(summary, lyapunov_max=-3.5)
        'vanishing'
        >>> long = summarize_timesteps(torch.logspace(-7, 0, 60))   # T = 60: x0.76 per step
        >>> diagnose_timesteps(long, lyapunov_max=-0.33), diagnose_timesteps(long, lyapunov_max=-1.0)
        ('short_memory', 'vanishing')
    """
    if not summary.finite:
        return "nonfinite"
    known = lyapunov_max is not None and not math.isnan(lyapunov_max)
    if summary.transmission < math.log10(vanish_below):
        if not known:
            return "vanishing"
        memory = memory_steps(lyapunov_max, vanish_below)  # type: ignore[arg-type]
        if memory >= summary.steps - 1:
            return RECENT_LOSS
        return SHORT_MEMORY if memory >= MEMORY_STEPS else "vanishing"
    if summary.transmission > math.log10(explode_above) and not summary.transmission_is_bound:
        return EARLY_LOSS if known and lyapunov_max <= 0 else "exploding"  # type: ignore[operator]
    return None


VERDICTS = ("healthy", "short memory", "vanishing", "exploding", "saturating", "unmeasured")
"""Every verdict a layer can get; those in :data:`NEEDS_ATTENTION` are problems of the layer."""

NEEDS_ATTENTION = ("vanishing", "exploding", "saturating")
"""The verdicts that make the report say "needs attention": the layer's own measures show a
problem. "short memory" is information (module docs); "unmeasured" says what was not measured."""


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
        advice: for a vanishing or exploding layer, what usually helps it (:func:`advice`), one
            sentence; ``None`` otherwise (a "short memory" reason ends with what would lengthen it).
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
    advice: Optional[str] = None


_CELL_NAMES = {"rnn_tanh": "tanh RNN", "rnn_relu": "ReLU RNN", "lstm": "LSTM", "gru": "GRU", "custom": "custom recurrent layer"}

_CARRYING_INITS = ("orthogonal", "identity")
"""Init schemes that already give every recurrent gate block singular values of 1."""


@dataclass(frozen=True)
class LayerKind:
    """What a layer is and what was done to it, for the verdict's evidence and the advice.

    Attributes:
        cell_type: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"``, ``"gru"``, ``"custom"`` (a
            ``custom`` matrix), or ``None`` (not known: a custom cell).
        init: what GradHealth's init wrote to the hidden-to-hidden matrix, as the init report
            words it (``"orthogonal"``, ``"uniform +-0.01"``, ``"glorot (fan 8+8) x2"``); ``None``:
            left as it was (the framework's default init with ``init=None``, or weights kept).
        clipping: whether gradients are clipped already (by GradHealth or the Trainer).
    """

    cell_type: Optional[str] = None
    init: Optional[str] = None
    clipping: bool = False

    @property
    def described(self) -> str:
        """E.g. ``"GRU, orthogonal init"`` or ``"LSTM, PyTorch's default init"``."""
        init = "its init left as it was (PyTorch's default unless loaded)" if self.init is None else f"{self.init} init"
        return f"{_CELL_NAMES.get(self.cell_type or '', 'layer')}, {init}"


def advice(
    condition: str,
    kind: LayerKind = LayerKind(),
    steps: Optional[int] = None,
    saturation: Optional[float] = None,
    memory: Optional[float] = None,
) -> str:
    """What usually helps a ``"vanishing"``, ``"exploding"`` or ``"nonfinite"`` layer, as one
    sentence, leaving out what the layer already is or has (its cell type, its init, clipping);
    for a layer with :data:`SHORT_MEMORY`, what lengthens its memory of about ``memory`` steps
    (:func:`memory_steps`) should the task need longer dependencies: the vanishing advice
    without the shorter sequence.

    Vanishing: orthogonal init (identity too for a ReLU RNN, Le et al. 2015) unless the layer has
    one of them; a gated cell instead of a plain RNN; for an LSTM chrono forget-gate biases
    (Tallec & Ollivier 2018) for dependencies up to ``steps``; for a GRU a positive update-gate
    bias, its counterpart (h_t = (1 - z_t) n_t + z_t h_(t-1) keeps more of h_(t-1) as z_t nears 1);
    smaller inputs when more than :data:`~lightning_gradhealth.defaults.SATURATING_ABOVE` of the
    tanh units saturate; a shorter sequence when the dependencies are shorter. Exploding:
    clipping unless on (else a lower ``clip_val``), orthogonal init unless the layer has it (a
    gain of 1 if it has a larger one), a bounded nonlinearity for a ReLU RNN, a lower learning rate.

    Examples:
        >>> print(advice("vanishing", LayerKind("gru", "orthogonal"), steps=100))
        What usually helps this layer (GRU, orthogonal init): a positive update-gate bias (the z block of \
bias_hh_l*), so that h_t keeps more of h_(t-1), the GRU's counterpart of chrono init; or a shorter sequence or \
truncated BPTT, when the dependencies the task needs are shorter than 100 steps.
        >>> print(advice(SHORT_MEMORY, LayerKind("lstm", None), steps=60, memory=14.4))
        If the task needs dependencies longer than about 14 steps, what usually helps this layer (LSTM, its init \
left as it was (PyTorch's default unless loaded)): orthogonal init of the recurrent matrices \
(GradHealth(init="orthogonal")); or chrono forget-gate biases for dependencies up to 60 steps (chrono_t_max=60), if \
not set already.
    """
    cell, init = kind.cell_type, kind.init
    scheme = (init or "").split(" ")[0]
    helps: list[str] = []
    if condition in ("vanishing", SHORT_MEMORY):
        if scheme not in _CARRYING_INITS:
            helps.append(
                'orthogonal init of the recurrent matrices (GradHealth(init="orthogonal"))'
                + (' or identity init (init="identity", the IRNN)' if cell == "rnn_relu" else "")
            )
        elif cell == "rnn_relu" and scheme != "identity":
            helps.append('identity init (GradHealth(init="identity"), the IRNN)')
        if cell in ("rnn_tanh", "rnn_relu"):
            helps.append("an LSTM or GRU instead of a plain RNN")
        if cell == "lstm":
            horizon = steps or "T"
            helps.append(
                f"chrono forget-gate biases for dependencies up to {horizon} steps (chrono_t_max={horizon}), if not set already"
            )
        if cell == "gru":
            helps.append(
                "a positive update-gate bias (the z block of bias_hh_l*), so that h_t keeps more of h_(t-1), "
                "the GRU's counterpart of chrono init"
            )
        if saturation is not None and saturation > SATURATING_ABOVE:
            helps.append(f"smaller or normalized inputs ({saturation:.0%} of the tanh units are saturated)")
        if condition == "vanishing":
            helps.append(
                "a shorter sequence or truncated BPTT, when the dependencies the task needs are shorter than "
                + (f"{steps} steps" if steps else "the sequence")
            )
        elif not helps:
            helps.append("a cell whose state keeps more of itself at every step (a gated cell, a gate bias toward keeping)")
    else:
        clip = 'gradient clipping (GradHealth(clip="norm", clip_val=1.0))'
        helps.append("a lower clip_val (clipping is on)" if kind.clipping else clip)
        if scheme not in _CARRYING_INITS:
            helps.append('orthogonal init of the recurrent matrices (GradHealth(init="orthogonal"))')
        elif " x" in (init or ""):
            helps.append("a gain of 1 for the recurrent init")
        if cell == "rnn_relu":
            helps.append("a tanh RNN, LSTM or GRU instead of a ReLU RNN")
        helps.append("a lower learning rate")
        if condition == "nonfinite":
            helps.insert(0, "checking the loss and the input data for NaN/Inf")
    listed = "; ".join(helps[:-1]) + ("; or " if len(helps) > 1 else "") + helps[-1]
    if condition == SHORT_MEMORY:
        longer = "than the layer keeps" if memory is None else f"than about {memory:.0f} steps"
        return f"If the task needs dependencies longer {longer}, what usually helps this layer ({kind.described}): {listed}."
    return f"What usually helps this layer ({kind.described}): {listed}."


def _layer_evidence(
    lyapunov_max: Optional[float],
    steps: int,
    vanish_below: float,
    kind: LayerKind,
    spectrum: Optional[SpectrumSummary],
) -> str:
    """Why the layer itself cannot carry a gradient a few steps, in its own numbers."""
    decades = -math.log10(vanish_below)
    parts = []
    if lyapunov_max is not None:
        if math.isinf(lyapunov_max):
            parts.append("lambda_1 = -inf: on this batch the layer maps a perturbation of its state to zero, nothing is carried")
        else:
            memory = memory_steps(lyapunov_max, vanish_below)
            short = (
                f"the {steps - 1} steps of the sequence"
                if steps - 1 <= MEMORY_STEPS
                else f"{MEMORY_STEPS} (MEMORY_STEPS), below which a layer cannot relate even nearby steps"
            )
            parts.append(
                f"the layer itself forgets: lambda_1 = {lyapunov_max:+.3g} per step (1/|lambda_1| = {-1 / lyapunov_max:.2g} "
                f"steps), so it keeps a gradient within 10^-{decades:g} for {memory:.1f} steps, fewer than {short} (its "
                f"most persistent direction fades 10^{carried_decades(lyapunov_max, steps):+.1f} over the {steps - 1} steps)"
            )
    sigma_max = math.nan if spectrum is None else spectrum.sigma_max
    if kind.cell_type in ("rnn_tanh", "rnn_relu") and 0 < sigma_max < 1:
        bound = (steps - 1) * math.log10(sigma_max)
        parts.append(
            f"sigma_max of weight_hh is {sigma_max:.3g} < 1 at step {spectrum.step}, so every step shrinks every "  # type: ignore[union-attr]
            f"perturbation of the state at least that much (a {kind.cell_type[4:]} slope is at most 1): at most "
            f"10^{bound:+.1f} over the sequence"
        )
    return "; ".join(parts)


def layer_verdict(
    summary: Optional[TimestepSummary],
    saturation: Optional[float] = None,
    vanish_below: float = VANISH_BELOW,
    explode_above: float = EXPLODE_ABOVE,
    saturating_above: float = SATURATING_ABOVE,
    unmeasured_reason: Optional[str] = None,
    lyapunov_max: Optional[float] = None,
    kind: LayerKind = LayerKind(),
    spectrum: Optional[SpectrumSummary] = None,
) -> tuple[str, str]:
    """The verdict on one layer and its reason in numbers: ``(verdict, reason)``.

    In order: no summary is ``"unmeasured"`` (for ``unmeasured_reason``, when the probe gave one);
    NaN/Inf gradients through time are ``"exploding"``; a zero gradient at the last step (the loss
    does not reach the layer through time) is ``"unmeasured"``; then :func:`diagnose_timesteps`'
    ``"exploding"`` or ``"vanishing"`` (for an underflowed first step, "vanishing" below the
    bound, or ``"unmeasured"`` when the bound decides nothing), told apart from what the loss
    causes and from a short memory by the layer's largest Lyapunov exponent ``lyapunov_max``
    (module docs); then ``"saturating"`` when more than ``saturating_above`` of the tanh candidate
    units are saturated; then ``"short memory"`` for a vanishing gradient through a layer whose
    memory (:func:`memory_steps`) is shorter than the sequence but not than :data:`MEMORY_STEPS`,
    its reason giving that memory and, should the task need longer dependencies, what usually
    lengthens it (:func:`advice` for ``kind``); else ``"healthy"``, which for a vanishing gradient
    through a layer that carries it across the sequence says that the loss asks for short memory
    only.

    The reason of ``"vanishing"`` names the layer's own evidence: ``lyapunov_max``, the saturation,
    and for a plain RNN (``kind.cell_type``) whose recurrent matrix has a ``spectrum`` with
    ``sigma_max`` < 1 the bound it puts on every step (the spectrum's step is named: it may be
    later than the probe's).

    Examples:
        >>> layer_verdict(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])))[0]
        'vanishing'
        >>> verdict, reason = layer_verdict(summarize_timesteps(torch.tensor([0.0, 1e-20, 1.0])))   # float32
        >>> verdict, reason.split(" (")[0]
        ('vanishing', '||dL/dh|| falls below 10^-37.9 over 3 steps back: it underflows below 1.2e-38')
        >>> layer_verdict(summarize_timesteps(torch.tensor([0.5, 1.0])), saturation=0.8)[0]
        'saturating'
        >>> verdict, reason = layer_verdict(summarize_timesteps(torch.tensor([1e-5, 1e-2, 1.0])), lyapunov_max=-0.01)
        >>> verdict, reason.split(":")[0]
        ('healthy', 'the loss asks for short memory only')
        >>> verdict, reason = layer_verdict(summarize_timesteps(torch.logspace(-7, 0, 60)), lyapunov_max=-0.33)
        >>> verdict, reason.split(" (")[0]
        ('short memory', 'the layer keeps a gradient within 10^-3 for 20.9 steps')
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
    condition = diagnose_timesteps(summary, vanish_below, explode_above, lyapunov_max)
    if condition == "nonfinite":
        return "exploding", f"||dL/dh_t|| is NaN/Inf over its {summary.steps} steps"
    trend = f"over {summary.steps} steps back ({describe_rate(summary)})"
    if summary.steps == 1:
        trend = f"over one step ({describe_rate(summary)})"
    underflow = f"it underflows below {summary.floor:.2g} (the smallest normal float) at the layer's first " + (
        "step" if summary.underflow_steps == 1 else f"{summary.underflow_steps} steps"
    )
    known = lyapunov_max is not None and not math.isnan(lyapunov_max)
    if condition == "exploding":
        cause = f"; the layer amplifies: lambda_1 = {lyapunov_max:+.3g} per step" if known else ""
        return "exploding", f"||dL/dh|| grows 10^{summary.transmission:+.1f} {trend}{cause}{saturated}"
    if condition == "vanishing":
        falls = (
            f"||dL/dh|| falls below 10^{summary.transmission:+.1f} over {summary.steps} steps back: {underflow} "
            f"({describe_rate(summary)})"
            if summary.transmission_is_bound
            else f"||dL/dh|| falls 10^{summary.transmission:+.1f} {trend}"
        )
        evidence = _layer_evidence(lyapunov_max if known else None, summary.steps, vanish_below, kind, spectrum)
        if not known:
            untold = "whether the layer or the loss causes it is not told apart without lambda_1 (lyapunov_k > 0)"
            evidence = "; ".join(part for part in (evidence, untold) if part)
        return "vanishing", f"{falls}; horizon {summary.horizon} of {summary.steps} steps{saturated}; {evidence}"
    if summary.transmission_is_bound and condition not in (RECENT_LOSS, SHORT_MEMORY):
        return "unmeasured", (
            f"||dL/dh|| is only {summary.last_norm:.3g} at the layer's last step and {underflow}: the bound on its transmission, "
            f"10^{summary.transmission:+.1f}, decides nothing"
        )
    if saturation is not None and saturation > saturating_above:
        return "saturating", (
            f"{saturation:.0%} of tanh candidate units at |tanh| > {SATURATED_TANH:g}, where the gradient through them "
            f"is < {1 - SATURATED_TANH**2:.2g}x"
        )
    bound = "below " if summary.transmission_is_bound else ""
    if condition == SHORT_MEMORY:
        assert lyapunov_max is not None
        memory = memory_steps(lyapunov_max, vanish_below)
        return "short memory", (
            f"the layer keeps a gradient within 10^-{-math.log10(vanish_below):g} for {memory:.1f} steps (lambda_1 = "
            f"{lyapunov_max:+.3g} per step, 1/|lambda_1| = {-1 / lyapunov_max:.2g} steps), not across the "
            f"{summary.steps - 1} steps of the sequence: ||dL/dh|| falls {bound}10^{summary.transmission:+.1f} {trend}, "
            f"horizon {summary.horizon} of {summary.steps}{saturated}. Enough when the task's dependencies are shorter. "
            + advice(SHORT_MEMORY, kind, summary.steps, saturation, memory)
        )
    if condition == RECENT_LOSS:
        assert lyapunov_max is not None
        return "healthy", (
            f"the loss asks for short memory only: ||dL/dh|| falls {bound}10^{summary.transmission:+.1f} {trend}, horizon "
            f"{summary.horizon} of {summary.steps}, but the layer carries gradient across the sequence (lambda_1 = "
            f"{lyapunov_max:+.3g} per step: its most persistent direction keeps "
            f"10^{carried_decades(lyapunov_max, summary.steps):+.1f} over {summary.steps - 1} steps); "
            f"the loss's gradient enters at late steps or in directions the layer lets fade{saturated}"
        )
    if condition == EARLY_LOSS:
        return "healthy", (
            f"the loss weighs early steps more: ||dL/dh|| grows 10^{summary.transmission:+.1f} {trend} while the layer "
            f"contracts (lambda_1 = {lyapunov_max:+.3g} per step), so the growth is the loss's own gradient, not the "
            f"layer's{saturated}"
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
        """Whether nothing needs attention: no layer's verdict is in :data:`NEEDS_ATTENTION` (a layer
        with "short memory" is healthy: see the module docs) and no step had NaN/Inf gradients."""
        return self.nonfinite_steps == 0 and not any(layer.verdict in NEEDS_ATTENTION for layer in self.layers)

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
        state = "healthy" if self.healthy else "needs attention"
        short = [layer.layer for layer in self.layers if layer.verdict == "short memory"]
        if short and self.healthy:
            state = f"healthy; short memory in {', '.join(short)} (enough unless the task needs longer dependencies)"
        return f"GradHealth health report at step {self.step}{counted}: {state}"

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
            for layer in self.layers:  # each reason a paragraph of REPORT_WIDTH, its advice indented below
                reason = f"{layer.layer}: {layer.verdict}: {layer.reason}"
                lines.extend(textwrap.wrap(reason, REPORT_WIDTH, initial_indent="  ", subsequent_indent="    "))
                if layer.advice:
                    lines.extend(textwrap.wrap(layer.advice, REPORT_WIDTH, initial_indent="    ", subsequent_indent="    "))
        else:
            lines.append("no recurrent layer found")
        return "\n".join(lines + self._footer())

    def markdown(self) -> str:
        """The report as Markdown, for TensorBoard's text dashboard."""
        rows = self.rows()
        lines = [f"**{self._title()}**", ""]
        if rows:
            lines += [_table_row(rows[0]), "|" + "---|" * len(rows[0])]
            lines += [_table_row(row.values()) for row in rows]
            lines += [""] + [
                f"- `{layer.layer}`: **{layer.verdict}**: {layer.reason}" + (f" {layer.advice}" if layer.advice else "")
                for layer in self.layers
            ]
        return "\n".join(lines + [""] + self._footer())


def _table_row(cells: Iterable[str]) -> str:
    r"""One Markdown table row; a ``|`` inside a cell (``1/|lambda_1|``) is escaped as ``\|``,
    or it would split the cell.

    Examples:
        >>> _table_row(["layer", "lambda_1 (1/|lambda_1|)"])
        '| layer | lambda_1 (1/\\|lambda_1\\|) |'
    """
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


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
