"""GradHealth: the Lightning callback. It schedules and wires; the math lives in the other modules.

- ``on_fit_start``: find the recurrent layers, initialize them once
  (:mod:`~lightning_gradhealth.initialize`), attach the timestep probe's forward hooks
  (:mod:`~lightning_gradhealth.bptt`).
- ``on_train_batch_start`` of a sampled step: arm the probe, so the step's forward pass is
  captured. On every other step the callback does a counter check and nothing else.
- ``on_before_optimizer_step`` (gradients are AMP-unscaled and accumulation is complete): compute
  the per-timestep norms, summarize (:mod:`~lightning_gradhealth.health`), log, release;
  spectra of the recurrent matrices (:mod:`~lightning_gradhealth.spectra`) on logging steps;
  the NaN/Inf check and clipping (:mod:`~lightning_gradhealth.clipping`) on every step.
- end of fit (or an exception): remove every hook.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any, Literal, Optional

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradhealth._compat import CallbackBase
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
from lightning_gradhealth.health import TimestepSummary, diagnose_timesteps, summarize_timesteps
from lightning_gradhealth.initialize import InitConfig, InitRecord, apply_init_, format_init_report
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights, parametrized_weights
from lightning_gradhealth.spectra import MatrixSpectrum, SigmaMaxTracker, eigenvalue_image, full_spectrum
from lightning_gradhealth.tensorboard import add_histograms, add_images, log_scalars, tensorboard_writers

__all__ = ["GradHealth"]


_HINTS = {
    "vanishing": "what usually helps: orthogonal or identity init of the recurrent matrices "
    "(GradHealth(init=\"orthogonal\")), an LSTM or GRU instead of a plain RNN, chrono biases for "
    "long dependencies (chrono_t_max=T), or a shorter sequence / truncated BPTT",
    "exploding": "what usually helps: gradient clipping (Trainer(gradient_clip_val=1.0)), orthogonal "
    "init of the recurrent matrices (GradHealth(init=\"orthogonal\")), a lower learning rate",
    "nonfinite": "the gradient through time is NaN or Inf: check the loss, the learning rate and the "
    "input data; clipping and a lower learning rate usually help",
}


NONFINITE_POLICIES = ("warn", "skip", "raise")


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``GradHealth(on_nonfinite="raise")`` before an optimizer step with NaN/Inf gradients."""


def _optimizer_steps(trainer: Any) -> int:
    """The step Lightning logs at: optimizer steps taken so far (once per accumulation window)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def _loss_scale(trainer: Any) -> float:
    """The AMP loss scale of the current backward pass (1.0 without a GradScaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


class GradHealth(CallbackBase):
    """Gradient health for recurrent networks: principled init, exact gradients through time.

    With no arguments it changes no weight, so a team template can enable it for every run,
    fine-tuning included. With ``init`` it initializes every ``nn.RNN``/``nn.LSTM``/``nn.GRU``
    layer (all layers, both directions), every ``nn.RNNCell``/``LSTMCell``/``GRUCell`` and the
    custom matrices you name, per gate block, exactly once: at ``on_fit_start``, after
    ``configure_model`` and before the first optimizer step; never when resuming from a
    checkpoint (``trainer.fit(ckpt_path=...)``) nor on a second ``fit`` of the same model. Under DDP every rank
    draws from rank 0's seed, so the weights are identical on every rank.

    Every ``log_every_n_steps`` optimizer steps it measures the exact norm of dL/dh_t at every
    timestep of every recurrent layer (:attr:`timestep_grad_norms`) and logs, per layer and
    direction, ``gradhealth/<layer>/transmission``, ``.../horizon``, ``.../rate_per_step``,
    ``.../dh_norm_first`` and ``.../dh_norm_last`` (definitions in
    :mod:`lightning_gradhealth.health`), and every ``full_every_n_steps`` steps two pictures to
    TensorBoard: the latest curve over t and a heatmap over (training step, t). L is the loss
    Lightning backpropagates (divided by ``accumulate_grad_batches``; the first micro-batch of
    the window is measured), AMP-unscaled.

    On logging steps it also logs ``gradhealth/<layer>/<gate>/sigma_max`` of every
    hidden-to-hidden matrix (warm-started iteration), and on every ``full_every_n_steps`` the
    full spectra (``sigma_min``, ``condition``, ``spectral_radius``, ``orth_error``,
    ``outside_unit_circle``), their histograms and an eigenvalue picture
    (:mod:`lightning_gradhealth.spectra`); step 0 shows the weights right after init.

    On every optimizer step it checks the gradients for NaN/Inf (one fused check) and, with
    ``clip``, clips them; on logging steps it logs the true gradient norm
    ``gradhealth/grad_norm/total`` (before clipping, unscaled), with ``clip`` also
    ``gradhealth/grad_norm/total_clipped``, ``gradhealth/clip/coefficient`` and
    ``gradhealth/clip/clipped_steps_fraction`` (over the steps since the previous log), the
    gradient norm of each recurrent layer's weights ``gradhealth/<layer>/weight_grad_norm``, and
    the counts ``gradhealth/nonfinite/steps`` and ``gradhealth/nonfinite/skipped_steps``.

    Args:
        init: scheme of the hidden-to-hidden matrices: ``"orthogonal"``, ``"glorot"``
            (alias ``"xavier"``), ``"glorot_normal"``, ``"he"`` (alias ``"kaiming"``),
            ``"identity"``, ``"uniform"``, or ``None`` to leave every weight as it is.
        input_init: scheme of the input-to-hidden matrices (default Glorot uniform with the RNN
            fan rule, as Keras does); ``None`` keeps the framework's.
        gain: multiplier of ``init`` (the singular value of every gate block for orthogonal).
        forget_bias: effective LSTM forget-gate bias, counted once across ``bias_ih`` and
            ``bias_hh``; all other biases are zeroed.
        chrono_t_max: chrono init of LSTM biases (Tallec & Ollivier 2018) for dependencies up
            to this many steps: ``b_f ~ log U[1, T_max - 1]``, ``b_i = -b_f``.
        uniform_scale: range of the ``"uniform"`` baseline, ``U[-scale, scale]``.
        linear_init: scheme for plain ``nn.Linear`` layers (``"he"`` before ReLUs); ``None``
            leaves them untouched.
        custom: hidden-to-hidden matrices of your own modules: glob pattern over parameter
            names -> gate count (blocks stacked along dim 0), e.g. ``{"cell.W_hh": 4}``.
        exclude: glob patterns over module or parameter names that init leaves alone, e.g.
            pretrained weights loaded before fit: ``["encoder.*"]``.
        seed: seed of the init draws; default ``torch.initial_seed()``, so
            ``seed_everything`` makes the init reproducible. Rank 0's value is used on all ranks.
        timesteps: measure per-timestep gradient norms (``False``: never attach a hook).
        custom_cells: glob patterns over module names of your own cells, modules your loop
            calls once per timestep that return ``h_t`` or ``(h_t, c_t, ...)``.
        log_every_n_steps: measuring interval in optimizer steps; default the Trainer's
            ``log_every_n_steps``.
        full_every_n_steps: interval of the full spectra, histograms and pictures; default
            20 x ``log_every_n_steps`` (at H = 1024 that keeps the full spectra under 0.5% of
            training time on CPU); rounded up to a multiple of the logging interval.
        vanish_below: warn (once per layer) when ||dL/dh_0|| / ||dL/dh_{T-1}|| falls below this.
        explode_above: warn (once per layer) when that ratio rises above this.
        horizon_factor: the fall that ends the ``horizon`` (see :mod:`lightning_gradhealth.health`).
        clip: ``None`` (default), ``"norm"`` (global norm, Pascanu et al. 2013), ``"value"``
            (element-wise) or ``"agc"`` (adaptive, unit-wise, Brock et al. 2021). Applied in
            ``on_before_optimizer_step``: after AMP unscaling and the whole accumulation
            window, before ``optimizer.step()``. Cannot be combined with the Trainer's
            ``gradient_clip_val`` (fit fails at its start, saying which one to remove).
        clip_val: the threshold: max total norm, max absolute value, or AGC's lambda.
        clip_norm_type: the p of the norms (``float("inf")`` for the max-norm).
        on_nonfinite: what a step with a NaN/Inf gradient does: ``"warn"`` (once per parameter,
            naming them), ``"skip"`` (the optimizer step is skipped: weights and optimizer state
            stay as they were), ``"raise"`` (:class:`NonFiniteGradientError` before the step).
            Under 16-mixed the GradScaler already skips such steps: they are only counted.

    Attributes:
        init_report: one :class:`~lightning_gradhealth.InitRecord` per parameter written.
        init_applied: whether init has run for this model (kept in checkpoints).
        init_seed: the seed the init used.
        recurrent_weights: every weight record (recurrent, input, bias) of the recurrent layers
            found at the start of the latest fit.
        timestep_grad_norms: ``{layer key: (T,) tensor}`` of the latest probe, e.g.
            ``"encoder.rnn.l1_reverse"``; LSTM cell states under the key plus ``".cell"``.
        timestep_summaries: ``{layer key: TimestepSummary}`` of the latest probe.
        timestep_history: ``{layer key: [(step, norms as a numpy array), ...]}``, the rows of
            the heatmap (thinned to every other row when it exceeds ``history_size``).
        spectra: ``{parameter name: MatrixSpectrum}`` of the latest full pass.
        latest_clip_stats: the :class:`~lightning_gradhealth.clipping.ClipStats` of the latest
            clipped step (0-d tensors: pre/post-clip norm, coefficient, clipped fraction).
        suggested_clip_val: a ``clip_val`` for ``clip="norm"`` from the norms seen.
        nonfinite_steps: optimizer steps whose gradients held NaN/Inf; ``skipped_steps``: those skipped.

    Raises:
        ValueError: at construction, for an unknown scheme name (the message lists the valid
            names and the closest match), a negative or non-finite gain, an invalid gate count,
            seed, interval or threshold; at the start of fit, before any step, for a
            ``custom``, ``exclude`` or ``custom_cells`` pattern that matches nothing or a gate
            count that does not divide its matrix.

    Example::

        from pytorch_lightning import Trainer
        from lightning_gradhealth import GradHealth

        health = GradHealth(init="orthogonal", chrono_t_max=200)
        trainer = Trainer(callbacks=[health])
        trainer.fit(model)
        health.timestep_grad_norms["rnn.l0"]   # ||dL/dh_t|| for t = 0..T-1, latest probe
    """

    history_size = 256

    def __init__(
        self,
        init: Optional[str] = None,
        *,
        input_init: Optional[str] = "glorot",
        gain: float = 1.0,
        forget_bias: float = 1.0,
        chrono_t_max: Optional[int] = None,
        uniform_scale: float = 0.01,
        linear_init: Optional[str] = None,
        custom: Optional[dict[str, int]] = None,
        exclude: Optional[list[str]] = None,
        seed: Optional[int] = None,
        timesteps: bool = True,
        custom_cells: Optional[list[str]] = None,
        log_every_n_steps: Optional[int] = None,
        full_every_n_steps: Optional[int] = None,
        vanish_below: float = 1e-3,
        explode_above: float = 1e3,
        horizon_factor: float = 1e3,
        clip: Optional[Literal["norm", "value", "agc"]] = None,
        clip_val: Optional[float] = None,
        clip_norm_type: float = 2.0,
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
    ) -> None:
        self.init_config = InitConfig(
            init=init,
            input_init=input_init,
            gain=gain,
            forget_bias=forget_bias,
            chrono_t_max=chrono_t_max,
            uniform_scale=uniform_scale,
            linear_init=linear_init,
            custom=dict(custom) if custom else None,
            exclude=list(exclude) if exclude else None,
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        check_positive_int_or_none("log_every_n_steps", log_every_n_steps)
        check_positive_int_or_none("full_every_n_steps", full_every_n_steps)
        if log_every_n_steps and full_every_n_steps and full_every_n_steps % log_every_n_steps:
            raise ValueError(
                f"full_every_n_steps={full_every_n_steps} must be a multiple of log_every_n_steps={log_every_n_steps}: "
                "full passes happen on logging steps"
            )
        for name, value in (("vanish_below", vanish_below), ("explode_above", explode_above), ("horizon_factor", horizon_factor)):
            check_positive_finite(name, value)
        check_pattern_list("custom_cells", custom_cells)
        self.clip, self.clip_val, self.clip_norm_type = validate_clip_args(clip, clip_val, clip_norm_type)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        self.timesteps = timesteps
        self.custom_cells = list(custom_cells or [])
        self.log_every_n_steps = log_every_n_steps
        self.full_every_n_steps = full_every_n_steps
        self.vanish_below = vanish_below
        self.explode_above = explode_above
        self.horizon_factor = horizon_factor

        self.init_report: list[InitRecord] = []
        self.init_applied = False
        self.init_seed: Optional[int] = None
        self._initialized_model: Optional[weakref.ref] = None
        self.recurrent_weights: list[WeightRecord] = []
        self.timestep_grad_norms: dict[str, torch.Tensor] = {}
        self.timestep_summaries: dict[str, TimestepSummary] = {}
        self.timestep_history: dict[str, list[tuple[int, np.ndarray]]] = {}
        self._probe: Optional[TimestepProbe] = None
        self._armed_step: Optional[int] = None
        self._warned: set[tuple[str, str]] = set()
        self._noticed: set[tuple[str, str]] = set()
        self.spectra: dict[str, MatrixSpectrum] = {}
        self._sigma_trackers: dict[str, SigmaMaxTracker] = {}
        self._log_interval = 1
        self._full_interval = 20
        self.clip_suggester = ClipThresholdSuggester()
        self.nonfinite_steps = 0
        self.skipped_steps = 0
        self.latest_clip_stats: Optional[ClipStats] = None
        self._param_names: dict[int, str] = {}
        self._nonfinite_named: set[str] = set()
        self._pending_nonfinite: dict[int, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}
        self._window_clipped: Any = 0.0
        self._window_steps = 0
        self._logged_step: Optional[int] = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Find the recurrent layers (all exist now, ``configure_model`` included), initialize them, attach the probe."""
        if self.clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"Both GradHealth(clip={self.clip!r}, clip_val={self.clip_val}) and "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the gradients, one after "
                "the other. Remove one: Trainer(gradient_clip_val=None), or GradHealth(clip=None) to keep "
                "the Trainer's clipping (GradHealth then still logs the true gradient norms)."
            )
        self.recurrent_weights = find_recurrent_weights(pl_module, self.init_config.custom)
        if self.timesteps:
            self._probe = TimestepProbe(pl_module, self.custom_cells)
        if not self.recurrent_weights and not (self._probe and (self._probe.fused or self._probe.cells)):
            rank_zero_warn(
                f"GradHealth found no recurrent layer (nn.RNN/LSTM/GRU, nn.*Cell or a `custom` pattern) "
                f"in {type(pl_module).__name__}; training proceeds untouched."
            )
        self._param_names = {id(param): name for name, param in pl_module.named_parameters()}
        # on resume the loop's step counter is restored only after on_fit_start: keep the history
        self._start_fit(None if trainer.ckpt_path is not None else _optimizer_steps(trainer))
        left_out = parametrized_weights(pl_module)
        if left_out:
            rank_zero_warn(
                f"GradHealth leaves out the parametrized weights {', '.join(left_out)}: their parametrization "
                "defines them, so init does not write them and their spectra are not tracked; dL/dh_t is measured."
            )
        self._log_interval = self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)
        full = self.full_every_n_steps or 20 * self._log_interval
        self._full_interval = -(-full // self._log_interval) * self._log_interval  # a multiple of the logging interval
        self._initialize(trainer, pl_module)
        if self._probe is not None:
            self._probe.attach()

    def _start_fit(self, step: Optional[int]) -> None:
        """Forget per-fit bookkeeping; keep the history of steps before ``step`` (all of it when
        ``None``: a resumed run goes on), so a new run starting at step 0 starts a new heatmap."""
        self._logged_step = self._armed_step = None
        self._pending_nonfinite.clear()
        self._window_clipped, self._window_steps = 0.0, 0
        if step is None:
            return
        for key in list(self.timestep_history):
            self.timestep_history[key] = [(s, norms) for s, norms in self.timestep_history[key] if s < step]

    def _initialize(self, trainer: Any, pl_module: Any) -> None:
        if not self.init_config.changes_weights:
            return
        if self._initialized_model is not None and self._initialized_model() is pl_module:
            rank_zero_info("GradHealth: init already applied to this model; weights left as they are.")
            return
        if trainer.ckpt_path is not None:
            rank_zero_info(f"GradHealth: resuming from {trainer.ckpt_path}; weights come from the checkpoint, no init.")
            return
        seed = self.seed if self.seed is not None else torch.initial_seed()
        seed = trainer.strategy.broadcast(seed, src=0)
        self.init_report = apply_init_(pl_module, self.init_config, torch.Generator().manual_seed(seed))
        self.init_seed, self.init_applied = seed, True
        self._initialized_model = weakref.ref(pl_module)
        layers = len({record.layer_key for record in self.init_report})
        rank_zero_info(
            f"GradHealth: initialized {len(self.init_report)} parameters of {layers} layers "
            f"(seed {seed}):\n{format_init_report(self.init_report)}"
        )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Arm the probe on the first micro-batch of a sampled optimizer step."""
        if self._probe is None:
            return
        step = _optimizer_steps(trainer)
        if self._probe.has_captures and not (step == self._armed_step and self._probe.has_gradients):
            self._probe.release()  # a window that ended without an optimizer step, or a skipped batch
        if step % self._log_interval == 0 and not self._probe.has_captures:
            self._probe.arm()
            self._armed_step = step

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Capture the forward pass only (activation checkpointing replays forwards in backward),
        and one micro-batch only: later micro-batches of the window run unwatched."""
        if self._probe is not None:
            self._probe.disarm()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop capturing, also when the batch had no backward pass."""
        if self._probe is not None:
            self._probe.disarm()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Gradients are complete and unscaled here: check, measure, clip, log, release.

        Runs before the Trainer's own clipping and ``optimizer.step()``, also inside a manual
        ``optimizer.step()``; once per accumulation window.
        """
        step = _optimizer_steps(trainer)
        logging_step = step % self._log_interval == 0 and step != self._logged_step
        if logging_step:
            self._logged_step = step
        if self._probe is not None and self._probe.has_captures:
            norms = self._probe.compute(grad_scale=_loss_scale(trainer))
            self._record_timesteps(trainer, norms, step)
        if self._probe is not None and logging_step:
            self._probe_notices()
        if logging_step:
            self._record_spectra(trainer, step, full=step % self._full_interval == 0)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._check_nonfinite(optimizer, parameters, step, scaler is not None and scaler.is_enabled(), logging_step):
            return
        metrics: dict[str, float] = {}
        if logging_step:
            layer_params = defaultdict(list)
            for record in self.recurrent_weights:
                layer_params[record.layer_key].append(record.parameter)
            if layer_params:
                norms = group_grad_norms(layer_params, self.clip_norm_type).tolist()
                metrics.update({f"gradhealth/{key}/weight_grad_norm": norm for key, norm in zip(layer_params, norms)})
        if self.clip is not None:
            stats = clip_grads_(parameters, self.clip, self.clip_val, self.clip_norm_type)
            self.latest_clip_stats = stats
            self.clip_suggester.update(stats.norm_before)
            self._window_clipped = self._window_clipped + stats.clipped.float()
            self._window_steps += 1
            if logging_step:
                values = stats.to_floats()
                metrics.update(
                    {
                        "gradhealth/grad_norm/total": values["norm_before"],
                        "gradhealth/grad_norm/total_clipped": values["norm_after"],
                        "gradhealth/clip/coefficient": values["coefficient"],
                        "gradhealth/clip/clipped_steps_fraction": float(self._window_clipped) / self._window_steps,
                    }
                )
                self._window_clipped, self._window_steps = 0.0, 0
        elif logging_step:
            total = torch.linalg.vector_norm(grad_norms(parameters, self.clip_norm_type), self.clip_norm_type)
            self.clip_suggester.update(total)
            metrics["gradhealth/grad_norm/total"] = float(total)
        if logging_step:
            metrics["gradhealth/nonfinite/steps"] = float(self.nonfinite_steps)
            metrics["gradhealth/nonfinite/skipped_steps"] = float(self.skipped_steps)
            log_scalars(trainer, metrics, step)

    def _record_spectra(self, trainer: Any, step: int, full: bool) -> None:
        """Spectra of every hidden-to-hidden matrix: sigma_max by warm-started iteration on every
        logging step; every singular value and eigenvalue, histograms and pictures on ``full`` steps.

        The weights are those the step's gradients were computed with (before the update), so
        step 0 shows the matrices right after init.
        """
        metrics: dict[str, float] = {}
        histograms: dict[str, torch.Tensor] = {}
        images = {}
        writers = tensorboard_writers(trainer) if full and trainer.is_global_zero else []
        for record in self.recurrent_weights:
            if record.role != "recurrent":
                continue
            gates = len(record.gates)
            prefix = f"gradhealth/{record.layer_key}"
            if full:
                spectrum = full_spectrum(record.parameter, gates)
                self.spectra[record.full_name] = spectrum
                values = {
                    name: getattr(spectrum, name).tolist()
                    for name in ("sigma_max", "sigma_min", "condition", "spectral_radius", "orth_error", "outside_unit_circle")
                }
                finite = spectrum.finite.tolist()
                if writers:
                    for index, gate in enumerate(record.gates):
                        histograms[f"{prefix}/{gate}/singular_values"] = spectrum.singular_values[index]
                        if spectrum.eigenvalues is not None:
                            histograms[f"{prefix}/{gate}/eigenvalue_moduli"] = spectrum.eigenvalues[index].abs()
                    if spectrum.eigenvalues is not None:
                        images[f"{prefix}/eigenvalues"] = eigenvalue_image(spectrum.eigenvalues, record.gates, record.layer_key)
            else:
                tracker = self._sigma_trackers.setdefault(record.full_name, SigmaMaxTracker())
                sigma_max = tracker(record.parameter, gates)
                values = {"sigma_max": sigma_max.tolist()}
                finite = torch.isfinite(sigma_max).tolist()
            for name, per_gate in values.items():
                metrics.update({f"{prefix}/{gate}/{name}": value for gate, value in zip(record.gates, per_gate)})
            if not all(finite):
                bad = [gate for gate, ok in zip(record.gates, finite) if not ok]
                metrics[f"{prefix}/nonfinite_weight_blocks"] = float(len(bad))
                if (record.full_name, "weights") not in self._warned:
                    self._warned.add((record.full_name, "weights"))
                    rank_zero_warn(
                        f"GradHealth: {record.full_name} holds NaN/Inf in gate blocks {', '.join(bad)} at step {step}; "
                        "their spectra are logged as NaN."
                    )
        log_scalars(trainer, metrics, step)
        add_histograms(writers, histograms, step)
        add_images(writers, images, step)

    def _probe_notices(self) -> None:
        """Say once per module and kind what the probe could not measure exactly."""
        assert self._probe is not None
        notices = {
            **{
                ("repeated", name): f"{name!r} runs several times per training step; the first call that the loss reaches is measured."
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
        for key in sorted(notices.keys() - self._noticed):
            rank_zero_warn(f"GradHealth: {notices[key]}")
        self._noticed |= notices.keys()

    def _check_nonfinite(
        self, optimizer: Any, parameters: list[torch.Tensor], step: int, amp_scaler_active: bool, logging_step: bool
    ) -> bool:
        """One fused NaN/Inf check of the gradients; apply ``on_nonfinite``. True: skip the step.

        With ``"warn"`` the flags accumulate on the device and are read on logging steps only,
        so a healthy step costs no host sync; ``"skip"`` and ``"raise"`` must read them every
        step (one sync). Under 16-mixed the GradScaler skips such steps itself and lowers its
        scale: they are counted, never acted on, so the two never fight.
        """
        flagged = nonfinite_grads(parameters)
        if self.on_nonfinite == "warn" or amp_scaler_active:
            pending = self._pending_nonfinite.get(id(optimizer))
            if pending is not None:
                flagged, steps = pending[1] | flagged, pending[2] + flagged.any()
            else:
                steps = flagged.any().long()
            self._pending_nonfinite[id(optimizer)] = (parameters, flagged, steps)
            if logging_step:
                self._report_nonfinite(step, warn=not amp_scaler_active)
            return False
        if not bool(flagged.any()):
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
            rank_zero_warn(
                f"GradHealth: skipped the optimizer step at step {step}: non-finite gradients in {count} "
                f"parameters ({described}). Later skips are counted in gradhealth/nonfinite/skipped_steps."
            )
        return True

    def _describe(self, parameters: list[torch.Tensor], flagged: torch.Tensor) -> tuple[str, int]:
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
                rank_zero_warn(
                    f"GradHealth: non-finite gradients (NaN/Inf) in {count} parameters by step {step}: {described}. "
                    "The optimizer steps went ahead (on_nonfinite='warn'); on_nonfinite='skip' drops such steps."
                )
        self._pending_nonfinite.clear()

    @property
    def suggested_clip_val(self) -> Optional[float]:
        """A ``clip_val`` for ``clip="norm"`` from the norms seen (Pascanu et al. 2013: about the
        average norm over many updates); ``None`` before 100 norms were seen."""
        return self.clip_suggester.suggest()

    def _record_timesteps(self, trainer: Any, norms: dict[str, torch.Tensor], step: int) -> None:
        self.timestep_grad_norms = norms
        self.timestep_summaries = {
            key: summarize_timesteps(values, self.horizon_factor, reverse=key.removesuffix(".cell").endswith("_reverse"))
            for key, values in norms.items()
        }
        metrics: dict[str, float] = {}
        for key, summary in self.timestep_summaries.items():
            prefix = f"gradhealth/{key}"
            metrics.update(
                {
                    f"{prefix}/transmission": summary.transmission,
                    f"{prefix}/horizon": float(summary.horizon),
                    f"{prefix}/rate_per_step": summary.rate_per_step,
                    f"{prefix}/dh_norm_first": summary.first_norm,
                    f"{prefix}/dh_norm_last": summary.last_norm,
                }
            )
            condition = diagnose_timesteps(summary, self.vanish_below, self.explode_above)
            if condition is not None and not key.endswith(".cell") and (key, condition) not in self._warned:
                self._warned.add((key, condition))
                rank_zero_warn(
                    f"GradHealth: {condition} gradients through time in {key!r} at step {step}: "
                    f"||dL/dh|| is {summary.first_norm:.3g} at the layer's first step and {summary.last_norm:.3g} "
                    f"at its last ({summary.steps} steps) "
                    f"(transmission {summary.transmission:+.2f} decades, x{summary.rate_per_step:.3g} per step back, "
                    f"horizon {summary.horizon} of {summary.steps} steps); {_HINTS[condition]}."
                )
            history = self.timestep_history.setdefault(key, [])
            history.append((step, norms[key].numpy()))
            if len(history) > self.history_size:
                del history[::2]
        log_scalars(trainer, metrics, step)
        if step % self._full_interval == 0:
            self._add_timestep_images(trainer, step)

    def _add_timestep_images(self, trainer: Any, step: int) -> None:
        """Per layer: the latest ||dL/dh_t|| curve (with ||dL/dc_t|| for an LSTM) and the heatmap."""
        writers = tensorboard_writers(trainer) if trainer.is_global_zero else []
        if not writers:
            return
        images = {}
        for key, values in self.timestep_grad_norms.items():
            if key.endswith(".cell") and key.removesuffix(".cell") in self.timestep_grad_norms:
                continue  # drawn with its state's curve
            curves = {name: norms for name, norms in self.timestep_grad_norms.items() if name in (key, key + ".cell")}
            images[f"gradhealth/{key}/timestep_grad_norms"] = timestep_curve_image(curves, key, step)
            steps, rows = zip(*self.timestep_history[key])
            images[f"gradhealth/{key}/timestep_heatmap"] = timestep_heatmap_image(steps, rows, key)
        add_images(writers, images, step)

    def _detach(self) -> None:
        if self._probe is not None:
            self._probe.detach()
            self._probe = None
        self._armed_step = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Count and report the NaN/Inf flags gathered since the last logging step."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._report_nonfinite(_optimizer_steps(trainer), warn=not (scaler is not None and scaler.is_enabled()))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove every hook: after fit the model runs at full speed and pickles."""
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove every hook, so a failed run leaves the model as it was."""
        self._detach()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped: whether init was applied
        (and its seed), the heatmap rows, the non-finite counts, the clip-threshold statistics
        and the warm-start vectors of the sigma_max iteration. Tensors and plain Python values only."""
        return {
            "init_applied": self.init_applied,
            "init_seed": self.init_seed,
            "timestep_history": {
                key: [(step, torch.from_numpy(norms)) for step, norms in rows] for key, rows in self.timestep_history.items()
            },
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_steps": self.skipped_steps,
            "clip_suggester": self.clip_suggester.state_dict(),
            "sigma_trackers": {name: tracker.state_dict() for name, tracker in self._sigma_trackers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; Lightning calls it before ``on_fit_start`` on resume."""
        self.init_applied = bool(state_dict.get("init_applied", False))
        self.init_seed = state_dict.get("init_seed")
        self.timestep_history = {
            key: [(int(step), torch.as_tensor(norms).numpy()) for step, norms in rows]
            for key, rows in state_dict.get("timestep_history", {}).items()
        }
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        if "clip_suggester" in state_dict:
            self.clip_suggester.load_state_dict(state_dict["clip_suggester"])
        self._sigma_trackers = {}
        for name, tracker_state in state_dict.get("sigma_trackers", {}).items():
            self._sigma_trackers[name] = SigmaMaxTracker()
            self._sigma_trackers[name].load_state_dict(tracker_state)
