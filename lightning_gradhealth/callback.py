"""GradHealth: the Lightning callback. It schedules and wires; the measuring is done by
:class:`~lightning_gradhealth.GradHealthMonitor` and the math lives in the other modules.

- ``on_fit_start``: initialize the recurrent layers once (:mod:`~lightning_gradhealth.model_init`),
  keeping the modules whose weights were loaded or trained before (:mod:`~lightning_gradhealth.provenance`),
  and attach the monitor (the timestep probe's forward hooks).
- ``on_train_start``: record the configuration and the custom-scalars layout in TensorBoard, at
  the step the run starts from.
- ``on_train_batch_start``: the monitor arms the probe on a probe step; on every other step
  it does a counter check and nothing else.
- ``on_after_backward``, manual optimization only, on logging steps: each optimizer's gradient
  norm before the user's own ``clip_gradients`` can change it.
- ``on_before_optimizer_step`` (gradients are AMP-unscaled and accumulation is complete): the
  monitor measures, checks and clips; the callback sends the scalars to every logger and the
  histograms and pictures to TensorBoard.
- ``on_train_end``: the health report, printed on rank 0 and written as TensorBoard text, and
  the final spectra (with pictures after a long run) at the last step.
- end of fit (or an exception): remove every hook.

The arguments are declared once, as the fields of :class:`~lightning_gradhealth.InitConfig` and
:class:`~lightning_gradhealth.MonitorConfig`: ``GradHealth``'s signature is built from them
(:func:`~lightning_gradhealth.config.flat_signature`), so LightningCLI sees every typed argument.
"""

from __future__ import annotations

import dataclasses
import glob
import time
import weakref
from typing import Any, Generic, Optional, TypeVar

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradhealth import defaults, tags
from lightning_gradhealth._compat import CallbackBase
from lightning_gradhealth.clipping import ClipStats, ClipThresholdSuggester, grad_norms
from lightning_gradhealth.config import (
    MonitorConfig,
    flat_signature,
    init_settings_in_effect,
    read_setting,
    refuse_setting,
    settings_of,
)
from lightning_gradhealth.distributed import fsdp_root, sharded, whole_parameters
from lightning_gradhealth.health import HealthReport, TimestepSummary
from lightning_gradhealth.layers import WeightRecord
from lightning_gradhealth.model_init import InitConfig, InitRecord, find_weights_to_initialize, format_init_report, initialize_
from lightning_gradhealth.monitor import GradHealthMonitor
from lightning_gradhealth.provenance import frozen_parameters, trained_modules
from lightning_gradhealth.spectra import MatrixSpectrum
from lightning_gradhealth.trackers import OtherClipping
from lightning_gradhealth.tensorboard import add_text, config_markdown, custom_scalars_layout, tensorboard_writers, write_outputs

__all__ = ["GradHealth"]

Value = TypeVar("Value")

_SETTINGS = flat_signature(InitConfig, MonitorConfig, positional=("init",), method=True)
"""GradHealth's arguments: every field of the two configs, ``init`` also by position."""


class _FromMonitor(Generic[Value]):
    """A read-only attribute of the callback that is the monitor's attribute of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Optional[GradHealth], owner: type) -> Value:
        if instance is None:
            return self  # type: ignore[return-value]
        return getattr(instance.monitor, self.name)

    def __set__(self, instance: GradHealth, value: Any) -> None:
        raise AttributeError(f"GradHealth.{self.name} is what the monitor measured, read-only")


def _logging_step(trainer: Any) -> int:
    """The step Lightning's loggers put on the x axis: batches that stepped so far, one per
    accumulation window, and one per batch however many optimizer steps a manual training step
    takes (``trainer.global_step`` counts those)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def _optimizer_name(index: int, count: int) -> str:
    """The name the monitor logs optimizer ``index`` of ``count`` under: none for a single one."""
    return f"optimizer_{index}" if count > 1 else ""


def _trainer_clipping(trainer: Any) -> Optional[OtherClipping]:
    """The Trainer's own clipping (``gradient_clip_val``), which runs after GradHealth sees the gradients."""
    if not trainer.gradient_clip_val:
        return None
    algorithm = trainer.gradient_clip_algorithm or "norm"
    value, algorithm = float(trainer.gradient_clip_val), str(getattr(algorithm, "value", algorithm))  # Lightning's enum
    return OtherClipping(f"the Trainer (gradient_clip_val={value:g}, gradient_clip_algorithm={algorithm!r})", algorithm, value)


def _amp_scaler(trainer: Any) -> Any:
    """The GradScaler of a 16-mixed run (it skips steps with NaN/Inf gradients itself), else ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


@dataclasses.dataclass
class _Family:
    """What a ``GradHealth`` and the copies made from it share: which once-only messages were
    given, and how many fits they ran."""

    fits: int = 0
    printed_init_table: bool = False
    noticed_no_writer: bool = False


class GradHealth(CallbackBase):
    """Gradient health for recurrent networks: principled init, exact gradients through time.

    With no arguments it changes no weight, so a team template can enable it for every run,
    fine-tuning included. With ``init`` it initializes every ``nn.RNN``/``nn.LSTM``/``nn.GRU``
    layer (all layers, both directions), every ``nn.RNNCell``/``LSTMCell``/``GRUCell`` and the
    custom matrices you name, per gate block, exactly once: at ``on_fit_start``, after
    ``configure_model`` and before the first optimizer step; never when resuming from a
    checkpoint (``trainer.fit(ckpt_path=...)``) nor on a second ``fit`` of the same model. Under DDP every rank
    draws from rank 0's seed, so the weights are identical on every rank.

    Every ``probe_every_n_steps`` optimizer steps (by default one logging step of the Trainer's
    in :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS`, or every logging step when you
    give ``log_every_n_steps`` here; step 0 and every full pass always) it measures the exact norm
    of dL/dh_t at every timestep of every recurrent layer (:attr:`timestep_grad_norms`) and logs, per layer and
    direction, ``gradhealth/<layer>/1_transmission``, ``.../2_horizon``, ``.../rate_per_step``,
    ``.../dh_norm_first`` and ``.../dh_norm_last`` (definitions in
    :mod:`lightning_gradhealth.health`), and every ``full_every_n_steps`` steps after step 0 two
    pictures to TensorBoard: the latest curve over t and a heatmap over (training step, t). L is the loss
    Lightning backpropagates (divided by ``accumulate_grad_batches``; the first micro-batch of
    the window is measured), AMP-unscaled.

    On logging steps it also logs ``gradhealth/<layer>/5_sigma_max/<gate>`` of every
    hidden-to-hidden matrix (warm-started iteration), and on every ``full_every_n_steps`` the
    full spectra (``sigma_min``, ``condition``, ``spectral_radius``, ``orth_error``,
    ``outside_unit_circle``), their histograms and (after step 0) an eigenvalue picture
    (:mod:`lightning_gradhealth.spectra`); step 0 shows the weights right after init, as numbers
    only, so that a short fit is not slowed by drawing. At the end of fit the final spectra go to
    the loggers too, at the last step, with the pictures when the run reached a full pass after
    step 0 or trained for :data:`~lightning_gradhealth.defaults.FINAL_PICTURES_AFTER_SECONDS`.

    On every optimizer step it checks the gradients for NaN/Inf (one fused check) and, with
    ``clip``, clips them; on logging steps it logs the true gradient norm
    ``gradhealth/grad_norm/total`` (before clipping, unscaled), with ``clip`` also
    ``gradhealth/grad_norm/total_clipped``, ``gradhealth/clip/coefficient`` and
    ``gradhealth/clip/clipped_steps_fraction`` (over the steps since the previous log), the
    gradient norm of each recurrent layer's weights ``gradhealth/<layer>/weight_grad_norm``, and
    the counts ``gradhealth/nonfinite/steps`` and ``gradhealth/nonfinite/skipped_steps``. With
    several optimizers (manual optimization) each one's norms and clipping statistics go under
    ``gradhealth/grad_norm/optimizer_<i>/...`` and ``gradhealth/clip/optimizer_<i>/...``.

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
        force_init: also initialize the modules whose weights were loaded or trained before
            this fit, which are otherwise kept with one warning (the evidence is in the values:
            :mod:`lightning_gradhealth.provenance`). Frozen parameters are never written.
        timesteps: measure per-timestep gradient norms (``False``: never attach a hook).
        custom_cells: glob patterns over module names of your own cells, modules your loop
            calls once per timestep that return ``h_t`` or ``(h_t, c_t, ...)``.
        log_every_n_steps: measuring interval in optimizer steps (``sigma_max``, gradient
            norms); default the Trainer's ``log_every_n_steps``.
        probe_every_n_steps: interval of the dL/dh_t probe, which costs about two plain steps
            on the steps it runs. Default: ``log_every_n_steps`` when you give that here (so
            ``GradHealth(log_every_n_steps=1)`` probes every step), else
            :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS` x the Trainer's interval
            (every 400 steps with Lightning's default of 50). It must be a multiple of
            ``log_every_n_steps`` when both are given, and is rounded up to one when the
            interval comes from the Trainer. Full passes run the probe too.
        full_every_n_steps: interval of the full spectra, histograms and pictures; default
            :data:`~lightning_gradhealth.defaults.FULL_EVERY_N_LOGS` x ``log_every_n_steps``; it
            must be a multiple of ``log_every_n_steps`` when both are given, and is rounded up to
            one when the interval comes from the Trainer.
        lyapunov_k: how many Lyapunov exponents of each recurrent layer the probe computes, at
            most every :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS` logging
            intervals (default :data:`~lightning_gradhealth.defaults.LYAPUNOV_K`; 0: none): the
            growth rates per step of the product of the state-to-state Jacobians along the
            trajectory the layer took (:mod:`lightning_gradhealth.lyapunov`).
        lyapunov_warmup: leading steps of each sequence whose growth the exponents do not count.
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
            the heatmap: at most :data:`~lightning_gradhealth.defaults.HISTORY_SIZE`, evenly
            spaced over the run (the first and the latest always kept); a probe longer than
            :data:`~lightning_gradhealth.defaults.HEATMAP_COLUMNS` timesteps is kept in bins,
            the largest norm of each.
        lyapunov_exponents: ``{layer key: (k,) tensor}``, keyed like ``timestep_grad_norms``
            (one entry per layer and direction, no ``.cell``): the top ``lyapunov_k`` Lyapunov
            exponents of the layer's state dynamics on the latest probe's batch, sorted
            descending, natural log per step (:mod:`~lightning_gradhealth.lyapunov`).
        spectra: ``{parameter name: MatrixSpectrum}`` of the latest full pass.
        latest_clip_stats: the :class:`~lightning_gradhealth.clipping.ClipStats` of the latest
            clipped step (0-d tensors: pre/post-clip norm, coefficient, clipped fraction).
        suggested_clip_val: a ``clip_val`` for ``clip="norm"`` from the norms seen.
        nonfinite_steps: optimizer steps whose gradients held NaN/Inf; ``skipped_steps``: those skipped.
        health_report: the :class:`~lightning_gradhealth.health.HealthReport` of the latest fit
            (``None`` before the end of the first fit).
        monitor: the :class:`~lightning_gradhealth.GradHealthMonitor` that measures;
            the attributes above, but the init ones, are its.
        init_config, monitor.config: the settings, as
            :class:`~lightning_gradhealth.InitConfig` and :class:`~lightning_gradhealth.MonitorConfig`;
            every argument above is also readable as an attribute of the same name.

    Raises:
        TypeError: at construction, for an argument of the wrong type (a bare string where a
            list of patterns goes, a bool or a string where a number goes), naming it, what was
            given and what is allowed.
        ValueError: at construction, for an unknown scheme name (the message lists the valid
            names and the closest match), a gain that is not positive and finite, an invalid gate count,
            seed, interval or threshold; at the start of fit, before any step, for a
            ``custom``, ``exclude`` or ``custom_cells`` pattern that matches nothing, a
            ``custom`` pattern that matches a parameter that is not a ``(gates * H, H)``
            hidden-to-hidden matrix, for ``clip`` together with the Trainer's
            ``gradient_clip_val``, and for ``clip="agc"`` or ``"value"`` under FSDP.

    At the start of fit the configuration goes to TensorBoard as text (``gradhealth/config``)
    with a custom-scalars layout (the "Custom Scalars" tab: per layer, transmission, horizon,
    spectral radius and sigma_max per gate; the gradient norms before and after clipping). At
    the end of fit rank 0 prints the health report, a verdict per layer (healthy, short memory,
    vanishing, exploding, saturating) with its reason in numbers, also written as ``gradhealth/report``.
    Scalars go to every logger; histograms, pictures and text only to TensorBoard loggers (one
    notice when there is none).

    Example::

        from pytorch_lightning import Trainer
        from lightning_gradhealth import GradHealth

        health = GradHealth(init="orthogonal", chrono_t_max=200)
        trainer = Trainer(callbacks=[health])
        trainer.fit(model)
        health.timestep_grad_norms["rnn.l0"]   # ||dL/dh_t|| for t = 0..T-1, latest probe
        print(health.health_report.format())
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = _SETTINGS.bind(self, *args, **kwargs).arguments
        self.init_config = InitConfig(**settings_of(InitConfig, arguments))
        self.monitor = GradHealthMonitor(MonitorConfig(**settings_of(MonitorConfig, arguments)), warn=rank_zero_warn)
        self.init_report: list[InitRecord] = []
        self.init_applied = False
        self.init_seed: Optional[int] = None
        self.health_report: Optional[HealthReport] = None
        self._initialized_model: Optional[weakref.ref] = None
        self._writers: list[Any] = []
        self._norms_after_backward: dict[int, tuple[int, torch.Tensor]] = {}  # manual optimization: (step, norm)
        self._origin: Optional[weakref.ref[GradHealth]] = None  # the object a copy was made from
        self._ran_fit = False  # a fit started since the last release
        self._family = _Family()
        self._train_started = time.monotonic()  # of the current fit's training (on_train_start)

    __init__.__signature__ = _SETTINGS  # type: ignore[attr-defined]  # what LightningCLI and help() read

    def _configs(self) -> tuple[Any, Any]:
        monitor = self.__dict__.get("monitor")
        return self.__dict__.get("init_config"), None if monitor is None else monitor.config

    def __getattr__(self, name: str) -> Any:
        """The settings, by name: ``health.clip_val`` is ``health.monitor.config.clip_val``."""
        return read_setting(self, self._configs(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_setting(self, self._configs(), name)
        super().__setattr__(name, value)

    recurrent_weights: _FromMonitor[list[WeightRecord]] = _FromMonitor()
    timestep_grad_norms: _FromMonitor[dict[str, torch.Tensor]] = _FromMonitor()
    timestep_summaries: _FromMonitor[dict[str, TimestepSummary]] = _FromMonitor()
    timestep_history: _FromMonitor[dict[str, list[tuple[int, np.ndarray]]]] = _FromMonitor()
    lyapunov_exponents: _FromMonitor[dict[str, torch.Tensor]] = _FromMonitor()
    spectra: _FromMonitor[dict[str, MatrixSpectrum]] = _FromMonitor()
    latest_clip_stats: _FromMonitor[Optional[ClipStats]] = _FromMonitor()
    clip_suggester: _FromMonitor[ClipThresholdSuggester] = _FromMonitor()
    suggested_clip_val: _FromMonitor[Optional[float]] = _FromMonitor()
    nonfinite_steps: _FromMonitor[int] = _FromMonitor()
    skipped_steps: _FromMonitor[int] = _FromMonitor()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Initialize (once), attach the monitor, record the configuration and the dashboard layout."""
        clip, clip_val = self.monitor.config.clip, self.monitor.config.clip_val
        if clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"Both GradHealth(clip={clip!r}, clip_val={clip_val}) and "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the gradients, one after "
                "the other. Remove one: Trainer(gradient_clip_val=None), or GradHealth(clip=None) to keep "
                "the Trainer's clipping (GradHealth then still logs the true gradient norms)."
            )
        root = fsdp_root(getattr(trainer.strategy, "model", None))
        if root is not None and clip in ("agc", "value"):
            raise ValueError(
                f"GradHealth(clip={clip!r}) is not available under FSDP, where each process holds flat 1-D shards "
                "of the weights and their gradients (AGC needs whole rows; clipping by value would report one shard's "
                "norms). Use clip='norm', whose norm GradHealth reduces over all processes."
            )
        step = _logging_step(trainer)
        # under FSDP, find the layers and initialize on whole parameters; every rank writes the same values
        with whole_parameters(root, writeback=True):
            # on resume the loop's step counter is restored only after on_fit_start: keep the history
            self.monitor.attach(
                pl_module,
                None if trainer.ckpt_path is not None else step,
                default_log_every_n_steps=trainer.log_every_n_steps,
                distributed=None if root is None else sharded(root),
                other_clipping=_trainer_clipping(trainer),
            )
            self._initialize(trainer, pl_module)
        self._writers = tensorboard_writers(trainer) if trainer.is_global_zero else []
        if trainer.is_global_zero and not self._writers and not self._family.noticed_no_writer:
            self._family.noticed_no_writer = True
            loggers = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "none"
            rank_zero_warn(
                f"GradHealth: no TensorBoard logger among trainer.loggers ({loggers}): scalars go to every logger, "
                "histograms, pictures and the report text are not written; the health report still prints at the end of fit."
            )
        self._ran_fit = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Write the configuration and the custom-scalars layout to every TensorBoard log
        directory of this fit, a resumed run's new one included, at the step the run starts
        from (restored by now on resume)."""
        self._train_started = time.monotonic()
        config = self.monitor.config
        layout = custom_scalars_layout(self.monitor.layer_keys, config.clip is not None, config.lyapunov_k > 0)
        for writer in self._writers:
            writer.add_custom_scalars(layout)
        add_text(self._writers, tags.CONFIG, config_markdown(self._configuration()), _logging_step(trainer))

    def _configuration(self) -> dict[str, Any]:
        """The settings in effect, as recorded in TensorBoard: the init settings that apply
        (:func:`~lightning_gradhealth.config.init_settings_in_effect`) and every monitor setting,
        with the seed and the intervals as resolved, and the layers found."""
        schedule = self.monitor.schedule
        return {
            **init_settings_in_effect(self.init_config, self.init_seed if self.init_applied else self.init_config.seed),
            **dataclasses.asdict(self.monitor.config),
            "log_every_n_steps": schedule.log_every_n_steps,
            "probe_every_n_steps": schedule.probe_every_n_steps,
            "full_every_n_steps": schedule.full_every_n_steps,
            "layers": ", ".join(map(str, self.monitor.layer_keys)) or None,
        }

    def _initialize(self, trainer: Any, pl_module: Any) -> None:
        if not self.init_config.changes_weights:
            return
        if self._initialized_model is not None and self._initialized_model() is pl_module:
            rank_zero_info("GradHealth: init already applied to this model; weights left as they are.")
            return
        if trainer.ckpt_path is not None:
            rank_zero_info(f"GradHealth: resuming from {trainer.ckpt_path}; weights come from the checkpoint, no init.")
            self._initialized_model = weakref.ref(pl_module)  # a later fit of this model goes on from here too
            return
        seed = self.init_config.seed if self.init_config.seed is not None else torch.initial_seed()
        seed = trainer.strategy.broadcast(seed, src=0)
        config = self._config_keeping_trained(trainer, pl_module)
        self.init_report = initialize_(pl_module, config, generator=torch.Generator().manual_seed(seed))
        if not self.init_report:
            return
        self.init_seed, self.init_applied = seed, True
        self._initialized_model = weakref.ref(pl_module)
        self.monitor.record_init(self.init_report)
        layers = len({record.layer_key for record in self.init_report})
        summary = f"GradHealth: initialized {len(self.init_report)} parameters of {layers} layers (seed {seed})"
        if not self.init_report:
            return
        if self._family.printed_init_table:  # a refit of a copy (a retrain loop): one line
            rank_zero_info(f"{summary}; the table is in init_report.")
        else:
            self._family.printed_init_table = True
            rank_zero_info(f"{summary}:\n{format_init_report(self.init_report)}")

    def _config_keeping_trained(self, trainer: Any, pl_module: Any) -> InitConfig:
        """The init settings with the modules whose weights were trained or loaded before this
        fit (:func:`~lightning_gradhealth.provenance.trained_modules`) added to ``exclude``,
        unless ``force_init``; names them and the frozen parameters init leaves alone."""
        config = self.init_config
        records = find_weights_to_initialize(pl_module, config)
        frozen = frozen_parameters(records)
        if frozen:
            rank_zero_info(
                f"GradHealth: init leaves the {len(frozen)} frozen parameters (requires_grad=False) as they are: "
                f"{', '.join(frozen[:5])}{' and more' if len(frozen) > 5 else ''}."
            )
        if config.force_init:
            return config
        trainable = [record for record in records if record.tensor.requires_grad]  # frozen ones are never written anyway
        trained = trained_modules(pl_module, records=trainable, uniform_scale=config.uniform_scale)
        trained = trainer.strategy.broadcast(trained, src=0)  # every rank keeps the same modules
        if not trained:
            return config
        evidence = "; ".join(f"'{name}' ({why})" for name, why in trained.items())
        rank_zero_warn(
            f"GradHealth: init keeps the weights of {evidence}: they were loaded or trained before this fit "
            f"(see lightning_gradhealth.provenance); the other layers are initialized. To initialize these too: "
            f"GradHealth(init={config.init!r}, force_init=True)."
        )
        kept = [glob.escape(record.full_name) for record in records if record.module_name in trained]
        return dataclasses.replace(config, exclude=(*(config.exclude or ()), *kept))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Arm the probe on the first micro-batch of a probe step."""
        self.monitor.start_step(_logging_step(trainer))

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Capture the forward pass only (activation checkpointing replays forwards in backward),
        and one micro-batch only: later micro-batches of the window run unwatched."""
        self.monitor.stop_capture()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop capturing, also when the batch had no backward pass."""
        self.monitor.stop_capture()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        """Manual optimization: take each optimizer's gradient norm before the user's
        ``clip_gradients`` can change it (logging steps only), so the logged total is the true one."""
        step = _logging_step(trainer)
        if pl_module.automatic_optimization or not self.monitor.is_logging_step(step):
            return
        scaler = _amp_scaler(trainer)
        norm_type = self.monitor.config.clip_norm_type
        optimizers = trainer.optimizers
        for index, optimizer in enumerate(optimizers):
            if not self.monitor.schedule.logs_gradients(step, _optimizer_name(index, len(optimizers))):
                continue  # this optimizer's first step of this logged step is behind it (truncated BPTT)
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            norm = torch.linalg.vector_norm(grad_norms(parameters, norm_type), norm_type)
            norm = self.monitor.distributed.global_norms(norm, norm_type)
            self._norms_after_backward[index] = (step, norm / float(scaler.get_scale()) if scaler is not None else norm)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Gradients are complete and unscaled here: check, measure, clip, log.

        Runs before the Trainer's own clipping and ``optimizer.step()``, also inside a manual
        ``optimizer.step()``; once per accumulation window.
        """
        step = _logging_step(trainer)
        optimizers = trainer.optimizers
        index = next((i for i, candidate in enumerate(optimizers) if candidate is optimizer), 0)
        scaler = _amp_scaler(trainer)
        output = self.monitor.before_optimizer_step(
            step,
            [p for group in optimizer.param_groups for p in group["params"]],
            # the loss scale is read (one sync) on probe steps only: the probe's norms are divided by it
            grad_scale=float(scaler.get_scale()) if scaler is not None and self.monitor.is_probe_step(step) else 1.0,
            amp_scaler_active=scaler is not None,
            optimizer_name=_optimizer_name(index, len(optimizers)),
            grad_norm=self._norm_after_backward(index, step),
        )
        write_outputs(trainer.loggers, self._writers, output, step, self._picture_failed)

    def _norm_after_backward(self, index: int, step: int) -> Optional[torch.Tensor]:
        """The norm :meth:`on_after_backward` took for optimizer ``index`` in this step, if any."""
        taken_at, norm = self._norms_after_backward.pop(index, (None, None))
        return norm if taken_at == step else None

    def _picture_failed(self, tag: str, error: Exception) -> None:
        self.monitor.notices.say(
            ("error", "pictures"),
            f"could not draw {tag} ({type(error).__name__}: {error}); pictures that fail are left out, training goes on.",
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The health report: printed on rank 0, written to TensorBoard as text, kept as :attr:`health_report`."""
        step = _logging_step(trainer)
        self.health_report = self.monitor.finish(
            step, amp_scaler_active=_amp_scaler(trainer) is not None, optimizer_steps=trainer.global_step
        )
        if trainer.is_global_zero:
            # final pictures after a long fit only: FINAL_PICTURES_AFTER_SECONDS of training, or a full pass after step 0
            trained_for = time.monotonic() - self._train_started
            pictures = True if trained_for >= defaults.FINAL_PICTURES_AFTER_SECONDS else None
            write_outputs(trainer.loggers, self._writers, self.monitor.end_of_fit(step, pictures), step, self._picture_failed)
        self._family.fits += 1
        if self._origin is not None and self._family.fits > 1:  # a refit of a copy (a retrain loop): one line
            title = self.health_report.format().splitlines()[0]
            rank_zero_info(f"{title} (fit {self._family.fits}; the table is in health_report)")
        else:
            rank_zero_info(self.health_report.format())
        add_text(self._writers, tags.REPORT, self.health_report.markdown(), step)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove every hook: after fit the model runs at full speed and pickles."""
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove every hook, so a failed run leaves the model as it was."""
        self._release()

    def _release(self) -> None:
        self.monitor.detach()
        self._writers = []
        self._norms_after_backward = {}
        origin = self._origin() if self._origin is not None else None
        if origin is not None and self._ran_fit:  # a copy's predict or test leaves the results as they are
            origin._show_results_of(self)
        self._ran_fit = False

    def _show_results_of(self, copy: GradHealth) -> None:
        """Take the results of a fit that a copy of this object ran (see :meth:`__deepcopy__`)."""
        if copy.health_report is None:  # the copy's fit failed before its end: nothing to show
            return
        for name in ("monitor", "health_report", "init_report", "init_applied", "init_seed"):
            object.__setattr__(self, name, getattr(copy, name))

    def __getstate__(self) -> dict[str, Any]:
        """Only the settings and the resumable :meth:`state_dict` (plain values and tensors), so
        that a pickle holding this callback (a forecasting library saves its Trainer's callbacks
        with the model) loads with ``torch.load(weights_only=True)``: importing
        ``lightning_gradhealth`` allow-lists ``GradHealth`` for torch's safe loader. The results
        of a fit (report, norms) stay with the object that ran it."""
        settings = {**dataclasses.asdict(self.init_config), **dataclasses.asdict(self.monitor.config)}
        return {"settings": settings, "state": self.state_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`: the settings are checked again, as at construction.
        A pickle of an earlier version (the whole object) is rebuilt from its two configs."""
        if "settings" not in state:
            settings = {**dataclasses.asdict(state["init_config"]), **dataclasses.asdict(state["monitor"].config)}
            GradHealth.__init__(self, **settings)
            self.init_applied, self.init_seed = bool(state.get("init_applied", False)), state.get("init_seed")
            return
        GradHealth.__init__(self, **state["settings"])
        self.load_state_dict(state["state"])

    def __deepcopy__(self, memo: dict[int, Any]) -> GradHealth:
        """A copy with the same settings and state that shows its results on this object too:
        after a library fits a copy (neuralforecast copies its models with their callbacks, a
        retrain loop builds new Trainers), the ``GradHealth`` you created holds the latest
        fit's report, norms and init rows. Copies share the once-only messages (the init
        table, the full report, the no-TensorBoard notice), so a retrain loop prints them once."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(self.__getstate__())
        object.__setattr__(copied, "_origin", self._origin or weakref.ref(self))
        object.__setattr__(copied, "_family", self._family)
        return copied

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped: whether init was applied
        (and its seed) and the monitor's state (:meth:`GradHealthMonitor.state_dict`, with its
        format version). Tensors and plain Python values only."""
        return {"init_applied": self.init_applied, "init_seed": self.init_seed, **self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also one written by an older or newer version: see
        :meth:`GradHealthMonitor.load_state_dict`); Lightning calls it before ``on_fit_start`` on resume."""
        state = dict(state_dict)
        self.init_applied = bool(state.pop("init_applied", False))
        self.init_seed = state.pop("init_seed", None)
        self.monitor.load_state_dict(state)


# A pickled GradHealth holds its settings and plain state only (GradHealth.__getstate__): allow it
# in torch's safe loader, so that a saved model carrying its Trainer's callbacks loads with
# torch.load(weights_only=True) in any process that imports lightning_gradhealth.
torch.serialization.add_safe_globals([GradHealth])
