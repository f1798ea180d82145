"""GradHealthMonitor: the measuring engine behind :class:`~lightning_gradhealth.GradHealth`,
usable from any PyTorch training loop (plain PyTorch, Lightning Fabric).

It coordinates the parts of :mod:`~lightning_gradhealth.trackers` (schedule, timesteps, spectra,
gradients) and the timestep probe (:mod:`~lightning_gradhealth.probe`). Per optimizer step a
loop calls

1. :meth:`~GradHealthMonitor.start_step` before the forward pass (on a probe step it arms the
   timestep probe, otherwise it only checks a counter);
2. :meth:`~GradHealthMonitor.stop_capture` before ``backward()``;
3. :meth:`~GradHealthMonitor.before_optimizer_step` once the gradients are complete (and
   AMP-unscaled), before ``optimizer.step()``: it measures, checks for NaN/Inf, clips, and
   returns what to log as a :class:`~lightning_gradhealth.StepOutput`.

At the end, :meth:`~GradHealthMonitor.finish` gives the :class:`~lightning_gradhealth.HealthReport`.
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

from contextlib import nullcontext
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from torch import Tensor, nn

from lightning_gradhealth.clipping import ClipStats, ClipThresholdSuggester
from lightning_gradhealth.config import MonitorConfig, read_setting, refuse_setting
from lightning_gradhealth.defaults import CHECKPOINT_FORMAT
from lightning_gradhealth.health import HealthReport, LayerHealth, LayerKind, TimestepSummary, advice, layer_verdict
from lightning_gradhealth.keys import LayerKey, by_name
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights, parametrized_weights
from lightning_gradhealth.model_init import InitRecord
from lightning_gradhealth.output import StepOutput
from lightning_gradhealth.probe import TimestepProbe
from lightning_gradhealth.spectra import MatrixSpectrum
from lightning_gradhealth.distributed import Distributed
from lightning_gradhealth.trackers import (
    GradientTracker,
    IncompatibleState,
    Notices,
    OtherClipping,
    Schedule,
    SpectrumTracker,
    TimestepTracker,
    layer_parameters,
    summarize_spectrum,
)

__all__ = ["GradHealthMonitor"]


class GradHealthMonitor:
    """Measures the gradient health of a model's recurrent layers on a schedule.

    Every ``log_every_n_steps`` optimizer steps: sigma_max of every hidden-to-hidden matrix, the
    true gradient norm and each recurrent layer's weight-gradient norm. Every
    ``probe_every_n_steps``: the exact ||dL/dh_t|| at every timestep of every recurrent layer and
    its summaries. Every ``full_every_n_steps``: the full spectra, their histograms, an
    eigenvalue picture, and the probe with its pictures. Every step: the NaN/Inf check and, with
    ``clip``, clipping. A step that is not a logging step costs a counter check, the fused NaN/Inf
    check and the clipping, if any; a logging step that is not a probe step captures nothing.

    Args:
        config: the settings as a :class:`~lightning_gradhealth.MonitorConfig`, or
        **settings: its fields by name (the arguments of :class:`~lightning_gradhealth.GradHealth`
            of the same names, with the same meaning).
        warn: receives every notice (default :func:`warnings.warn`; the callback passes
            Lightning's rank-zero warning). Measurements never stop training: what cannot be
            measured is named once.

    Attributes:
        timestep_grad_norms, timestep_summaries, timestep_history, saturation, lyapunov_exponents, spectra,
        latest_clip_stats, clip_suggester, suggested_clip_val, nonfinite_steps, skipped_steps,
        clip_steps, clipped_steps: what was measured, keyed by the layer keys' strings (see
        :class:`~lightning_gradhealth.GradHealth`).
        init_schemes: layer key -> what init wrote to its hidden-to-hidden matrix, filled by
            :meth:`record_init`, for the report.
        schedule, timestep_tracker, spectrum_tracker, gradient_tracker: the parts.

    Raises:
        ValueError: at construction, for an invalid interval, threshold, clip setting or policy.
    """

    def __init__(
        self, config: Optional[MonitorConfig] = None, *, warn: Optional[Callable[[str], None]] = None, **settings: Any
    ) -> None:
        if config is not None and settings:
            raise TypeError(f"GradHealthMonitor takes a MonitorConfig or settings, got both ({', '.join(settings)})")
        config = config if config is not None else MonitorConfig(**settings)
        self.notices = Notices() if warn is None else Notices(warn)
        self.schedule = Schedule(config.log_every_n_steps, config.full_every_n_steps, config.probe_every_n_steps)
        self.timestep_tracker = TimestepTracker(config, self.notices, describe_layer=self.layer_kind)
        self.spectrum_tracker = SpectrumTracker(self.notices)
        self.gradient_tracker = GradientTracker(config, self.notices)
        self.config = config
        self.recurrent_weights: list[WeightRecord] = []
        self.init_schemes: dict[LayerKey, str] = {}
        self.distributed = Distributed()
        self._probe: Optional[TimestepProbe] = None
        self._armed_step: Optional[int] = None
        self._format_0_by_name: Optional[dict[str, Any]] = None  # see load_state_dict
        self._restore_notice: Optional[tuple[Any, list[str], list[str]]] = None

    def __getattr__(self, name: str) -> Any:
        """The settings, by name: ``monitor.clip_val`` is ``monitor.config.clip_val``."""
        return read_setting(self, (self.__dict__.get("_config"),), name)

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_setting(self, (self.__dict__.get("_config"),), name)
        super().__setattr__(name, value)

    @property
    def config(self) -> MonitorConfig:
        """The settings. Assign a new :class:`~lightning_gradhealth.MonitorConfig` (e.g. made with
        ``dataclasses.replace``) to change them between runs; the intervals take effect at :meth:`attach`."""
        return self._config

    @config.setter
    def config(self, config: MonitorConfig) -> None:
        self._config = self.timestep_tracker.config = self.gradient_tracker.config = config
        self.schedule.requested = (config.log_every_n_steps, config.full_every_n_steps, config.probe_every_n_steps)

    def attach(
        self,
        model: nn.Module,
        start_step: Optional[int] = 0,
        *,
        default_log_every_n_steps: Optional[int] = None,
        distributed: Optional[Distributed] = None,
        other_clipping: Optional[OtherClipping] = None,
    ) -> None:
        """Find the recurrent layers of ``model`` and attach the timestep probe's forward hooks.

        Args:
            model: the model to watch; its layers must all exist (after ``configure_model``).
            start_step: the step this run starts at: history from that step on is dropped, so a
                new run starts a new heatmap; ``None`` for a resumed run, which keeps it all.
            default_log_every_n_steps: the logging interval when the config gives none (the
                Trainer's ``log_every_n_steps`` under Lightning).
            distributed: how to reach the other processes of a sharded (FSDP) run.
            other_clipping: clipping applied after :meth:`before_optimizer_step` by something
                else (the Trainer's ``gradient_clip_val``), counted for the report.

        Raises:
            ValueError: a ``custom`` or ``custom_cells`` pattern matches nothing, or a ``custom``
                pattern matches a parameter that is not a ``(gates * H, H)`` hidden-to-hidden matrix.
        """
        self.detach()
        self.schedule.resolve(default_log_every_n_steps)
        self.schedule.reset()
        self.distributed = distributed or Distributed()
        self.recurrent_weights = find_recurrent_weights(model, self.config.custom)
        if self.config.timesteps:
            self._probe = TimestepProbe(
                model,
                self.config.custom_cells or (),
                lyapunov_k=self.config.lyapunov_k,
                lyapunov_warmup=self.config.lyapunov_warmup,
            )
        if not self.recurrent_weights and not (self._probe and self._probe.layer_keys):
            self.notices.warn(
                f"GradHealth found no recurrent layer (nn.RNN/LSTM/GRU, nn.*Cell or a `custom` pattern) "
                f"in {type(model).__name__}; training proceeds untouched."
            )
        left_out = parametrized_weights(model)
        if left_out:
            self.notices.warn(
                f"GradHealth leaves out the parametrized weights {', '.join(left_out)}: their parametrization "
                "defines them, so init does not write them and their spectra are not tracked; dL/dh_t is measured."
            )
        if start_step == 0:  # a new run from scratch: nothing of an earlier run's measurements or notices
            self.timestep_tracker.reset()
            self.spectrum_tracker.reset()
            self.notices.reset()
        self.timestep_tracker.start_run(start_step)
        self.spectrum_tracker.start_run(start_step)
        self.gradient_tracker.start_run(model, self.distributed, start_step, other_clipping)
        if self._probe is not None:
            self._probe.attach()
        if self._format_0_by_name is not None:
            self._resolve_format_0()

    def detach(self) -> None:
        """Remove every hook and drop what was captured: the model runs at full speed and pickles."""
        if self._probe is not None:
            self._probe.detach()
            self._probe = None
        self._armed_step = None
        self.distributed = self.gradient_tracker.distributed = Distributed()

    def record_init(self, init_report: Sequence[InitRecord]) -> None:
        """Note what :func:`~lightning_gradhealth.initialize_` wrote, for the report's ``init`` column."""
        self.init_schemes = {
            record.layer_key: record.scheme for record in init_report if record.role == "recurrent" and not record.projection
        }

    @property
    def layer_keys(self) -> list[LayerKey]:
        """The layers found by :meth:`attach` (recurrent matrices and probed layers), in model order."""
        keys = [record.layer_key for record in self.recurrent_weights if record.role == "recurrent"]
        if self._probe is not None:
            keys += self._probe.layer_keys
        return list(dict.fromkeys(keys))

    def is_logging_step(self, step: int) -> bool:
        """Whether ``step`` is measured: a multiple of the logging interval."""
        return self.schedule.is_logging_step(step)

    def is_probe_step(self, step: int) -> bool:
        """Whether the dL/dh_t probe runs at ``step`` (see :meth:`Schedule.is_probe_step`)."""
        return self.schedule.is_probe_step(step)

    def start_step(self, step: int) -> None:
        """Call before the forward pass of ``step``: on a probe step, arm the probe.

        A capture left over from a window that ended without an optimizer step (a skipped batch)
        is dropped first.
        """
        if self._probe is None:
            return
        if self._probe.has_captures and not (step == self._armed_step and self._probe.has_gradients):
            self._probe.release()
        if self.is_probe_step(step) and not self._probe.has_captures:
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
        optimizer_name: str = "",
        grad_norm: Optional[Tensor] = None,
    ) -> StepOutput:
        """Measure, check and clip the complete gradients of ``parameters`` at ``step``.

        Args:
            step: the optimizer step (the value loggers put on the x axis).
            parameters: the parameters this optimizer updates.
            grad_scale: the AMP loss scale the backward pass ran with (1.0 without AMP); the
                gradients themselves must already be unscaled.
            amp_scaler_active: a GradScaler skips non-finite steps itself: they are only counted.
            optimizer_name: with several optimizers, a name for this one (e.g. ``"optimizer_1"``):
                its gradient scalars go under ``gradhealth/grad_norm/<name>/...`` and
                ``gradhealth/clip/<name>/...``. The probe and the spectra run once per step,
                at the first optimizer that steps.
            grad_norm: the total ``clip_norm_type``-norm of these gradients before your own
                clipping, when you clip before this call: logged as
                ``gradhealth/grad_norm/total`` instead of the norm found here (see
                :func:`~lightning_gradhealth.clipping.grad_norms`).

        Raises:
            NonFiniteGradientError: ``on_nonfinite="raise"`` and a gradient holds NaN/Inf;
                raised before any weight changes.
        """
        output = StepOutput()
        plan = self.schedule.update(step, optimizer_name)
        with self.distributed.full_parameters() if plan.measure else nullcontext():
            if plan.probe and self._probe is not None and self._probe.has_captures:
                result = self._probe.compute(grad_scale=grad_scale, lyapunov=plan.exponents)
                self._guarded("timesteps", output, lambda: self.timestep_tracker.update(result, step))
                if plan.pictures:
                    self._guarded("timestep pictures", output, lambda: self.timestep_tracker.pictures(step))
            if plan.measure:
                if self._probe is not None:
                    for key, message in sorted(self._probe.notices().items()):
                        self.notices.say(key, message)
                records = self.recurrent_weights
                self._guarded("spectra", output, lambda: self.spectrum_tracker.update(records, step, plan.full, plan.pictures))
        gradients = self.gradient_tracker.update(
            parameters,
            step,
            plan,
            layer_parameters(self.recurrent_weights, parameters) if plan.log_gradients else {},
            optimizer_name,
            amp_scaler_active,
            grad_norm,
        )
        output.update(gradients)
        output.skip_step = gradients.skip_step
        return output

    def _guarded(self, kind: str, output: StepOutput, measure: Callable[[], StepOutput]) -> None:
        """Run one measurement into ``output``; an error in it is named once and left out: training goes on."""
        try:
            output.update(measure())
        except Exception as error:  # a measurement must never stop the user's training
            self.notices.say(
                ("error", kind),
                f"the {kind} measurement failed ({type(error).__name__}: {error}); it is left out, training goes on.",
            )

    def finish(self, step: int, amp_scaler_active: bool = False, optimizer_steps: Optional[int] = None) -> HealthReport:
        """End of training: count the NaN/Inf flags not yet read, take the final spectra, and
        return the :class:`~lightning_gradhealth.HealthReport`.

        ``optimizer_steps``: the optimizer steps taken, when they differ from ``step`` (several per
        logged step: truncated BPTT, or several optimizers); the report names both."""
        self.gradient_tracker.read_pending(step, warn=not amp_scaler_active)
        with self.distributed.full_parameters():
            self.spectrum_tracker.finish(self.recurrent_weights)
        return self.report(step, optimizer_steps)

    def end_of_fit(self, step: int, pictures: Optional[bool] = None) -> StepOutput:
        """What to log at the step the fit ends (after :meth:`finish`): the final spectra's
        scalars and histograms, finite values only; with ``pictures``, the eigenvalue pictures
        and the latest probe's curve and heatmap. ``pictures=None`` draws them when the run took a
        full pass after step 0 (``step > full_every_n_steps``: ``step`` counts the steps taken,
        the last of which is ``step - 1``), so that a short fit, and each short refit of a retrain
        loop, is not slowed by drawing (about 0.6 s per layer); the callback passes ``True`` after
        :data:`~lightning_gradhealth.defaults.FINAL_PICTURES_AFTER_SECONDS` of training."""
        if pictures is None:
            pictures = step > self.schedule.full_every_n_steps
        output = StepOutput()
        self._guarded("spectra", output, lambda: self.spectrum_tracker.end_of_fit(self.recurrent_weights, step, pictures))
        if pictures and self.timestep_tracker.grad_norms:
            self._guarded("timestep pictures", output, lambda: self.timestep_tracker.pictures(step))
        return output

    def layer_kind(self, key: LayerKey) -> LayerKind:
        """What the layer under ``key`` is, for the verdict's evidence and the advice: its cell
        type (from the recurrent weights found at :meth:`attach`; ``None`` for a custom cell), what
        init wrote to it (:meth:`record_init`; ``None``: left as it was), and whether gradients
        are clipped (``clip``, or clipping after GradHealth's such as the Trainer's)."""
        first = key.first_call
        cell_type = next((r.cell_type for r in self.recurrent_weights if r.layer_key == first and r.role == "recurrent"), None)
        clipping = self.config.clip is not None or self.gradient_tracker.other_clipping is not None
        return LayerKind(cell_type, self.init_schemes.get(first), clipping)

    def report(self, step: int, optimizer_steps: Optional[int] = None) -> HealthReport:
        """The health report from what was measured so far (``finish`` also takes the final spectra)."""
        matrices = {r.layer_key: r for r in self.recurrent_weights if r.role == "recurrent" and not r.projection}
        timesteps, spectra = self.timestep_tracker, self.spectrum_tracker
        layers = []
        later_calls = [key for key in timesteps.summaries if key.call and key.state == "h"]  # see LayerKey.call
        for key in [*self.layer_keys, *later_calls]:
            summary = timesteps.summaries.get(key)
            saturation = timesteps.saturation.get(key)
            lyapunov_max = _largest(timesteps.lyapunov.get(key))
            record = matrices.get(key.first_call)
            end = spectra.spectra.get(record.full_name) if record is not None else None
            spectrum_end = None if end is None else summarize_spectrum(end, step)
            kind = self.layer_kind(key)
            verdict, reason = layer_verdict(
                summary,
                saturation,
                self.config.vanish_below,
                self.config.explode_above,
                unmeasured_reason=timesteps.unmeasured.get(key),
                lyapunov_max=lyapunov_max,
                kind=kind,
                spectrum=spectrum_end,
            )
            helps = None
            if summary is not None and verdict in ("vanishing", "exploding"):
                helps = advice(verdict if summary.finite else "nonfinite", kind, summary.steps, saturation)
            layers.append(
                LayerHealth(
                    layer=str(key),
                    init=self.init_schemes.get(key.first_call),
                    spectrum_start=spectra.start_summaries.get(key.first_call),
                    spectrum_end=spectrum_end,
                    timesteps=summary,
                    saturation=saturation,
                    verdict=verdict,
                    reason=reason,
                    lyapunov_max=lyapunov_max,
                    advice=helps,
                )
            )
        gradients = self.gradient_tracker
        clipped_fraction = gradients.clipped_steps / gradients.clip_steps if gradients.clip_steps else None
        other = gradients.other_clipping
        if other is not None and gradients.other_clip_steps:
            clipped_fraction = gradients.other_clipped_steps / gradients.other_clip_steps
        return HealthReport(
            step=step,
            layers=tuple(layers),
            clipped_fraction=clipped_fraction,
            nonfinite_steps=gradients.nonfinite_steps,
            skipped_steps=gradients.skipped_steps,
            suggested_clip_val=self.suggested_clip_val,
            clipped_by=None if other is None else other.who,
            caller_clipping=(gradients.caller_clipped_steps, gradients.caller_checked_steps)
            if gradients.caller_clipped_steps
            else None,
            optimizer_steps=optimizer_steps,
        )

    # What was measured, keyed by the layer keys' strings as the public contract has them.

    @property
    def timestep_grad_norms(self) -> dict[str, Tensor]:
        return by_name(self.timestep_tracker.grad_norms)

    @property
    def timestep_summaries(self) -> dict[str, TimestepSummary]:
        return by_name(self.timestep_tracker.summaries)

    @property
    def timestep_history(self) -> dict[str, list[tuple[int, np.ndarray]]]:
        return by_name(self.timestep_tracker.history)

    @property
    def saturation(self) -> dict[str, float]:
        return by_name(self.timestep_tracker.saturation)

    @property
    def lyapunov_exponents(self) -> dict[str, Tensor]:
        return by_name(self.timestep_tracker.lyapunov)

    @property
    def spectra(self) -> dict[str, MatrixSpectrum]:
        return self.spectrum_tracker.spectra

    @property
    def latest_clip_stats(self) -> Optional[ClipStats]:
        return self.gradient_tracker.latest_clip_stats

    @property
    def clip_suggester(self) -> ClipThresholdSuggester:
        return self.gradient_tracker.clip_suggester

    @property
    def suggested_clip_val(self) -> Optional[float]:
        """A ``clip_val`` for ``clip="norm"`` from the norms seen (Pascanu et al. 2013: about the
        average norm over many updates); ``None`` before
        :data:`~lightning_gradhealth.defaults.CLIP_SUGGESTION_MIN_NORMS` norms were seen."""
        return self.gradient_tracker.clip_suggester.suggest()

    @property
    def nonfinite_steps(self) -> int:
        return self.gradient_tracker.nonfinite_steps

    @property
    def skipped_steps(self) -> int:
        return self.gradient_tracker.skipped_steps

    @property
    def clip_steps(self) -> int:
        return self.gradient_tracker.clip_steps

    @property
    def clipped_steps(self) -> int:
        return self.gradient_tracker.clipped_steps

    def _parts(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "timesteps": self.timestep_tracker,
            "spectra": self.spectrum_tracker,
            "gradients": self.gradient_tracker,
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped, each part's state under its
        name, with the format version (:data:`~lightning_gradhealth.defaults.CHECKPOINT_FORMAT`).
        Tensors and plain Python values only."""
        return {
            "format": CHECKPOINT_FORMAT,
            "init_schemes": [{"key": key.to_dict(), "scheme": scheme} for key, scheme in self.init_schemes.items()],
            **{name: part.state_dict() for name, part in self._parts().items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, from this format, an older or a newer one: what can be
        restored is, the rest starts fresh, and one notice names it.

        The unversioned state of the first releases (format 0) keyed its heatmap rows, start
        spectra and init schemes by the layer keys' strings: those are matched, by exact string,
        to the layers found at the next :meth:`attach`, and the notice comes then.
        """
        version = state_dict.get("format", 0) if isinstance(state_dict, Mapping) else None
        if version == 0:
            state, dropped, self._format_0_by_name = _from_format_0(state_dict)
        else:
            state, dropped = (dict(state_dict), []) if isinstance(state_dict, Mapping) else ({}, ["<not a mapping>"])
        state.pop("format", None)
        missing: list[str] = []
        if "init_schemes" in state:
            try:
                self.init_schemes = {LayerKey.from_dict(e["key"]): str(e["scheme"]) for e in state.pop("init_schemes")}
            except Exception:  # whatever a foreign checkpoint holds, a resume never fails on it
                dropped.append("init_schemes")
        elif version != 0:
            missing.append("init_schemes")
        for name, part in self._parts().items():
            if name not in state:
                missing.append(name)
                continue
            incompatible: IncompatibleState = part.load_state_dict(state.pop(name))
            missing += [f"{name}.{field}" for field in incompatible.missing]
            dropped += [f"{name}.{field}" for field in incompatible.dropped]
        dropped += sorted(map(str, state))
        self._restore_notice = (version, missing, dropped)
        if version != 0:
            self._say_restored()

    def _resolve_format_0(self) -> None:
        """Give the string-keyed parts of a format-0 state to the layers :meth:`attach` found."""
        pending, self._format_0_by_name = self._format_0_by_name or {}, None
        version, missing, dropped = self._restore_notice or (0, [], [])
        keys = {str(k): k for key in self.layer_keys for k in (key, key.cell_state)}

        def matched(name: str) -> list[tuple[LayerKey, Any]]:
            """The entries of the field ``name`` whose layer is found, as (key, value)."""
            found = []
            for layer, value in dict(pending.get(name) or {}).items():
                if layer in keys:
                    found.append((keys[layer], value))
                else:
                    dropped.append(f"{name}[{layer!r}]")
            return found

        try:
            history = [
                {"key": key.to_dict(), "steps": [step for step, _ in rows], "norms": [norms for _, norms in rows]}
                for key, rows in matched("timestep_history")
            ]
            if self.timestep_tracker.load_state_dict({"history": history}).dropped:
                dropped.append("timestep_history")
            starts = [{"key": key.to_dict(), **values} for key, values in matched("spectra_start")]
            if self.spectrum_tracker.load_state_dict({"start": starts}).dropped:
                dropped.append("spectra_start")
            self.init_schemes = {key: str(scheme) for key, scheme in matched("init_schemes")}
        except Exception:  # whatever a foreign checkpoint holds, a resume never fails on it
            dropped.append("timestep_history, spectra_start, init_schemes")
        self._restore_notice = (version, missing, dropped)
        self._say_restored()

    def _say_restored(self) -> None:
        """One notice, when a checkpoint's state was not restored whole or was of another format."""
        version, missing, dropped = self._restore_notice or (CHECKPOINT_FORMAT, [], [])
        self._restore_notice = None
        if missing or dropped or version != CHECKPOINT_FORMAT:
            self.notices.warn(
                f"GradHealth: the checkpoint holds GradHealth state of format {version} (this version writes "
                f"{CHECKPOINT_FORMAT}); restored what it could. Dropped: {', '.join(dropped) or 'nothing'}. "
                f"Not in it, so starting fresh: {', '.join(missing) or 'nothing'}."
            )


def _from_format_0(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The unversioned state of the first releases in today's layout, the names of its fields
    that are unknown, and its string-keyed fields (heatmap rows, start spectra, init schemes),
    which wait for the layers found at attach."""
    gradient_fields = ("nonfinite_steps", "skipped_steps", "clipped_steps", "clip_steps", "clip_windows", "clip_suggester")
    by_name_fields = ("timestep_history", "spectra_start", "init_schemes")
    converted: dict[str, Any] = {
        "schedule": {},
        "timesteps": {},
        "spectra": {"sigma_max": state["sigma_trackers"]} if "sigma_trackers" in state else {},
        "gradients": {name: state[name] for name in gradient_fields if name in state},
    }
    known = {*gradient_fields, *by_name_fields, "sigma_trackers"}
    dropped = sorted(str(name) for name in state if name not in known)
    return converted, dropped, {name: state[name] for name in by_name_fields if name in state}


def _largest(exponents: Optional[Tensor]) -> Optional[float]:
    """The largest of a layer's Lyapunov exponents (sorted descending), if it has any."""
    return None if exponents is None or not len(exponents) else float(exponents[0])
