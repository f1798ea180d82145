"""The parts of the measuring engine. Each owns its state and follows one pattern (torchmetrics'
``Metric``): ``update`` takes one step's data and returns what to log, ``reset`` forgets an
earlier run, ``state_dict`` / ``load_state_dict`` carry the state through a checkpoint.

- :class:`Schedule`: which steps are measured, which are probed, which are full passes.
- :class:`TimestepTracker`: the per-timestep norms of the probe, their summaries, the heatmap
  history and the vanishing / exploding notices.
- :class:`SpectrumTracker`: sigma_max on logging steps (warm-started), full spectra on full
  passes, the start-of-run spectra for the report.
- :class:`GradientTracker`: the NaN/Inf policy, clipping and its statistics, gradient norms,
  the clip threshold suggestion.

:class:`~lightning_gradhealth.GradHealthMonitor` coordinates them. ``load_state_dict`` is
tolerant: it restores the fields it knows, leaves the others at their start values, and returns
what it could not restore (:class:`IncompatibleState`), so a checkpoint written by another
version of the package resumes.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_gradhealth import tags
from lightning_gradhealth.clipping import (
    ClipStats,
    ClipThresholdSuggester,
    clip_grads_,
    grad_norms,
    group_grad_norms,
    nonfinite_grads,
)
from lightning_gradhealth.config import MonitorConfig
from lightning_gradhealth.distributed import Distributed
from lightning_gradhealth.defaults import (
    CALLER_CLIPPING_RTOL,
    DEFAULT_LOG_EVERY_N_STEPS,
    FULL_EVERY_N_LOGS,
    HEATMAP_COLUMNS,
    HISTORY_SIZE,
    MEMORY_STEPS,
    PROBE_EVERY_N_LOGS,
)
from lightning_gradhealth.health import (
    REPORT_WIDTH,
    LayerKind,
    SpectrumSummary,
    TimestepSummary,
    advice,
    carried_decades,
    describe_rate,
    diagnose_timesteps,
    memory_steps,
    summarize_timesteps,
)
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.layers import WeightRecord
from lightning_gradhealth.output import EigenvalueChart, StepOutput, TimestepCurve, TimestepHeatmap, bin_max, heatmap_bin_width
from lightning_gradhealth.probe import ProbeResult
from lightning_gradhealth.spectra import MatrixSpectrum, SigmaMaxTracker, full_spectrum

__all__ = [
    "GradientTracker",
    "IncompatibleState",
    "NonFiniteGradientError",
    "Notices",
    "OtherClipping",
    "Schedule",
    "SpectrumTracker",
    "StepPlan",
    "TimestepTracker",
    "thin_history",
]



class NonFiniteGradientError(FloatingPointError):
    """Raised with ``on_nonfinite="raise"`` before an optimizer step with NaN/Inf gradients."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


class Notices:
    """Messages to the user, each said once per key (a kind of problem and where it is).

    ``warn`` receives each message (default :func:`warnings.warn`; the callback passes
    Lightning's rank-zero warning).
    """

    def __init__(self, warn: Callable[[str], None] = _warn) -> None:
        self.warn = warn
        self._said: set[Hashable] = set()

    def say(self, key: Hashable, message: str) -> None:
        """Say ``"GradHealth: <message>"`` unless something was already said under ``key``."""
        if key not in self._said:
            self._said.add(key)
            self.warn(f"GradHealth: {message}")

    def reset(self) -> None:
        """Forget what was said: a new run says it again."""
        self._said.clear()


class IncompatibleState(NamedTuple):
    """What ``load_state_dict`` could not restore: fields the checkpoint lacks (left at their
    start values) and fields it has that are unknown or unreadable here (dropped)."""

    missing: list[str]
    dropped: list[str]


def _restore(state: Any, loaders: Mapping[str, Callable[[Any], None]]) -> IncompatibleState:
    """Run ``loaders[name](state[name])`` for every field both know; collect the rest. A loader
    reads and checks its whole value before it assigns anything, so a field it cannot read
    (malformed, from another version) is dropped whole and the part keeps its start value."""
    if not isinstance(state, Mapping):
        return IncompatibleState(list(loaders), [f"<{type(state).__name__} instead of a mapping>"])
    dropped = [str(name) for name in state if name not in loaders]
    for name, load in loaders.items():
        if name in state:
            try:
                load(state[name])
            except Exception:  # whatever a foreign checkpoint holds, a resume never fails on it
                dropped.append(name)
    return IncompatibleState([name for name in loaders if name not in state], dropped)


def _count(value: Any) -> int:
    """A checkpointed counter: an integer >= 0."""
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step does, from the :class:`Schedule`.

    Attributes:
        measure: run the spectra (the first optimizer to step at a logging step).
        probe: run the dL/dh_t probe on what it captured: a measured step that is a probe step
            (:meth:`Schedule.is_probe_step`). On the other logging steps nothing is captured.
        full: a full pass: every singular value and eigenvalue, and their histograms.
        log_gradients: log this optimizer's gradient norms and clipping statistics.
        pictures: draw the pictures: on the full passes after step 0. The first full pass, right
            after init, is numbers only: drawing costs about a second per fit, which every
            refit of a retrain loop would pay; :meth:`GradHealthMonitor.end_of_fit` draws the
            final state of a long run.
        exponents: the probe takes the Lyapunov exponents too (:meth:`Schedule.takes_exponents`).
    """

    measure: bool
    probe: bool
    full: bool
    log_gradients: bool
    pictures: bool = False
    exponents: bool = False


class Schedule:
    """Which optimizer steps are measured: every ``log_every_n_steps`` (``sigma_max``, gradient
    norms), with the dL/dh_t probe every ``probe_every_n_steps`` and a full pass every
    ``full_every_n_steps`` (both multiples of the logging interval); a full pass runs the probe
    too. Step 0 is all three. The probe takes the Lyapunov exponents too, at most once every
    :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS` logging intervals (:meth:`takes_exponents`).

    ``requested`` holds the intervals asked for, ``(log, full, probe)``, each ``None`` to be
    resolved by :meth:`resolve` at attach time: the logging interval from the fallback given
    there (the Trainer's) or :data:`~lightning_gradhealth.defaults.DEFAULT_LOG_EVERY_N_STEPS`;
    the full interval is :data:`~lightning_gradhealth.defaults.FULL_EVERY_N_LOGS` logging
    intervals; the probe interval is the logging interval when that was asked for, else
    :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS` logging intervals. An interval
    asked for against a resolved logging interval is rounded up to a multiple of it.

    Examples:
        >>> schedule = Schedule(log_every_n_steps=None, full_every_n_steps=30, probe_every_n_steps=50)
        >>> schedule.resolve(fallback=20)
        >>> schedule.log_every_n_steps, schedule.probe_every_n_steps, schedule.full_every_n_steps
        (20, 60, 40)
        >>> [step for step in range(0, 200, 20) if schedule.is_probe_step(step)]   # multiples of 60, and full passes
        [0, 40, 60, 80, 120, 160, 180]
        >>> schedule.update(100, optimizer="")  # a logging step that is not a probe step: sigma_max only
        StepPlan(measure=True, probe=False, full=False, log_gradients=True, pictures=False, exponents=False)
        >>> schedule.update(120, optimizer="")
        StepPlan(measure=True, probe=True, full=True, log_gradients=True, pictures=True, exponents=True)
        >>> schedule.update(120, optimizer="")  # a second optimizer step at the same logged step
        StepPlan(measure=False, probe=False, full=False, log_gradients=False, pictures=False, exponents=False)
        >>> defaults = Schedule()   # under Lightning's default interval: the probe every 8th logging step
        >>> defaults.resolve(fallback=50)
        >>> defaults.log_every_n_steps, defaults.probe_every_n_steps, defaults.full_every_n_steps
        (50, 400, 2000)
        >>> explicit = Schedule(log_every_n_steps=5)   # an interval asked for: the probe follows it
        >>> explicit.resolve(fallback=50)
        >>> explicit.log_every_n_steps, explicit.probe_every_n_steps
        (5, 5)
        >>> [step for step in range(0, 100, 5) if explicit.takes_exponents(step)]   # every 8 x 5 steps
        [0, 40, 80]
    """

    def __init__(
        self,
        log_every_n_steps: Optional[int] = None,
        full_every_n_steps: Optional[int] = None,
        probe_every_n_steps: Optional[int] = None,
    ) -> None:
        self.requested = (log_every_n_steps, full_every_n_steps, probe_every_n_steps)
        self.log_every_n_steps: int
        self.full_every_n_steps: int
        self.probe_every_n_steps: int
        self.resolve()
        self._measured_step: Optional[int] = None
        self._logged_steps: dict[str, int] = {}

    def resolve(self, fallback: Optional[int] = None) -> None:
        """Fix the intervals: the requested ones, else ``fallback``, else the defaults."""
        log_every, full_every, probe_every = self.requested
        log = self.log_every_n_steps = log_every or (DEFAULT_LOG_EVERY_N_STEPS if fallback is None else max(int(fallback), 1))
        self.full_every_n_steps = -(-(full_every or FULL_EVERY_N_LOGS * log) // log) * log
        probe = probe_every or (log if log_every else PROBE_EVERY_N_LOGS * log)
        self.probe_every_n_steps = -(-probe // log) * log

    def is_logging_step(self, step: int) -> bool:
        """Whether ``step`` is measured: a multiple of ``log_every_n_steps``."""
        return step % self.log_every_n_steps == 0

    def is_probe_step(self, step: int) -> bool:
        """Whether the probe runs at ``step``: a multiple of ``probe_every_n_steps``, or a full pass."""
        return step % self.probe_every_n_steps == 0 or step % self.full_every_n_steps == 0

    def logs_gradients(self, step: int, optimizer: str) -> bool:
        """Whether the next :meth:`update` of ``optimizer`` at ``step`` logs its gradients: a
        logging step on which it has not stepped yet (with several optimizer steps per logged
        step, truncated BPTT for one, the first is logged)."""
        return self.is_logging_step(step) and self._logged_steps.get(optimizer) != step

    def update(self, step: int, optimizer: str) -> StepPlan:
        """The plan of ``step`` for the optimizer named ``optimizer``; the probe and the spectra
        run once per step (at the first optimizer), the gradients are logged once per optimizer."""
        logging = self.is_logging_step(step)
        measure = logging and step != self._measured_step
        log_gradients = self.logs_gradients(step, optimizer)
        if measure:
            self._measured_step = step
        if log_gradients:
            self._logged_steps[optimizer] = step
        full = measure and step % self.full_every_n_steps == 0
        probe = measure and self.is_probe_step(step)
        exponents = probe and self.takes_exponents(step)
        return StepPlan(measure, probe, full, log_gradients, pictures=full and step > 0, exponents=exponents)

    def takes_exponents(self, step: int) -> bool:
        """Whether the probe at probe step ``step`` takes the Lyapunov exponents: the first probe
        step at or after each multiple of ``E`` = :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS`
        logging intervals, i.e. ``step % E < probe_every_n_steps``, and the full passes.

        The exponents cost about 0.4 of the probe (``benchmarks/lyapunov.py``): at the default
        intervals every probe takes them, while a probe asked for on every step takes them every
        ``E`` steps, not every step. Stateless, so a resumed run takes them where the first run did.
        """
        exponent_interval = PROBE_EVERY_N_LOGS * self.log_every_n_steps
        return step % exponent_interval < self.probe_every_n_steps or step % self.full_every_n_steps == 0

    def reset(self) -> None:
        """Forget which steps were measured (a new fit may count its steps from 0 again)."""
        self._measured_step = None
        self._logged_steps.clear()

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the intervals are settings, and the marks matter within one step only."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> IncompatibleState:
        return _restore(state_dict, {})


def thin_history(indices: Sequence[int], size: int) -> list[int]:
    """Which heatmap rows to keep, at most ``size``: the positions in ``indices`` (the rows' numbers
    in the run, 0 for the first probe, increasing, the last one the latest probe) of the rows whose
    number is a multiple of the stride, and of the latest row.

    The stride is the smallest power of two s that keeps at most ``size`` rows of a run of
    ``latest + 1`` probes: ceil(latest / s) + 1 <= size. It doubles as the run grows, so the rows
    kept are evenly spaced over the whole run (no gap wider than twice the mean gap), the first
    (the initial state) and the latest always among them; and the rows kept after one more probe
    are among those kept before, so thinning row by row, or after a resume, keeps what thinning
    the whole run at once keeps.

    Raises:
        ValueError: ``size`` below 2, no room for the first and the latest row.

    Examples:
        >>> thin_history(range(10), size=4)
        [0, 4, 8, 9]
        >>> thin_history([0, 4, 8, 9, 10], size=4)
        [0, 1, 2, 4]
    """
    if size < 2:
        raise ValueError(f"the heatmap history needs room for at least 2 rows (the first and the latest), got {size}")
    if not indices:
        return []
    latest, stride = indices[-1], 1
    while -(-latest // stride) + 1 > size:
        stride *= 2
    return [position for position, index in enumerate(indices) if index % stride == 0 or index == latest]


def _numbered_by_step(steps: Sequence[int]) -> list[int]:
    """Numbers for heatmap rows saved without them (before they were kept): the steps counted in
    the greatest common divisor of the gaps between rows, the logging interval wherever two
    consecutive probes were kept (the earlier halving always kept the newest).

    Examples:
        >>> _numbered_by_step([0, 102400, 128000, 149900, 149950])
        [0, 2048, 2560, 2998, 2999]
    """
    gaps = [later - earlier for earlier, later in zip(steps, steps[1:])]
    if any(gap <= 0 for gap in gaps):
        raise ValueError("heatmap rows must come in increasing step order")
    unit = math.gcd(*gaps) or 1
    return [(step - steps[0]) // unit for step in steps]


class _HeatmapRow(NamedTuple):
    """One heatmap row: its number in the run (0 for the first probe), the step, the probe's length
    T, and its norms in bins of ``heatmap_bin_width(timesteps, len(norms))`` timesteps."""

    index: int
    step: int
    timesteps: int
    norms: np.ndarray


class TimestepTracker:
    """The per-timestep norms of the latest probe, their summaries (:mod:`~lightning_gradhealth.health`),
    the heatmap history, and one notice per layer and condition (vanishing, exploding, NaN/Inf).

    Attributes:
        grad_norms: ``{LayerKey: (T,) tensor}`` of the latest probe.
        summaries: ``{LayerKey: TimestepSummary}`` of the latest probe (output states only).
        saturation: ``{LayerKey: fraction}`` of saturated tanh candidates, fused layers only.
        unmeasured: ``{LayerKey: reason}`` of the watched layers the latest probe did not measure
            (:attr:`~lightning_gradhealth.probe.ProbeResult.unmeasured`), for the report.
        lyapunov: ``{LayerKey: (k,) tensor}``, the top Lyapunov exponents of the latest probe
            (:attr:`~lightning_gradhealth.probe.ProbeResult.lyapunov`).
        history: ``{LayerKey: [(step, norms), ...]}``, the heatmap rows: at most ``history_size``
            per key, evenly spaced over the run (:func:`thin_history`); at most ``history_columns``
            norms per row, a longer probe's in bins of timesteps
            (:func:`~lightning_gradhealth.output.heatmap_bin_width`), the largest of each
            (:func:`~lightning_gradhealth.output.bin_max`).
        describe_layer: gives the :class:`~lightning_gradhealth.health.LayerKind` of a layer key
            (cell type, init, clipping), so that a notice's advice leaves out what the layer already
            is (default: nothing known).
    """

    def __init__(
        self,
        config: MonitorConfig,
        notices: Notices,
        history_size: int = HISTORY_SIZE,
        history_columns: int = HEATMAP_COLUMNS,
        describe_layer: Callable[[LayerKey], LayerKind] = lambda key: LayerKind(),
    ) -> None:
        self.config = config
        self.notices = notices
        self.describe_layer = describe_layer
        self.history_size = history_size
        self.history_columns = history_columns
        self.grad_norms: dict[LayerKey, Tensor] = {}
        self.summaries: dict[LayerKey, TimestepSummary] = {}
        self.saturation: dict[LayerKey, float] = {}
        self.unmeasured: dict[LayerKey, str] = {}
        self.lyapunov: dict[LayerKey, Tensor] = {}
        self._rows: dict[LayerKey, list[_HeatmapRow]] = {}

    @property
    def history(self) -> dict[LayerKey, list[tuple[int, np.ndarray]]]:
        return {key: [(row.step, row.norms) for row in rows] for key, rows in self._rows.items()}

    def update(self, result: ProbeResult, step: int) -> StepOutput:
        """Take one probe's result at ``step``: summaries, scalars, notices, a heatmap row.

        Only finite values are logged: a layer whose ||dL/dh_t|| holds NaN/Inf logs no summary
        and no norm (the notice names it, and the weights' gradients are counted in
        ``gradhealth/nonfinite/steps``); a layer the loss does not reach has no ``transmission``,
        one step no ``rate_per_step``, and an underflowed first step's ``transmission`` is its
        finite bound (:mod:`~lightning_gradhealth.health`), named once. The vanishing and exploding
        notices tell the layer from the loss by the layer's largest Lyapunov exponent, as the
        report does (:func:`~lightning_gradhealth.health.diagnose_timesteps`): a vanishing gradient
        through a layer that carries it across the sequence (the loss asks for short memory), or
        a few steps (a short memory, enough for a task with short dependencies), gets no notice;
        the report says which.
        The Lyapunov exponents are logged as ``lyapunov_max`` (the largest) and a histogram of all
        k; an exponent of -inf (a direction mapped to zero, e.g. by dead ReLU units) is in the
        report, not in TensorBoard, and a layer without exponents is named once with the reason.
        """
        output = StepOutput()
        self.grad_norms = dict(result.norms)
        self.saturation = dict(result.saturation)
        self.unmeasured = dict(result.unmeasured)
        if result.exponents_taken:  # else the latest exponents stand
            self.lyapunov = dict(result.lyapunov)
        for key, exponents in result.lyapunov.items():
            finite = exponents[torch.isfinite(exponents)]
            if len(exponents) and math.isfinite(float(exponents[0])):
                output.scalars[tags.layer_tag(key, tags.LYAPUNOV_MAX)] = float(exponents[0])
            if len(finite):
                output.histograms[tags.layer_tag(key, tags.LYAPUNOV)] = finite
        for key, reason in result.lyapunov_unmeasured.items():
            self.notices.say((key, "lyapunov"), f"no Lyapunov exponents for '{key}': {reason}.")
        self.summaries = {}
        for key, norms in result.norms.items():
            summary = summarize_timesteps(norms, self.config.horizon_factor, reverse=key.reverse)
            self.summaries[key] = summary
            values = (summary.transmission, float(summary.horizon), summary.rate_per_step, summary.first_norm, summary.last_norm)
            output.scalars.update(
                {tags.layer_tag(key, name): value for name, value in zip(tags.TIMESTEP_SCALARS, values) if math.isfinite(value)}
            )
            if key in self.saturation:
                output.scalars[tags.layer_tag(key, "saturation")] = self.saturation[key]
            exponents = self.lyapunov.get(key)  # the latest taken: a probe without exponents keeps them
            lyapunov_max = float(exponents[0]) if exponents is not None and len(exponents) else None
            lyapunov_max = None if lyapunov_max is not None and math.isnan(lyapunov_max) else lyapunov_max
            condition = diagnose_timesteps(summary, self.config.vanish_below, self.config.explode_above, lyapunov_max)
            if condition in ("vanishing", "exploding", "nonfinite") and key.state == "h":
                assert condition is not None
                message = self._notice(key, norms, summary, condition, step, lyapunov_max)
                self.notices.say((key, condition), message)
            rows = self._rows.get(key, [])
            width = heatmap_bin_width(len(norms), self.history_columns)
            row = _HeatmapRow(rows[-1].index + 1 if rows else 0, step, len(norms), bin_max(norms.numpy(), width))
            self._rows[key] = self._thin([*rows, row])
        return output

    def _thin(self, rows: list[_HeatmapRow]) -> list[_HeatmapRow]:
        """The rows :func:`thin_history` keeps."""
        return [rows[position] for position in thin_history([row.index for row in rows], self.history_size)]

    def _notice(
        self,
        key: LayerKey,
        norms: Tensor,
        summary: TimestepSummary,
        condition: str,
        step: int,
        lyapunov_max: Optional[float],
    ) -> str:
        """The message on a vanishing, exploding or NaN/Inf gradient through time: the numbers (an
        underflowed first step's transmission named as the bound it is), the layer's own evidence
        (its largest Lyapunov exponent), and the advice for what the layer is
        (:func:`~lightning_gradhealth.health.advice`), as paragraphs wrapped to
        :data:`~lightning_gradhealth.health.REPORT_WIDTH` characters."""
        trend = f"{describe_rate(summary)}, horizon {summary.horizon} of {summary.steps} steps"
        if condition == "nonfinite":
            numbers = f"||dL/dh_t|| is NaN or Inf at {int((~torch.isfinite(norms)).sum())} of its {summary.steps} steps"
        elif summary.transmission_is_bound:
            float_name = str(norms.dtype).replace("torch.", "")
            numbers = (
                f"||dL/dh|| underflows to {summary.first_norm:.3g} in {float_name} at the layer's first "
                f"{summary.underflow_steps} steps (below {summary.floor:.2g}, the smallest normal {float_name}) and is "
                f"{summary.last_norm:.3g} at its last ({summary.steps} steps): transmission is below "
                f"{summary.transmission:+.2f} decades (a bound, not a measurement; {trend})"
            )
        else:
            numbers = (
                f"||dL/dh|| is {summary.first_norm:.3g} at the layer's first step and {summary.last_norm:.3g} at its last "
                f"({summary.steps} steps) (transmission {summary.transmission:+.2f} decades, {trend})"
            )
        if lyapunov_max is not None and condition != "nonfinite":
            carried = carried_decades(lyapunov_max, summary.steps)
            verb = "forgets" if condition == "vanishing" else "amplifies"
            numbers += (
                f". The layer itself {verb}: lambda_1 = {lyapunov_max:+.3g} per step, 10^{carried:+.1f} over its "
                f"{summary.steps - 1} steps"
            )
            if condition == "vanishing":
                memory = memory_steps(lyapunov_max, self.config.vanish_below)
                numbers += (
                    f"; it keeps a gradient within {self.config.vanish_below:g}x for {memory:.1f} steps, fewer than "
                    f"{min(MEMORY_STEPS, summary.steps - 1)}"
                )
        kind = self.describe_layer(key)
        saturation = self.saturation.get(key)
        prefix = "GradHealth: "  # the notice's own, on the first line
        situation = textwrap.fill(
            f"{condition} gradients through time in {str(key)!r} at step {step}: {numbers}.", REPORT_WIDTH, initial_indent=prefix
        )
        return situation[len(prefix) :] + "\n" + textwrap.fill(advice(condition, kind, summary.steps, saturation), REPORT_WIDTH)

    def pictures(self, step: int) -> StepOutput:
        """Per layer: the latest ||dL/dh_t|| curve (with ||dL/dc_t|| for an LSTM) and the heatmap,
        each relative to the layer's last step in its own order (input position 0 for a backward
        direction, ``key.reverse``)."""
        output = StepOutput()
        for key in self.grad_norms:
            if key.state == "c" and key.hidden_state in self.grad_norms:
                continue  # drawn with its output state's curve
            if key not in self._rows:
                continue  # its update failed this step (and was named)
            drawn = [k for k in dict.fromkeys((key, key.cell_state)) if k in self.grad_norms]
            curves = {str(k): self.grad_norms[k] for k in drawn}
            dashed = frozenset(str(k) for k in drawn if k.state == "c")
            curve = TimestepCurve(curves, str(key), step, dashed, key.reverse)
            output.pictures[tags.layer_tag(key, "timestep_grad_norms")] = curve
            rows = self._rows[key]
            output.pictures[tags.layer_tag(key, "timestep_heatmap")] = TimestepHeatmap(
                [row.step for row in rows], [row.norms for row in rows], str(key), [row.timesteps for row in rows], key.reverse
            )
        return output

    def start_run(self, start_step: Optional[int]) -> None:
        """A run starts at ``start_step``: heatmap rows from that step on belong to an earlier
        run and are dropped (the next row is numbered on from the last one left); ``None`` (a
        resumed run) keeps them all."""
        if start_step is not None:
            self._rows = {key: [row for row in rows if row.step < start_step] for key, rows in self._rows.items()}

    def reset(self) -> None:
        """Forget the latest measurements (the history is trimmed by :meth:`start_run`)."""
        self.grad_norms, self.summaries, self.saturation, self.unmeasured = {}, {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        """The heatmap rows per layer key (as its fields): each row's step, number in the run
        (``indices``), probe length (``timesteps``) and number of columns, and the rows' norms
        end to end in one float32 tensor (``binned_norms``): at most ``4 * history_columns``
        bytes and four integers per row."""
        return {
            "history": [
                {
                    "key": key.to_dict(),
                    "steps": [row.step for row in rows],
                    "indices": [row.index for row in rows],
                    "timesteps": [row.timesteps for row in rows],
                    "columns": [len(row.norms) for row in rows],
                    "binned_norms": torch.from_numpy(np.concatenate([row.norms for row in rows] or [np.zeros(0, np.float32)])),
                }
                for key, rows in self._rows.items()
            ]
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> IncompatibleState:
        def load_rows(entry: Mapping[str, Any]) -> list[_HeatmapRow]:
            """One layer's rows, binned to ``history_columns`` and thinned; rows of the earlier
            layout (``steps`` and whole ``norms`` rows) are numbered from their steps."""
            steps = [_count(step) for step in entry["steps"]]
            if "binned_norms" in entry:
                indices, timesteps = [_count(i) for i in entry["indices"]], [_count(t) for t in entry["timesteps"]]
                columns = [_count(c) for c in entry["columns"]]
                flat = torch.as_tensor(entry["binned_norms"], dtype=torch.float32)
                if flat.ndim != 1 or len(flat) != sum(columns):
                    raise ValueError("the binned norms must be the rows' columns end to end")
                norms = [row.numpy() for row in torch.split(flat, columns)]
            else:
                norms = [torch.as_tensor(row, dtype=torch.float32).numpy() for row in entry["norms"]]
                indices, timesteps = _numbered_by_step(steps), [len(row) for row in norms]
            if not len(steps) == len(indices) == len(timesteps) == len(norms):
                raise ValueError("a heatmap row needs a step, a number, a length and its norms")
            if any(later <= earlier for earlier, later in zip(indices, indices[1:])):
                raise ValueError("heatmap rows must be numbered in increasing order")
            rows = []
            for index, step, length, row in zip(indices, steps, timesteps, norms):
                if row.ndim != 1 or not 0 < len(row) == -(-length // heatmap_bin_width(length, len(row))):
                    raise ValueError(f"{len(row)} columns cannot be the bins of a probe over {length} timesteps")
                scale = heatmap_bin_width(length, self.history_columns) // heatmap_bin_width(length, len(row))
                rows.append(_HeatmapRow(index, step, length, bin_max(row, max(scale, 1))))
            return self._thin(rows)

        def load_history(entries: Sequence[Mapping[str, Any]]) -> None:
            self._rows = {LayerKey.from_dict(entry["key"]): load_rows(entry) for entry in entries}

        return _restore(state_dict, {"history": load_history})


def summarize_spectrum(spectrum: MatrixSpectrum, step: int) -> SpectrumSummary:
    """Reduce a per-gate spectrum to the extremes over its gate blocks (NaN-aware)."""

    def extreme(values: Tensor, reduce: Callable[[Tensor], Tensor]) -> float:
        finite = values[torch.isfinite(values)]
        return float(reduce(finite)) if finite.numel() else math.nan

    return SpectrumSummary(
        step=step,
        spectral_radius=extreme(spectrum.spectral_radius, torch.max),
        sigma_min=extreme(spectrum.sigma_min, torch.min),
        sigma_max=extreme(spectrum.sigma_max, torch.max),
    )


class SpectrumTracker:
    """Spectra of every hidden-to-hidden matrix (:mod:`~lightning_gradhealth.spectra`): sigma_max by
    warm-started iteration on every logging step; on full passes every singular value and
    eigenvalue, their histograms and the eigenvalue picture.

    The weights are those the step's gradients were computed with (before the update), so
    step 0 shows the matrices right after init.

    Attributes:
        spectra: ``{parameter name: MatrixSpectrum}`` of the latest full pass.
        start_summaries: ``{LayerKey: SpectrumSummary}``, each square matrix at the run's first full pass.
    """

    def __init__(self, notices: Notices) -> None:
        self.notices = notices
        self.spectra: dict[str, MatrixSpectrum] = {}
        self.start_summaries: dict[LayerKey, SpectrumSummary] = {}
        self._sigma_max: dict[str, SigmaMaxTracker] = {}

    def update(self, records: Sequence[WeightRecord], step: int, full: bool, pictures: bool = False) -> StepOutput:
        """Measure every recurrent matrix in ``records``; a full pass when ``full``, with the
        eigenvalue pictures when ``pictures``."""
        output = StepOutput()
        for record in records:
            if record.role != "recurrent":
                continue
            if full:
                spectrum = full_spectrum(record.tensor, len(record.gates))
                self.spectra[record.full_name] = spectrum
                if not record.projection:
                    self.start_summaries.setdefault(record.layer_key, summarize_spectrum(spectrum, step))
                output.update(self._full_output(record, spectrum, step, pictures))
            else:
                sigma_max = self._sigma_max.setdefault(record.full_name, SigmaMaxTracker())(record.tensor, len(record.gates))
                output.update(self._scalars(record, {"sigma_max": sigma_max.tolist()}, torch.isfinite(sigma_max).tolist(), step))
        return output

    def end_of_fit(self, records: Sequence[WeightRecord], step: int, pictures: bool) -> StepOutput:
        """The scalars and histograms of the final spectra taken by :meth:`finish` (and their
        pictures when ``pictures``), for the step the fit ends at."""
        output = StepOutput()
        for record in records:
            spectrum = self.spectra.get(record.full_name)
            if record.role == "recurrent" and not record.projection and spectrum is not None:
                output.update(self._full_output(record, spectrum, step, pictures))
        return output

    def _full_output(self, record: WeightRecord, spectrum: MatrixSpectrum, step: int, pictures: bool) -> StepOutput:
        """One matrix's full-pass scalars per gate, histograms and (``pictures``) eigenvalue picture."""
        # non-square blocks (an LSTM's weight_hh with proj_size, its weight_hr) have no eigenvalues: no radius is logged
        without = ("spectral_radius", "outside_unit_circle") if spectrum.eigenvalues is None else ()
        values = {name: getattr(spectrum, name).tolist() for name in tags.SPECTRUM_SCALARS if name not in without}
        output = self._scalars(record, values, spectrum.finite.tolist(), step)
        output.update(self._distributions(record, spectrum, pictures))
        return output

    def _scalars(self, record: WeightRecord, values: dict[str, list[float]], finite: list[bool], step: int) -> StepOutput:
        """Per-gate scalars of one matrix, the finite ones only (a logger cannot draw NaN/Inf: the
        condition number of a singular block is left out); its NaN/Inf gate blocks counted and
        named once."""
        output = StepOutput()
        for name, per_gate in values.items():
            output.scalars.update(
                {tags.gate_tag(record.layer_key, gate, name): v for gate, v in zip(record.gates, per_gate) if math.isfinite(v)}
            )
        if not all(finite):
            bad = [gate for gate, ok in zip(record.gates, finite) if not ok]
            output.scalars[tags.layer_tag(record.layer_key, "nonfinite_weight_blocks")] = float(len(bad))
            self.notices.say(
                (record.full_name, "weights"),
                f"{record.full_name} holds NaN/Inf in gate blocks {', '.join(bad)} at step {step}; their spectra "
                f"are NaN and not logged ({tags.layer_tag(record.layer_key, 'nonfinite_weight_blocks')} counts them).",
            )
        return output

    @staticmethod
    def _distributions(record: WeightRecord, spectrum: MatrixSpectrum, pictures: bool) -> StepOutput:
        """Histograms of the singular values and eigenvalue moduli per gate, and (``pictures``) the eigenvalue picture."""
        output = StepOutput()
        for index, gate in enumerate(record.gates):
            output.histograms[tags.gate_tag(record.layer_key, gate, "singular_values")] = spectrum.singular_values[index]
            if spectrum.eigenvalues is not None:
                output.histograms[tags.gate_tag(record.layer_key, gate, "eigenvalue_moduli")] = spectrum.eigenvalues[index].abs()
        if pictures and spectrum.eigenvalues is not None:
            chart = EigenvalueChart(spectrum.eigenvalues, record.gates, str(record.layer_key))
            output.pictures[tags.layer_tag(record.layer_key, "eigenvalues")] = chart
        return output

    def finish(self, records: Sequence[WeightRecord]) -> None:
        """The full spectra of the final weights of every square recurrent matrix."""
        for record in records:
            if record.role == "recurrent" and not record.projection:
                self.spectra[record.full_name] = full_spectrum(record.tensor, len(record.gates))

    def start_run(self, start_step: Optional[int]) -> None:
        """A new or restarted run records its own start-of-run spectra; ``None`` (resumed) keeps them."""
        if start_step is not None:
            self.start_summaries = {}

    def reset(self) -> None:
        """Forget the latest full spectra."""
        self.spectra = {}

    def state_dict(self) -> dict[str, Any]:
        """The start-of-run spectra and the warm-start vectors of the sigma_max iteration."""
        return {
            "start": [{"key": key.to_dict(), **vars(summary)} for key, summary in self.start_summaries.items()],
            "sigma_max": {name: tracker.state_dict() for name, tracker in self._sigma_max.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> IncompatibleState:
        def load_start(entries: Sequence[Mapping[str, Any]]) -> None:
            self.start_summaries = {
                LayerKey.from_dict(entry["key"]): SpectrumSummary(
                    _count(entry["step"]), float(entry["spectral_radius"]), float(entry["sigma_min"]), float(entry["sigma_max"])
                )
                for entry in entries
            }

        def load_sigma_max(states: Mapping[str, Any]) -> None:
            trackers = {str(name): SigmaMaxTracker() for name in states}
            for name, tracker_state in states.items():
                trackers[str(name)].load_state_dict(tracker_state)
            self._sigma_max = trackers

        return _restore(state_dict, {"start": load_start, "sigma_max": load_sigma_max})


@dataclass(frozen=True)
class OtherClipping:
    """Clipping that something other than GradHealth applies after GradHealth has seen the
    gradients (Lightning's ``Trainer(gradient_clip_val=...)``), so that the report says who
    clips, at what value and how often.

    Attributes:
        who: in words, e.g. ``"the Trainer (gradient_clip_val=0.5, gradient_clip_algorithm='norm')"``.
        clip: ``"norm"`` (the total 2-norm above ``clip_val`` is scaled down) or ``"value"``
            (elements beyond ``clip_val`` are clamped).
        clip_val: the threshold.
    """

    who: str
    clip: str
    clip_val: float


@dataclass
class _PendingFlags:
    """NaN/Inf flags of one optimizer's parameters accumulated on the device since the last read."""

    parameters: list[Tensor]
    flagged: Tensor
    steps: Tensor


class GradientTracker:
    """The complete gradients of each optimizer step (:mod:`~lightning_gradhealth.clipping`): the
    NaN/Inf policy, clipping and its statistics, gradient norms, and the clip threshold suggestion.

    Attributes:
        nonfinite_steps: optimizer steps whose gradients held NaN/Inf.
        skipped_steps: those skipped (``on_nonfinite="skip"``).
        clip_steps: optimizer steps taken with ``clip`` on.
        caller_checked_steps: logging steps given the norm before the caller's own clipping
            (``grad_norm``), compared with the norm at the optimizer step.
        caller_clipped_steps: those on which the caller's clipping lowered it.
        latest_clip_stats: the :class:`~lightning_gradhealth.clipping.ClipStats` of the latest clipped step.
        clip_suggester: the running statistics behind the suggested ``clip_val``.
    """

    def __init__(self, config: MonitorConfig, notices: Notices) -> None:
        self.config = config
        self.notices = notices
        self.distributed = Distributed()
        self.clip_suggester = ClipThresholdSuggester()
        self.latest_clip_stats: Optional[ClipStats] = None
        self.nonfinite_steps = self.skipped_steps = self.clip_steps = 0
        self._clipped_total: Any = 0
        self._clip_windows: dict[str, tuple[Any, int]] = {}  # per optimizer, since its last logging step
        self._pending: dict[int, _PendingFlags] = {}
        self._param_names: dict[int, str] = {}
        self._nonfinite_named: set[str] = set()  # parameters already named in a NaN/Inf notice
        self.other_clipping: Optional[OtherClipping] = None
        self.other_clip_steps = 0
        self._other_clipped: Any = 0
        self.caller_checked_steps = self.caller_clipped_steps = 0

    def start_run(
        self,
        model: nn.Module,
        distributed: Distributed,
        start_step: Optional[int],
        other_clipping: Optional[OtherClipping] = None,
    ) -> None:
        """Bind to ``model``'s parameter names, the run's processes and the clipping that follows
        GradHealth's (if any). A run from scratch (``start_step`` 0) also forgets the counts of
        an earlier one; a resumed run (``None``) keeps the clip window its checkpoint holds."""
        self._param_names = {id(param): name for name, param in model.named_parameters()}
        self.distributed = distributed
        self.other_clipping = other_clipping
        self._pending.clear()
        if start_step == 0:
            self.reset()
        if start_step is not None:
            self._clip_windows.clear()

    def update(
        self,
        parameters: Sequence[Tensor],
        step: int,
        plan: StepPlan,
        layer_parameters: Mapping[LayerKey, list[Tensor]],
        optimizer: str = "",
        amp_scaler_active: bool = False,
        grad_norm: Optional[Tensor] = None,
    ) -> StepOutput:
        """Check, measure and clip the complete gradients of ``parameters`` (one optimizer's).

        ``grad_norm``, when given, is the total norm of these gradients before anything clipped
        them (the user's own clipping ran before this call): it is what is logged as the total
        and what the clip suggestion learns from.

        Only finite values are logged. On a step whose gradients hold NaN/Inf (``on_nonfinite="warn"``,
        or under an AMP scaler, which skips such steps itself) the total norm, the clipping's
        norms and coefficient, and the NaN/Inf per-layer norms are left out: the step is counted
        in ``gradhealth/nonfinite/steps`` (by the check that runs first), and the clip suggestion
        does not count a non-finite norm
        (:class:`~lightning_gradhealth.clipping.ClipThresholdSuggester`).

        Raises:
            NonFiniteGradientError: ``on_nonfinite="raise"`` and a gradient holds NaN/Inf.
        """
        output = StepOutput()
        parameters = list(parameters)
        if self._check_nonfinite(parameters, step, amp_scaler_active, plan.log_gradients):
            output.skip_step = True
            return output
        norm_type = self.config.clip_norm_type
        at_step: Optional[Tensor] = None  # the total norm as this call finds the gradients
        if self.other_clipping is not None:
            counted_norm, counted_type = self._count_other_clipping(parameters)
            if counted_type == norm_type:
                at_step = counted_norm  # the same total: not computed twice
        if plan.log_gradients and layer_parameters:
            norms = self.distributed.global_norms(group_grad_norms(layer_parameters, norm_type), norm_type).tolist()
            output.scalars.update(
                {tags.layer_tag(key, "weight_grad_norm"): n for key, n in zip(layer_parameters, norms) if math.isfinite(n)}
            )
        if self.config.clip is not None:
            output.scalars.update(self._clip(parameters, plan.log_gradients, optimizer, grad_norm))
        elif plan.log_gradients:
            if at_step is None:
                at_step = torch.linalg.vector_norm(grad_norms(parameters, norm_type), norm_type)
                at_step = self.distributed.global_norms(at_step, norm_type)
            total = at_step if grad_norm is None else grad_norm
            total_value = float(total)
            if math.isfinite(total_value):
                self.clip_suggester.update(total)
                if grad_norm is not None:
                    self._count_caller_clipping(grad_norm, at_step)
                output.scalars[tags.grad_norm_tag("total", optimizer)] = total_value
        if plan.measure:
            output.scalars[tags.NONFINITE_STEPS] = float(self.nonfinite_steps)
            output.scalars[tags.NONFINITE_SKIPPED_STEPS] = float(self.skipped_steps)
        return output

    def _clip(self, parameters: list[Tensor], log: bool, optimizer: str, grad_norm: Optional[Tensor]) -> dict[str, float]:
        """Clip as configured; count the step in the optimizer's window; its scalars on logging steps
        (``grad_norm``: the norm before the user's own clipping, if any)."""
        config = self.config
        reduce_norm = None
        if self.distributed.all_reduce is not None:
            reduce_norm = lambda norms: self.distributed.global_norms(norms, config.clip_norm_type)  # noqa: E731
        assert config.clip is not None and config.clip_val is not None
        stats = clip_grads_(parameters, config.clip, config.clip_val, config.clip_norm_type, reduce_norm=reduce_norm)
        self.latest_clip_stats = stats
        self.clip_suggester.update(stats.norm_before if grad_norm is None else grad_norm)
        clipped = stats.clipped.long()
        window_clipped, window_steps = self._clip_windows.get(optimizer, (0, 0))
        window_clipped, window_steps = window_clipped + clipped, window_steps + 1
        self._clipped_total = self._clipped_total + clipped
        self.clip_steps += 1
        self._clip_windows[optimizer] = (window_clipped, window_steps)
        if not log:
            return {}
        del self._clip_windows[optimizer]
        fraction = {tags.clip_tag("clipped_steps_fraction", optimizer): float(window_clipped) / window_steps}
        values = stats.to_floats()
        total = values["norm_before"] if grad_norm is None else float(grad_norm)
        if not (math.isfinite(total) and math.isfinite(values["norm_before"])):
            return fraction  # NaN/Inf gradients: no norm, and no coefficient computed from one
        if grad_norm is not None:
            self._count_caller_clipping(grad_norm, stats.norm_before)
        return {
            tags.grad_norm_tag("total", optimizer): total,
            tags.grad_norm_tag("total_clipped", optimizer): values["norm_after"],
            tags.clip_tag("coefficient", optimizer): values["coefficient"],
            **fraction,
        }

    def _count_caller_clipping(self, before: Tensor, at_step: Tensor) -> None:
        """Count a logging step whose norm before the caller's own clipping (``before``) is known,
        and whether the norm the optimizer step finds (``at_step``) is lower by more than
        :data:`~lightning_gradhealth.defaults.CALLER_CLIPPING_RTOL` (one sync, logging steps only)."""
        self.caller_checked_steps += 1
        self.caller_clipped_steps += int(at_step < before * (1 - CALLER_CLIPPING_RTOL))

    @property
    def clipped_steps(self) -> int:
        """Optimizer steps clipped so far (of :attr:`clip_steps` steps with ``clip`` on); one sync."""
        return int(self._clipped_total)

    def _count_other_clipping(self, parameters: list[Tensor]) -> tuple[Tensor, float]:
        """Count whether the clipping after GradHealth's (:attr:`other_clipping`) clips these
        gradients: their total 2-norm, or their largest element, beyond its threshold (one fused
        norm on the device, no host sync). Returns that total and its norm type."""
        other = self.other_clipping
        assert other is not None
        norm_type = 2.0 if other.clip == "norm" else math.inf
        total = self.distributed.global_norms(torch.linalg.vector_norm(grad_norms(parameters, norm_type), norm_type), norm_type)
        self._other_clipped = self._other_clipped + (total > other.clip_val).long()
        self.other_clip_steps += 1
        return total, norm_type

    @property
    def other_clipped_steps(self) -> int:
        """Optimizer steps that :attr:`other_clipping` clipped so far (of :attr:`other_clip_steps`); one sync."""
        return int(self._other_clipped)

    def _check_nonfinite(self, parameters: list[Tensor], step: int, amp_scaler_active: bool, log: bool) -> bool:
        """One fused NaN/Inf check of the gradients; apply ``on_nonfinite``. True: skip the step.

        With ``"warn"`` the flags accumulate on the device and are read on logging steps only,
        so a healthy step costs no host sync; ``"skip"`` and ``"raise"`` must read them every
        step (one sync). Under 16-mixed the GradScaler skips such steps itself and lowers its
        scale: they are counted, never acted on, so the two never fight.
        """
        if not parameters:
            return False
        flagged = nonfinite_grads(parameters)
        any_flagged = flagged.any()
        if self.distributed.all_reduce is not None:  # sharded gradients: one decision for all processes
            any_flagged = self.distributed.all_reduce(any_flagged.float(), "max") > 0
        if self.config.on_nonfinite == "warn" or amp_scaler_active:
            pending = self._pending.get(id(parameters[0]))
            if pending is not None:
                flagged, steps = pending.flagged | flagged, pending.steps + any_flagged
            else:
                steps = any_flagged.long()
            self._pending[id(parameters[0])] = _PendingFlags(parameters, flagged, steps)
            if log:
                self.read_pending(step, warn=not amp_scaler_active)
            return False
        if not bool(any_flagged):
            return False
        self.nonfinite_steps += 1
        described, count = self._describe(parameters, flagged)
        if self.config.on_nonfinite == "raise":
            raise NonFiniteGradientError(
                f"GradHealth: non-finite gradients (NaN/Inf) at step {step} in {count} parameters: {described}. "
                "Training stopped before the optimizer step, so the weights are still finite."
            )
        for param in parameters:
            param.grad = None
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            self.notices.say(
                "skipped",
                f"skipped the optimizer step at step {step}: non-finite gradients in {count} "
                f"parameters ({described}). Later skips are counted in {tags.NONFINITE_SKIPPED_STEPS}.",
            )
        return True

    def _describe(self, parameters: list[Tensor], flagged: Tensor) -> tuple[str, int]:
        """The names of the flagged parameters (the first five, then a count), and how many there are."""
        names = [
            self._param_names.get(id(p), f"<parameter {index}>")
            for index, (p, bad) in enumerate(zip(parameters, flagged.tolist()))
            if bad
        ]
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else ""), len(names)

    def read_pending(self, step: int, warn: bool) -> None:
        """Read the accumulated NaN/Inf flags (one sync), count the steps, warn once per parameter."""
        for pending in self._pending.values():
            self.nonfinite_steps += int(pending.steps)
            if not warn or not bool(pending.flagged.any()):
                continue
            names = {self._param_names.get(id(p), "") for p, bad in zip(pending.parameters, pending.flagged.tolist()) if bad}
            if not names - self._nonfinite_named:
                continue
            self._nonfinite_named |= names
            described, count = self._describe(pending.parameters, pending.flagged)
            self.notices.warn(
                f"GradHealth: non-finite gradients (NaN/Inf) in {count} parameters by step {step}: {described}. "
                "The optimizer steps went ahead (on_nonfinite='warn'); on_nonfinite='skip' drops such steps."
            )
        self._pending.clear()

    def reset(self) -> None:
        """Forget the counts and statistics of an earlier run."""
        old = self.clip_suggester  # a fresh one with the same settings
        self.clip_suggester = ClipThresholdSuggester(old.multiple, old.min_updates, percentile=old.percentile, window=old.window)
        self.latest_clip_stats = None
        self.nonfinite_steps = self.skipped_steps = self.clip_steps = 0
        self._clipped_total = 0
        self._clip_windows.clear()
        self._nonfinite_named.clear()
        self.other_clip_steps, self._other_clipped = 0, 0
        self.caller_checked_steps = self.caller_clipped_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters, the open clip windows and the clip suggester's statistics."""
        return {
            # with on_nonfinite="warn" the flags of the steps since the last logging step are
            # still on the device: count them, or a checkpoint taken now would lose them
            "nonfinite_steps": self.nonfinite_steps + sum(int(pending.steps) for pending in self._pending.values()),
            "skipped_steps": self.skipped_steps,
            "clipped_steps": self.clipped_steps,
            "clip_steps": self.clip_steps,
            "clip_windows": {name: [int(clipped), steps] for name, (clipped, steps) in self._clip_windows.items()},
            "clip_suggester": self.clip_suggester.state_dict(),
            "other_clipped_steps": self.other_clipped_steps,
            "other_clip_steps": self.other_clip_steps,
            "caller_clipped_steps": self.caller_clipped_steps,
            "caller_checked_steps": self.caller_checked_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> IncompatibleState:
        def setter(name: str) -> Callable[[Any], None]:
            return lambda value: setattr(self, name, _count(value))

        def load_windows(windows: Mapping[str, Sequence[int]]) -> None:
            loaded = {str(name): (_count(clipped), _count(steps)) for name, (clipped, steps) in windows.items()}
            if any(clipped > steps or steps == 0 for clipped, steps in loaded.values()):
                raise ValueError("a clip window counts more clipped steps than steps")
            self._clip_windows = loaded

        return _restore(
            state_dict,
            {
                "nonfinite_steps": setter("nonfinite_steps"),
                "skipped_steps": setter("skipped_steps"),
                "clipped_steps": setter("_clipped_total"),
                "clip_steps": setter("clip_steps"),
                "clip_windows": load_windows,
                "clip_suggester": self.clip_suggester.load_state_dict,
                "other_clipped_steps": setter("_other_clipped"),
                "other_clip_steps": setter("other_clip_steps"),
                "caller_clipped_steps": setter("caller_clipped_steps"),
                "caller_checked_steps": setter("caller_checked_steps"),
            },
        )


def layer_parameters(records: Sequence[WeightRecord], stepped: Sequence[Tensor]) -> dict[LayerKey, list[Tensor]]:
    """The parameters of each recurrent layer that are among ``stepped`` (one optimizer's)."""
    ids = {id(param) for param in stepped}
    grouped: dict[LayerKey, list[Tensor]] = defaultdict(list)
    for record in records:
        if id(record.tensor) in ids:
            grouped[record.layer_key].append(record.tensor)
    return dict(grouped)
