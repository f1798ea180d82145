"""GradHealthMonitor: the measuring engine behind :class:`~lightning_gradhealth.GradHealth`,
usable from any PyTorch training loop (plain PyTorch, Lightning Fabric).

One object holds the schedule and everything measured so far. Per optimizer step a loop calls

1. :meth:`~GradHealthMonitor.start_step` before the forward pass (on a sampled step it arms the
   timestep probe, otherwise it only checks a counter);
2. :meth:`~GradHealthMonitor.stop_capture` before ``backward()``;
3. :meth:`~GradHealthMonitor.before_optimizer_step` once the gradients are complete (and
   AMP-unscaled), before ``optimizer.step()``: it measures, checks for NaN/Inf, clips, and
   returns what to log as a :class:`StepOutput`.

At the end, :meth:`~GradHealthMonitor.finish` gives the :class:`~lightning_gradhealth.health.HealthReport`.
Nothing here needs Lightning; the callback only calls these methods from its hooks and sends
the outputs to the Trainer's loggers.

Example::

    from torch.utils.tensorboard import SummaryWriter
    from lightning_gradhealth import GradHealthMonitor, initialize_, write_step_output

    monitor = GradHealthMonitor(log_every_n_steps=50, clip="norm", clip_val=1.0)
    monitor.attach(model)
    monitor.record_init(initialize_(model, "orthogonal"))   # optional: init, noted in the report
    writer = SummaryWriter("runs/plain")
    for step, (x, y) in enumerate(loader):
        monitor.start_step(step)
        loss = loss_fn(model(x), y)
        monitor.stop_capture()
        loss.backward()
        output = monitor.before_optimizer_step(step, list(model.parameters()))
        write_step_output(writer, output, step)
        optimizer.step()
        optimizer.zero_grad()
    print(monitor.finish(step).format())
    monitor.detach()
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_gradhealth._validation import check_pattern_list, check_positive_finite, check_positive_int_or_none
from lightning_gradhealth.bptt import TimestepProbe
from lightning_gradhealth.clipping import (
    ClipStats,
    ClipThresholdSuggester,
    clip_grads_,
    grad_norms,
    group_grad_norms,
    nonfinite_grads,
    validate_clip_args,
)
from lightning_gradhealth.figures import timestep_curve_image, timestep_heatmap_image
from lightning_gradhealth.health import (
    HealthReport,
    LayerHealth,
    SpectrumSummary,
    TimestepSummary,
    diagnose_timesteps,
    layer_verdict,
    summarize_timesteps,
)
from lightning_gradhealth.initialize import InitRecord
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights, fused_layer_keys, parametrized_weights
from lightning_gradhealth.spectra import MatrixSpectrum, SigmaMaxTracker, eigenvalue_image, full_spectrum

__all__ = ["NONFINITE_POLICIES", "GradHealthMonitor", "NonFiniteGradientError", "StepOutput"]

NONFINITE_POLICIES = ("warn", "skip", "raise")

_HINTS = {
    "vanishing": "what usually helps: orthogonal or identity init of the recurrent matrices "
    "(GradHealth(init=\"orthogonal\")), an LSTM or GRU instead of a plain RNN, chrono biases for "
    "long dependencies (chrono_t_max=T), or a shorter sequence / truncated BPTT",
    "exploding": "what usually helps: gradient clipping (GradHealth(clip=\"norm\", clip_val=1.0)), orthogonal "
    "init of the recurrent matrices (GradHealth(init=\"orthogonal\")), a lower learning rate",
    "nonfinite": "the gradient through time is NaN or Inf: check the loss, the learning rate and the "
    "input data; clipping and a lower learning rate usually help",
}


class NonFiniteGradientError(FloatingPointError):
    """Raised with ``on_nonfinite="raise"`` before an optimizer step with NaN/Inf gradients."""


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


@dataclass
class StepOutput:
    """What one optimizer step produced for the logs.

    Attributes:
        scalars: tag -> value, for every logger (empty on steps that are not logging steps).
        histograms: tag -> 1-D tensor of values, for TensorBoard.
        images: tag -> ``(H, W, 3)`` uint8 picture, for TensorBoard.
        skip_step: the gradients held NaN/Inf and ``on_nonfinite="skip"`` set them to ``None``:
            ``optimizer.step()`` leaves those parameters and their optimizer state as they are.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Tensor] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    skip_step: bool = False


class GradHealthMonitor:
    """Measures the gradient health of a model's recurrent layers on a schedule.

    Every ``log_every_n_steps`` optimizer steps: the exact ||dL/dh_t|| at every timestep of every
    recurrent layer (:mod:`~lightning_gradhealth.bptt`) and its summaries
    (:mod:`~lightning_gradhealth.health`), sigma_max of every hidden-to-hidden matrix, the true
    gradient norm and each recurrent layer's weight-gradient norm. Every ``full_every_n_steps``:
    the full spectra (:mod:`~lightning_gradhealth.spectra`), their histograms, an eigenvalue
    picture and the timestep pictures. Every step: the NaN/Inf check and, with ``clip``, clipping
    (:mod:`~lightning_gradhealth.clipping`). A step that is not sampled costs a counter check,
    the fused NaN/Inf check and the clipping, if any.

    The arguments have the meaning they have in :class:`~lightning_gradhealth.GradHealth`; its
    attributes of the same names (``timestep_grad_norms``, ``spectra``, ...) are this object's.
    ``init_schemes`` (layer key -> what init wrote to its hidden-to-hidden matrix) is filled by
    :meth:`record_init`, for the report.
    ``warn`` receives every notice (default :func:`warnings.warn`; the callback passes Lightning's
    rank-zero warning). Measurements never stop training: what cannot be measured is named once.

    Sharded parameters (FSDP, where each process holds a flat 1-D piece of every parameter
    outside forward and backward) need two more attributes, which the callback sets:
    ``full_parameters``, a context manager factory under which every parameter is whole (the
    probe and the spectra run inside it on logging steps, on every process at once), and
    ``all_reduce(tensor, op)`` with ``op`` ``"sum"`` or ``"max"`` over all processes (gradient
    norms, the clipping norm and the NaN/Inf decision then cover the whole model, and every
    process takes the same decision).

    Raises:
        ValueError: at construction, for an invalid interval, threshold, clip setting or policy.
    """

    history_size = 256

    def __init__(
        self,
        *,
        custom: Optional[Mapping[str, int]] = None,
        timesteps: bool = True,
        custom_cells: Optional[Sequence[str]] = None,
        log_every_n_steps: int = 50,
        full_every_n_steps: Optional[int] = None,
        vanish_below: float = 1e-3,
        explode_above: float = 1e3,
        horizon_factor: float = 1e3,
        clip: Optional[Literal["norm", "value", "agc"]] = None,
        clip_val: Optional[float] = None,
        clip_norm_type: float = 2.0,
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        warn: Callable[[str], None] = _warn,
    ) -> None:
        for name, value in (("vanish_below", vanish_below), ("explode_above", explode_above), ("horizon_factor", horizon_factor)):
            check_positive_finite(name, value)
        check_pattern_list("custom_cells", custom_cells)
        self.clip, self.clip_val, self.clip_norm_type = validate_clip_args(clip, clip_val, clip_norm_type)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {on_nonfinite!r}")
        self.custom = dict(custom) if custom else None
        self.timesteps = timesteps
        self.custom_cells = list(custom_cells or [])
        self.vanish_below = vanish_below
        self.explode_above = explode_above
        self.horizon_factor = horizon_factor
        self.on_nonfinite = on_nonfinite
        self.warn = warn
        self.log_every_n_steps: int
        self.full_every_n_steps: int
        self.set_schedule(log_every_n_steps, full_every_n_steps)

        self.recurrent_weights: list[WeightRecord] = []
        self.timestep_grad_norms: dict[str, Tensor] = {}
        self.timestep_summaries: dict[str, TimestepSummary] = {}
        self.timestep_history: dict[str, list[tuple[int, np.ndarray]]] = {}
        self.saturation: dict[str, float] = {}
        self.spectra: dict[str, MatrixSpectrum] = {}
        self.spectra_start: dict[str, SpectrumSummary] = {}
        self.clip_suggester = ClipThresholdSuggester()
        self.latest_clip_stats: Optional[ClipStats] = None
        self.init_schemes: dict[str, str] = {}
        self.nonfinite_steps = 0
        self.skipped_steps = 0
        self.clip_steps = 0
        self._probe: Optional[TimestepProbe] = None
        self._sigma_trackers: dict[str, SigmaMaxTracker] = {}
        self._armed_step: Optional[int] = None
        self._logged_step: Optional[int] = None
        self._warned: set[tuple[str, str]] = set()
        self._param_names: dict[int, str] = {}
        self._nonfinite_named: set[str] = set()
        self._pending_nonfinite: dict[int, tuple[list[Tensor], Tensor, Tensor]] = {}
        self._gradients_logged: dict[str, int] = {}
        self._clip_windows: dict[str, tuple[Any, int]] = {}
        self._clipped_total: Any = 0
        self.full_parameters: Callable[[], ContextManager[Any]] = nullcontext
        self.all_reduce: Optional[Callable[[Tensor, str], Tensor]] = None

    def set_schedule(self, log_every_n_steps: int, full_every_n_steps: Optional[int] = None) -> None:
        """Measure every ``log_every_n_steps`` steps; full passes every ``full_every_n_steps``
        (default 20 x ``log_every_n_steps``), rounded up to a multiple of the logging interval."""
        check_positive_int_or_none("log_every_n_steps", log_every_n_steps)
        check_positive_int_or_none("full_every_n_steps", full_every_n_steps)
        if log_every_n_steps is None:
            raise ValueError("log_every_n_steps must be a positive integer, got None")
        full = full_every_n_steps or 20 * log_every_n_steps
        self.log_every_n_steps = log_every_n_steps
        self.full_every_n_steps = -(-full // log_every_n_steps) * log_every_n_steps

    def attach(self, model: nn.Module, start_step: Optional[int] = 0) -> None:
        """Find the recurrent layers of ``model`` and attach the timestep probe's forward hooks.

        Args:
            model: the model to watch; its layers must all exist (after ``configure_model``).
            start_step: the step this run starts at: history from that step on is dropped, so a
                new run starts a new heatmap; ``None`` for a resumed run, which keeps it all.

        Raises:
            ValueError: a ``custom`` or ``custom_cells`` pattern matches nothing, or a gate count
                does not divide its matrix.
        """
        self.detach()
        self.recurrent_weights = find_recurrent_weights(model, self.custom)
        if self.timesteps:
            self._probe = TimestepProbe(model, self.custom_cells)
        if not self.recurrent_weights and not (self._probe and (self._probe.fused or self._probe.cells)):
            self.warn(
                f"GradHealth found no recurrent layer (nn.RNN/LSTM/GRU, nn.*Cell or a `custom` pattern) "
                f"in {type(model).__name__}; training proceeds untouched."
            )
        left_out = parametrized_weights(model)
        if left_out:
            self.warn(
                f"GradHealth leaves out the parametrized weights {', '.join(left_out)}: their parametrization "
                "defines them, so init does not write them and their spectra are not tracked; dL/dh_t is measured."
            )
        self._param_names = {id(param): name for name, param in model.named_parameters()}
        self._logged_step = self._armed_step = None
        self._gradients_logged.clear()
        self._pending_nonfinite.clear()
        if start_step == 0:  # a new run from scratch: nothing of an earlier run's counts or verdicts
            self._reset_run()
        if start_step is not None:  # a resumed run keeps the clip window its checkpoint holds
            self._clip_windows.clear()
            self.spectra_start = {}
            for key in list(self.timestep_history):
                self.timestep_history[key] = [(s, norms) for s, norms in self.timestep_history[key] if s < start_step]
        if self._probe is not None:
            self._probe.attach()

    def _reset_run(self) -> None:
        """Forget the measurements, counters and notices of an earlier run."""
        self.timestep_grad_norms, self.timestep_summaries, self.saturation = {}, {}, {}
        self.spectra = {}
        self.clip_suggester = ClipThresholdSuggester(self.clip_suggester.multiple, self.clip_suggester.min_updates)
        self.latest_clip_stats = None
        self.nonfinite_steps = self.skipped_steps = self.clip_steps = 0
        self._clipped_total = 0
        self._warned.clear()
        self._nonfinite_named.clear()

    def detach(self) -> None:
        """Remove every hook and drop what was captured: the model runs at full speed and pickles."""
        if self._probe is not None:
            self._probe.detach()
            self._probe = None
        self._armed_step = None

    def record_init(self, init_report: Sequence[InitRecord]) -> None:
        """Note what :func:`~lightning_gradhealth.initialize_` wrote, for the report's ``init`` column."""
        self.init_schemes = {
            record.layer_key: record.scheme
            for record in init_report
            if record.role == "recurrent" and not record.parameter.rpartition(".")[2].startswith("weight_hr")
        }

    @property
    def layer_keys(self) -> list[str]:
        """The layer keys found by :meth:`attach` (recurrent matrices and probed layers), in model order."""
        keys = [record.layer_key for record in self.recurrent_weights if record.role == "recurrent"]
        if self._probe is not None:
            for name, module in self._probe.fused.items():
                keys += fused_layer_keys(name, module)
            keys += list(self._probe.cells)
        return list(dict.fromkeys(keys))

    def is_logging_step(self, step: int) -> bool:
        """Whether ``step`` is measured: a multiple of ``log_every_n_steps``."""
        return step % self.log_every_n_steps == 0

    def start_step(self, step: int) -> None:
        """Call before the forward pass of ``step``: on a sampled step, arm the probe.

        A capture left over from a window that ended without an optimizer step (a skipped batch)
        is dropped first.
        """
        if self._probe is None:
            return
        if self._probe.has_captures and not (step == self._armed_step and self._probe.has_gradients):
            self._probe.release()
        if self.is_logging_step(step) and not self._probe.has_captures:
            self._probe.arm()
            self._armed_step = step

    def stop_capture(self) -> None:
        """Call before ``backward()``: later forward passes (activation checkpointing's replays,
        further micro-batches) run unwatched."""
        if self._probe is not None:
            self._probe.disarm()

    def before_optimizer_step(
        self,
        step: int,
        parameters: Sequence[Tensor],
        *,
        grad_scale: float = 1.0,
        amp_scaler_active: bool = False,
        pictures: bool = True,
        optimizer_name: str = "",
    ) -> StepOutput:
        """Measure, check and clip the complete gradients of ``parameters`` at ``step``.

        Args:
            step: the optimizer step (the value loggers put on the x axis).
            parameters: the parameters this optimizer updates.
            grad_scale: the AMP loss scale the backward pass ran with (1.0 without AMP); the
                gradients themselves must already be unscaled.
            amp_scaler_active: a GradScaler skips non-finite steps itself: they are only counted.
            pictures: compute histograms and pictures on full steps (``False`` when nothing
                would write them).
            optimizer_name: with several optimizers, a name for this one (e.g. ``"optimizer_1"``):
                its gradient scalars go under ``gradhealth/grad_norm/<name>/...`` and
                ``gradhealth/clip/<name>/...``. The probe and the spectra run once per step,
                at the first optimizer that steps.

        Raises:
            NonFiniteGradientError: ``on_nonfinite="raise"`` and a gradient holds NaN/Inf;
                raised before any weight changes.
        """
        output = StepOutput()
        measuring_step = self.is_logging_step(step) and step != self._logged_step
        if measuring_step:
            self._logged_step = step
        full = measuring_step and step % self.full_every_n_steps == 0
        with self.full_parameters() if measuring_step else nullcontext():
            if self._probe is not None and self._probe.has_captures:
                norms = self._probe.compute(grad_scale=grad_scale)
                self._guarded("timesteps", self._record_timesteps, output, norms, step, pictures and full)
            if self._probe is not None and measuring_step:
                self._probe_notices()
            if measuring_step:
                self._guarded("spectra", self._record_spectra, output, step, full, pictures)
        logging_step = self.is_logging_step(step) and self._gradients_logged.get(optimizer_name) != step
        if logging_step:
            self._gradients_logged[optimizer_name] = step
        group = f"/{optimizer_name}" if optimizer_name else ""
        parameters = list(parameters)
        if self._check_nonfinite(parameters, step, amp_scaler_active, logging_step):
            output.skip_step = True
            return output
        scalars = output.scalars
        if logging_step:
            layer_params = defaultdict(list)
            stepped = {id(param) for param in parameters}
            for record in self.recurrent_weights:
                if id(record.parameter) in stepped:
                    layer_params[record.layer_key].append(record.parameter)
            if layer_params:
                norms = self._global_norms(group_grad_norms(layer_params, self.clip_norm_type)).tolist()
                scalars.update({f"gradhealth/{key}/weight_grad_norm": norm for key, norm in zip(layer_params, norms)})
        if self.clip is not None:
            reduce_norm = self._global_norms if self.all_reduce is not None else None
            stats = clip_grads_(parameters, self.clip, self.clip_val, self.clip_norm_type, reduce_norm=reduce_norm)
            self.latest_clip_stats = stats
            self.clip_suggester.update(stats.norm_before)
            clipped = stats.clipped.long()
            window_clipped, window_steps = self._clip_windows.get(optimizer_name, (0, 0))
            window_clipped, window_steps = window_clipped + clipped, window_steps + 1
            self._clipped_total = self._clipped_total + clipped
            self.clip_steps += 1
            self._clip_windows[optimizer_name] = (window_clipped, window_steps)
            if logging_step:
                values = stats.to_floats()
                scalars.update(
                    {
                        f"gradhealth/grad_norm{group}/total": values["norm_before"],
                        f"gradhealth/grad_norm{group}/total_clipped": values["norm_after"],
                        f"gradhealth/clip{group}/coefficient": values["coefficient"],
                        f"gradhealth/clip{group}/clipped_steps_fraction": float(window_clipped) / window_steps,
                    }
                )
                del self._clip_windows[optimizer_name]
        elif logging_step:
            total = torch.linalg.vector_norm(grad_norms(parameters, self.clip_norm_type), self.clip_norm_type)
            total = self._global_norms(total)
            self.clip_suggester.update(total)
            scalars[f"gradhealth/grad_norm{group}/total"] = float(total)
        if measuring_step:
            scalars["gradhealth/nonfinite/steps"] = float(self.nonfinite_steps)
            scalars["gradhealth/nonfinite/skipped_steps"] = float(self.skipped_steps)
        return output

    def _guarded(self, kind: str, record: Callable[..., None], *args: Any) -> None:
        """Run one measurement; an error in it is named once and left out: training goes on."""
        try:
            record(*args)
        except Exception as error:  # a measurement must never stop the user's training
            if ("error", kind) not in self._warned:
                self._warned.add(("error", kind))
                self.warn(
                    f"GradHealth: the {kind} measurement failed ({type(error).__name__}: {error}); "
                    "it is left out, training goes on."
                )

    def _global_norms(self, norms: Tensor) -> Tensor:
        """This process's ``clip_norm_type``-norms as the norms over all processes (sharded
        gradients); unchanged without ``all_reduce``."""
        if self.all_reduce is None:
            return norms
        if math.isinf(self.clip_norm_type):
            return self.all_reduce(norms.clone(), "max")
        return self.all_reduce(norms.pow(self.clip_norm_type), "sum").pow(1 / self.clip_norm_type)

    @property
    def clipped_steps(self) -> int:
        """Optimizer steps clipped so far (of :attr:`clip_steps` steps with ``clip`` on); one sync."""
        return int(self._clipped_total)

    @property
    def suggested_clip_val(self) -> Optional[float]:
        """A ``clip_val`` for ``clip="norm"`` from the norms seen (Pascanu et al. 2013: about the
        average norm over many updates); ``None`` before 100 norms were seen."""
        return self.clip_suggester.suggest()

    def finish(self, step: int, amp_scaler_active: bool = False) -> HealthReport:
        """End of training: count the NaN/Inf flags not yet read, take the final spectra, and
        return the :class:`~lightning_gradhealth.health.HealthReport`."""
        self._report_nonfinite(step, warn=not amp_scaler_active)
        with self.full_parameters():
            for record in self._recurrent_matrices():
                self.spectra[record.full_name] = full_spectrum(record.parameter, len(record.gates))
        return self.report(step)

    def report(self, step: int) -> HealthReport:
        """The health report from what was measured so far (``finish`` also takes the final spectra)."""
        matrices = {record.layer_key: record for record in self._recurrent_matrices()}
        layers = []
        for key in self.layer_keys:
            summary = self.timestep_summaries.get(key)
            saturation = self.saturation.get(key)
            verdict, reason = layer_verdict(summary, saturation, self.vanish_below, self.explode_above)
            record = matrices.get(key)
            end = self.spectra.get(record.full_name) if record is not None else None
            layers.append(
                LayerHealth(
                    layer=key,
                    init=self.init_schemes.get(key),
                    spectrum_start=self.spectra_start.get(key),
                    spectrum_end=None if end is None else _summarize_spectrum(end, step),
                    timesteps=summary,
                    saturation=saturation,
                    verdict=verdict,
                    reason=reason,
                )
            )
        return HealthReport(
            step=step,
            layers=tuple(layers),
            clipped_fraction=self.clipped_steps / self.clip_steps if self.clip_steps else None,
            nonfinite_steps=self.nonfinite_steps,
            skipped_steps=self.skipped_steps,
            suggested_clip_val=self.suggested_clip_val,
        )

    def _recurrent_matrices(self) -> list[WeightRecord]:
        """Each layer's square hidden-to-hidden matrix (``weight_hh``; custom matrices as given)."""
        return [
            record
            for record in self.recurrent_weights
            if record.role == "recurrent" and not record.param_name.startswith("weight_hr")
        ]

    def _record_timesteps(self, output: StepOutput, norms: dict[str, Tensor], step: int, pictures: bool) -> None:
        assert self._probe is not None
        self.timestep_grad_norms = norms
        self.saturation = dict(self._probe.saturation)
        self.timestep_summaries = {
            key: summarize_timesteps(values, self.horizon_factor, reverse=key.removesuffix(".cell").endswith("_reverse"))
            for key, values in norms.items()
        }
        for key, summary in self.timestep_summaries.items():
            prefix = f"gradhealth/{key}"
            output.scalars.update(
                {
                    f"{prefix}/transmission": summary.transmission,
                    f"{prefix}/horizon": float(summary.horizon),
                    f"{prefix}/rate_per_step": summary.rate_per_step,
                    f"{prefix}/dh_norm_first": summary.first_norm,
                    f"{prefix}/dh_norm_last": summary.last_norm,
                }
            )
            if key in self.saturation:
                output.scalars[f"{prefix}/saturation"] = self.saturation[key]
            condition = diagnose_timesteps(summary, self.vanish_below, self.explode_above)
            if condition is not None and not key.endswith(".cell") and (key, condition) not in self._warned:
                self._warned.add((key, condition))
                self.warn(
                    f"GradHealth: {condition} gradients through time in {key!r} at step {step}: "
                    f"||dL/dh|| is {summary.first_norm:.3g} at the layer's first step and {summary.last_norm:.3g} "
                    f"at its last ({summary.steps} steps) "
                    f"(transmission {summary.transmission:+.2f} decades, x{summary.rate_per_step:.3g} per step back, "
                    f"horizon {summary.horizon} of {summary.steps} steps); {_HINTS[condition]}."
                )
            history = self.timestep_history.setdefault(key, [])
            history.append((step, norms[key].numpy()))
            if len(history) > self.history_size:
                del history[-2::-2]  # every other row, keeping the newest
        if pictures:
            self._timestep_images(output, step)

    def _timestep_images(self, output: StepOutput, step: int) -> None:
        """Per layer: the latest ||dL/dh_t|| curve (with ||dL/dc_t|| for an LSTM) and the heatmap."""
        for key in self.timestep_grad_norms:
            if key.endswith(".cell") and key.removesuffix(".cell") in self.timestep_grad_norms:
                continue  # drawn with its state's curve
            curves = {name: norms for name, norms in self.timestep_grad_norms.items() if name in (key, key + ".cell")}
            output.images[f"gradhealth/{key}/timestep_grad_norms"] = timestep_curve_image(curves, key, step)
            steps, rows = zip(*self.timestep_history[key])
            output.images[f"gradhealth/{key}/timestep_heatmap"] = timestep_heatmap_image(steps, rows, key)

    def _record_spectra(self, output: StepOutput, step: int, full: bool, pictures: bool) -> None:
        """Spectra of every hidden-to-hidden matrix: sigma_max by warm-started iteration on every
        logging step; every singular value and eigenvalue (and with ``pictures``, histograms and
        the eigenvalue picture) on ``full`` steps.

        The weights are those the step's gradients were computed with (before the update), so
        step 0 shows the matrices right after init.
        """
        for record in self.recurrent_weights:
            if record.role != "recurrent":
                continue
            gates = len(record.gates)
            prefix = f"gradhealth/{record.layer_key}"
            if full:
                spectrum = full_spectrum(record.parameter, gates)
                self.spectra[record.full_name] = spectrum
                if not record.param_name.startswith("weight_hr"):
                    self.spectra_start.setdefault(record.layer_key, _summarize_spectrum(spectrum, step))
                values = {
                    name: getattr(spectrum, name).tolist()
                    for name in ("sigma_max", "sigma_min", "condition", "spectral_radius", "orth_error", "outside_unit_circle")
                }
                finite = spectrum.finite.tolist()
                if pictures:
                    for index, gate in enumerate(record.gates):
                        output.histograms[f"{prefix}/{gate}/singular_values"] = spectrum.singular_values[index]
                        if spectrum.eigenvalues is not None:
                            output.histograms[f"{prefix}/{gate}/eigenvalue_moduli"] = spectrum.eigenvalues[index].abs()
                    if spectrum.eigenvalues is not None:
                        picture = eigenvalue_image(spectrum.eigenvalues, record.gates, record.layer_key)
                        output.images[f"{prefix}/eigenvalues"] = picture
            else:
                tracker = self._sigma_trackers.setdefault(record.full_name, SigmaMaxTracker())
                sigma_max = tracker(record.parameter, gates)
                values = {"sigma_max": sigma_max.tolist()}
                finite = torch.isfinite(sigma_max).tolist()
            for name, per_gate in values.items():
                output.scalars.update({f"{prefix}/{gate}/{name}": value for gate, value in zip(record.gates, per_gate)})
            if not all(finite):
                bad = [gate for gate, ok in zip(record.gates, finite) if not ok]
                output.scalars[f"{prefix}/nonfinite_weight_blocks"] = float(len(bad))
                if (record.full_name, "weights") not in self._warned:
                    self._warned.add((record.full_name, "weights"))
                    self.warn(
                        f"GradHealth: {record.full_name} holds NaN/Inf in gate blocks {', '.join(bad)} at step {step}; "
                        "their spectra are logged as NaN."
                    )

    def _probe_notices(self) -> None:
        """Say once per module and kind what the probe could not measure exactly."""
        assert self._probe is not None
        notices = {
            **{
                ("repeated", name): f"{name!r} runs several times per training step; "
                "the first call that the loss reaches is measured."
                for name in self._probe.repeated_calls
            },
            **{
                ("dropout", name): f"{name!r} applies inter-layer dropout, whose masks the fused kernel keeps to itself; its "
                "dL/dh_t is measured on the same layers without dropout, under the real upstream gradients."
                for name in self._probe.dropout_calls
            },
            **{
                ("failure", name): f"cannot measure dL/dh_t of {name!r} ({reason}); it is left out, training goes on."
                for name, reason in self._probe.failures.items()
            },
        }
        for key in sorted(notices.keys() - self._warned):
            self.warn(f"GradHealth: {notices[key]}")
        self._warned |= notices.keys()

    def _check_nonfinite(self, parameters: list[Tensor], step: int, amp_scaler_active: bool, logging_step: bool) -> bool:
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
        if self.all_reduce is not None:  # sharded gradients: one decision for all processes
            any_flagged = self.all_reduce(any_flagged.float(), "max") > 0
        if self.on_nonfinite == "warn" or amp_scaler_active:
            key = id(parameters[0])
            pending = self._pending_nonfinite.get(key)
            if pending is not None:
                flagged, steps = pending[1] | flagged, pending[2] + any_flagged
            else:
                steps = any_flagged.long()
            self._pending_nonfinite[key] = (parameters, flagged, steps)
            if logging_step:
                self._report_nonfinite(step, warn=not amp_scaler_active)
            return False
        if not bool(any_flagged):
            return False
        self.nonfinite_steps += 1
        described, count = self._describe(parameters, flagged)
        if self.on_nonfinite == "raise":
            raise NonFiniteGradientError(
                f"GradHealth: non-finite gradients (NaN/Inf) at step {step} in {count} parameters: {described}. "
                "Training stopped before the optimizer step, so the weights are still finite."
            )
        for param in parameters:
            param.grad = None
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            self.warn(
                f"GradHealth: skipped the optimizer step at step {step}: non-finite gradients in {count} "
                f"parameters ({described}). Later skips are counted in gradhealth/nonfinite/skipped_steps."
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

    def _report_nonfinite(self, step: int, warn: bool) -> None:
        """Read the accumulated NaN/Inf flags (one sync), count the steps, warn once per parameter."""
        for parameters, flagged, steps in self._pending_nonfinite.values():
            self.nonfinite_steps += int(steps)
            if not warn or not bool(flagged.any()):
                continue
            names = {self._param_names.get(id(p), "") for p, bad in zip(parameters, flagged.tolist()) if bad}
            if names - self._nonfinite_named:
                self._nonfinite_named |= names
                described, count = self._describe(parameters, flagged)
                self.warn(
                    f"GradHealth: non-finite gradients (NaN/Inf) in {count} parameters by step {step}: {described}. "
                    "The optimizer steps went ahead (on_nonfinite='warn'); on_nonfinite='skip' drops such steps."
                )
        self._pending_nonfinite.clear()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped: the heatmap rows, the
        start-of-run spectra, the counters, the clip-threshold statistics and the warm-start
        vectors of the sigma_max iteration. Tensors and plain Python values only."""
        return {
            "timestep_history": {
                key: [(step, torch.from_numpy(norms)) for step, norms in rows] for key, rows in self.timestep_history.items()
            },
            "spectra_start": {key: vars(summary).copy() for key, summary in self.spectra_start.items()},
            # with on_nonfinite="warn" the flags of the steps since the last logging step are
            # still on the device: count them, or a checkpoint taken now would lose them
            "nonfinite_steps": self.nonfinite_steps + sum(int(steps) for _, _, steps in self._pending_nonfinite.values()),
            "skipped_steps": self.skipped_steps,
            "clipped_steps": self.clipped_steps,
            "clip_steps": self.clip_steps,
            # per optimizer, since its last logging step
            "clip_windows": {name: [int(clipped), steps] for name, (clipped, steps) in self._clip_windows.items()},
            "clip_suggester": self.clip_suggester.state_dict(),
            "sigma_trackers": {name: tracker.state_dict() for name, tracker in self._sigma_trackers.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.timestep_history = {
            key: [(int(step), torch.as_tensor(norms).numpy()) for step, norms in rows]
            for key, rows in state_dict.get("timestep_history", {}).items()
        }
        self.spectra_start = {key: SpectrumSummary(**values) for key, values in state_dict.get("spectra_start", {}).items()}
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._clipped_total = int(state_dict.get("clipped_steps", 0))
        self.clip_steps = int(state_dict.get("clip_steps", 0))
        windows = state_dict.get("clip_windows", {})
        self._clip_windows = {name: (int(clipped), int(steps)) for name, (clipped, steps) in windows.items()}
        if "clip_suggester" in state_dict:
            self.clip_suggester.load_state_dict(state_dict["clip_suggester"])
        self._sigma_trackers = {}
        for name, tracker_state in state_dict.get("sigma_trackers", {}).items():
            self._sigma_trackers[name] = SigmaMaxTracker()
            self._sigma_trackers[name].load_state_dict(tracker_state)


def _summarize_spectrum(spectrum: MatrixSpectrum, step: int) -> SpectrumSummary:
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
