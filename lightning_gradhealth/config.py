"""Settings, declared once: what the engine measures and how it clips, and the flat signature
of the callback derived from the settings' declarations.

Each group of settings is a frozen dataclass that checks itself at construction:
:class:`~lightning_gradhealth.model_init.InitConfig` (what init writes) and :class:`MonitorConfig`
(what is measured, when, and what happens to the gradients). ``GradHealth``'s keyword signature,
which users and LightningCLI's YAML rely on, is built from their fields by
:func:`flat_signature`, and the configuration text in TensorBoard lists the same fields: a new
setting is written in its dataclass, where it is used, and in the docs.

A setting that is one of a few names (a scheme, a clip mode, a NaN/Inf policy) is read in any
case, ``"Norm"`` as ``"norm"``, in Python and from LightningCLI alike. LightningCLI sees it typed
as a :class:`SettingName`, which jsonargparse checks while it parses the command line or a config
file: a misspelt name stops the program there with one line, the constructor's message
(``error: GradHealth: Unknown init scheme 'identiy'. Did you mean 'identity'? ...``), before
anything is built.

Examples:
    >>> config = MonitorConfig(clip="norm", clip_val=1.0)
    >>> config.log_every_n_steps is None        # resolved at attach time (the Trainer's interval)
    True
    >>> MonitorConfig(log_every_n_steps=10, probe_every_n_steps=25)
    Traceback (most recent call last):
    ...
    ValueError: probe_every_n_steps=25 must be a multiple of log_every_n_steps=10: the probe runs on logging steps
    >>> MonitorConfig(on_nonfinite="ignore")
    Traceback (most recent call last):
    ...
    ValueError: on_nonfinite must be one of 'warn', 'skip', 'raise', got 'ignore'
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Optional

from lightning_gradhealth._validation import (
    boolean,
    choice,
    finite_number,
    gate_counts,
    norm_order,
    integer,
    optional_integer,
    optional_string,
    pattern_list,
    real_number,
)
from lightning_gradhealth.clipping import CLIP_MODES, validate_clip_args
from lightning_gradhealth.defaults import EXPLODE_ABOVE, HORIZON_FACTOR, LYAPUNOV_K, VANISH_BELOW
from lightning_gradhealth.inits import resolve_scheme

if TYPE_CHECKING:
    from lightning_gradhealth.model_init import InitConfig

__all__ = [
    "NONFINITE_POLICIES",
    "MonitorConfig",
    "SETTING_NAMES",
    "SettingName",
    "flat_signature",
    "init_settings_in_effect",
    "read_setting",
    "refuse_setting",
    "settings_of",
]

NONFINITE_POLICIES = ("warn", "skip", "raise")


@dataclass(frozen=True)
class MonitorConfig:
    """What :class:`~lightning_gradhealth.GradHealthMonitor` measures, when, and what it does to gradients.

    Args:
        custom: hidden-to-hidden matrices of your own modules: glob pattern over parameter
            names -> gate count (blocks stacked along dim 0), e.g. ``{"cell.W_hh": 4}``; every
            parameter a pattern matches must be of shape ``(gates * H, H)``, checked at attach time.
        timesteps: measure per-timestep gradient norms (``False``: never attach a hook); a bool.
        custom_cells: glob patterns over module names of your own cells, modules your loop
            calls once per timestep that return ``h_t`` or ``(h_t, c_t, ...)``.
        log_every_n_steps: measuring interval in optimizer steps (``sigma_max``, gradient
            norms); ``None``: the interval given at attach time (the Trainer's
            ``log_every_n_steps`` under Lightning, else
            :data:`~lightning_gradhealth.defaults.DEFAULT_LOG_EVERY_N_STEPS`).
        probe_every_n_steps: interval of the dL/dh_t probe, the costly measurement (a probed
            step costs about two plain ones). ``None``: ``log_every_n_steps`` when that is
            given here (every measurement at the interval you chose), else
            :data:`~lightning_gradhealth.defaults.PROBE_EVERY_N_LOGS` x the logging interval.
            The probe runs on logging steps, so it must be a multiple of ``log_every_n_steps``
            when both are given; against an interval resolved at attach time it is rounded up
            to the next multiple. Full passes always run the probe too, so that their pictures
            show a fresh curve.
        full_every_n_steps: interval of the full spectra, histograms and pictures; default
            :data:`~lightning_gradhealth.defaults.FULL_EVERY_N_LOGS` x the logging interval. Full
            passes happen on logging steps, so it must be a multiple of ``log_every_n_steps``
            when both are given; against an interval resolved at attach time it is rounded up
            to the next multiple.
        lyapunov_k: how many Lyapunov exponents of each recurrent layer the probe computes, at
            most every ``PROBE_EVERY_N_LOGS`` logging intervals (``Schedule.takes_exponents``;
            :mod:`~lightning_gradhealth.lyapunov`: the growth rates of the product of
            the state-to-state Jacobians along the trajectory the layer took); 0: none.
        lyapunov_warmup: leading steps of each sequence whose growth the exponents do not count
            (the tangent frame still evolves through them, turning towards the directions that
            grow most); an integer >= 0, below the sequences' length.
        vanish_below: warn (once per layer) when ||dL/dh_0|| / ||dL/dh_{T-1}|| falls below this;
            in (0, 1), since a ratio of 1 is a gradient that neither fades nor grows.
        explode_above: warn (once per layer) when that ratio rises above this; finite and > 1.
        horizon_factor: the fall that ends the ``horizon`` (see :mod:`lightning_gradhealth.health`);
            finite and > 1, since a factor <= 1 allows no fall at all.
        clip: ``None``, ``"norm"`` (global norm, Pascanu et al. 2013), ``"value"``
            (element-wise) or ``"agc"`` (adaptive, unit-wise, Brock et al. 2021); any case.
        clip_val: the threshold: max total norm, max absolute value, or AGC's lambda.
        clip_norm_type: the p of the norms (``float("inf")`` for the max-norm).
        on_nonfinite: what a step with a NaN/Inf gradient does: ``"warn"``, ``"skip"`` or
            ``"raise"``; any case.

    Every number may also be a numpy or 0-d torch scalar of a real dtype (stored as a Python
    ``float`` or ``int``); a bool is not a number here.

    Raises:
        TypeError: a setting of the wrong type, named with what was given and what is allowed
            (``timesteps`` that is not a bool, one bare string for ``custom_cells``, ...).
        ValueError: an invalid interval, threshold, pattern, clip setting or policy.
    """

    custom: Optional[dict[str, int]] = None
    timesteps: bool = True
    custom_cells: Optional[list[str]] = None
    log_every_n_steps: Optional[int] = None
    probe_every_n_steps: Optional[int] = None
    full_every_n_steps: Optional[int] = None
    lyapunov_k: int = LYAPUNOV_K
    lyapunov_warmup: int = 0
    vanish_below: float = VANISH_BELOW
    explode_above: float = EXPLODE_ABOVE
    horizon_factor: float = HORIZON_FACTOR
    clip: Optional[str] = None
    clip_val: Optional[float] = None
    clip_norm_type: float = 2.0
    on_nonfinite: str = "warn"

    def __post_init__(self) -> None:
        clip, clip_val, clip_norm_type = self._clipping()
        settings = {
            "custom": gate_counts("custom", self.custom),
            "timesteps": boolean("timesteps", self.timesteps),
            "custom_cells": pattern_list("custom_cells", self.custom_cells),
            "log_every_n_steps": optional_integer(
                "log_every_n_steps", self.log_every_n_steps, "None or an integer >= 1", minimum=1
            ),
            "probe_every_n_steps": optional_integer(
                "probe_every_n_steps", self.probe_every_n_steps, "None or an integer >= 1", minimum=1
            ),
            "full_every_n_steps": optional_integer(
                "full_every_n_steps", self.full_every_n_steps, "None or an integer >= 1", minimum=1
            ),
            "lyapunov_k": integer("lyapunov_k", self.lyapunov_k, "an integer >= 0 (0: no Lyapunov exponents)", minimum=0),
            "lyapunov_warmup": integer(
                "lyapunov_warmup", self.lyapunov_warmup, "an integer >= 0 (steps not counted at each sequence's start)", minimum=0
            ),
            "vanish_below": finite_number(
                "vanish_below",
                self.vanish_below,
                "a number in (0, 1): the ratio ||dL/dh_first|| / ||dL/dh_last|| below which gradients count as vanishing",
                above=0,
                below=1,
            ),
            "explode_above": finite_number(
                "explode_above",
                self.explode_above,
                "a finite number > 1: the ratio ||dL/dh_first|| / ||dL/dh_last|| above which gradients count as exploding",
                above=1,
            ),
            "horizon_factor": finite_number(
                "horizon_factor",
                self.horizon_factor,
                "a finite number > 1: the horizon ends where ||dL/dh_t|| first falls this factor below the last "
                "step's, and a factor <= 1 allows no fall at all",
                above=1,
            ),
            "clip": clip,
            "clip_val": clip_val,
            "clip_norm_type": clip_norm_type,
            "on_nonfinite": choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES),
        }
        for name, value in settings.items():
            object.__setattr__(self, name, value)
        for name, what in (("probe_every_n_steps", "the probe runs"), ("full_every_n_steps", "full passes happen")):
            interval = getattr(self, name)
            if self.log_every_n_steps and interval and interval % self.log_every_n_steps:
                raise ValueError(
                    f"{name}={interval} must be a multiple of log_every_n_steps={self.log_every_n_steps}: "
                    f"{what} on logging steps"
                )

    def _clipping(self) -> tuple[Optional[str], Optional[float], float]:
        """``(clip, clip_val, clip_norm_type)`` checked and normalized
        (:func:`~lightning_gradhealth.clipping.validate_clip_args`), each error naming its argument."""
        modes = f"None or one of {', '.join(map(repr, CLIP_MODES))}"
        clip = optional_string("clip", self.clip, modes)
        allowed = "a finite number > 0 (the threshold, with clip) or None"
        clip_val = None if self.clip_val is None else real_number("clip_val", self.clip_val, allowed)
        return validate_clip_args(clip, clip_val, norm_order("clip_norm_type", self.clip_norm_type))


def _fields(*configs: type) -> dict[str, tuple[Any, Any]]:
    """Name -> (type, default) of every field of ``configs`` in order; a field that two of them
    share (same name, same type and default) once."""
    fields: dict[str, tuple[Any, Any]] = {}
    for config in configs:
        hints = typing.get_type_hints(config)
        for field in dataclasses.fields(config):
            declared = (hints[field.name], field.default)
            if fields.setdefault(field.name, declared) != declared:
                raise TypeError(f"{config.__name__}.{field.name} differs from the field of the same name before it")
    return fields


def flat_signature(*configs: type, positional: tuple[str, ...] = (), method: bool = False) -> inspect.Signature:
    """One keyword signature with every field of the dataclasses ``configs`` (types and defaults
    as declared; ``positional`` names may also be passed by position; ``method``: ``self``
    first), for a constructor that takes them all flat, as LightningCLI reads it. A setting of
    :data:`SETTING_NAMES`, declared ``str`` or ``Optional[str]``, is typed as its
    :class:`SettingName` instead, so that LightningCLI checks it while parsing.

    Examples:
        >>> from lightning_gradhealth.model_init import InitConfig
        >>> signature = flat_signature(InitConfig, MonitorConfig, positional=("init",))
        >>> signature.parameters["init"].annotation == Optional[SETTING_NAMES["init"]]
        True
        >>> signature.parameters["clip_val"]
        <Parameter "clip_val: Optional[float] = None">
    """
    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD if name in positional else inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=_annotation_for_the_command_line(name, annotation),
        )
        for name, (annotation, default) in _fields(*configs).items()
    ]
    parameters.sort(key=lambda parameter: parameter.kind)  # positional first, in their order
    if method:
        parameters.insert(0, inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(parameters, return_annotation=None)


class SettingName(str):
    """How LightningCLI sees a setting that is one of a few names: a ``str`` that jsonargparse
    checks and normalizes (:meth:`parse`) while it parses the command line or a config file.

    Each setting of :data:`SETTING_NAMES` has its own subclass, which knows the setting and the
    check the constructor runs on it. A name is accepted in any case and passed on in its
    canonical form (``"Identity"`` as ``"identity"``). A name the check refuses stops the program
    at once with one line, ``error: GradHealth: <the constructor's message>``, as argparse stops on
    a bad option: jsonargparse would otherwise print the usage of every Trainer option around it,
    or, for a value it took as any string, a traceback from the constructor. In Python the
    constructor raises its ``ValueError`` as always; nothing here is involved.

    Without jsonargparse installed the subclasses are plain ``str`` types and nothing is registered.

    Examples:
        >>> SETTING_NAMES["clip"].parse("Norm")
        'norm'
        >>> SETTING_NAMES["init"].parse("identiy")
        Traceback (most recent call last):
        ...
        SystemExit: error: GradHealth: Unknown init scheme 'identiy'. Did you mean 'identity'? Valid names: \
'orthogonal', 'glorot', 'xavier', 'glorot_normal', 'he', 'kaiming', 'identity', 'uniform' or None.
    """

    setting: ClassVar[str]
    check: ClassVar[Callable[[str], str]]

    @classmethod
    def parse(cls, value: object) -> str:
        """``value`` checked and normalized by the setting's own check.

        Raises:
            ValueError: ``value`` is not a string (jsonargparse then tries the other types of
                the setting's annotation: ``None``).
            SystemExit: a string the check refuses, with its message.
        """
        if not isinstance(value, str):
            raise ValueError(f"{cls.setting} is a name, got {value!r}")
        try:
            return cls.check(value)
        except ValueError as error:
            raise SystemExit(f"error: GradHealth: {error}") from None


def _setting_name(type_name: str, setting: str, check: Callable[[str], str]) -> type[SettingName]:
    """The :class:`SettingName` of ``setting``, registered with jsonargparse when it is installed.

    ``check`` is what the settings' dataclass runs on the value: it returns the canonical name or
    raises ``ValueError`` with the message Python users see."""
    name_type = type(type_name, (SettingName,), {"setting": setting, "check": staticmethod(check), "__module__": __name__})
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # no jsonargparse, no LightningCLI: nothing parses these names
        return name_type
    register_type(name_type, serializer=str, deserializer=name_type.parse)
    return name_type


def _clip_mode(value: str) -> str:
    """``value`` as a clip mode, refused with :func:`~lightning_gradhealth.clipping.validate_clip_args`'s
    own message (the threshold 1.0 stands for any valid one: only the mode is checked)."""
    mode, _, _ = validate_clip_args(value, clip_val=1.0)
    assert mode is not None
    return mode


SETTING_NAMES: dict[str, type[SettingName]] = {
    **{
        setting: _setting_name("SchemeName", setting, functools.partial(resolve_scheme, argument=setting))
        for setting in ("init", "input_init", "linear_init")
    },
    "clip": _setting_name("ClipMode", "clip", _clip_mode),
    "on_nonfinite": _setting_name(
        "NonfinitePolicy", "on_nonfinite", functools.partial(choice, "on_nonfinite", choices=NONFINITE_POLICIES)
    ),
}
"""The settings that are one of a few names, and their :class:`SettingName` types."""


def _annotation_for_the_command_line(name: str, declared: Any) -> Any:
    """The annotation :func:`flat_signature` gives the setting ``name``: its :class:`SettingName`
    in place of ``str`` for a setting of :data:`SETTING_NAMES`, else ``declared``."""
    if name not in SETTING_NAMES:
        return declared
    if declared is str:
        return SETTING_NAMES[name]
    if declared == Optional[str]:
        return Optional[SETTING_NAMES[name]]
    raise TypeError(f"the setting {name!r} is read as a name: declare it str or Optional[str], not {declared}")


def read_setting(owner: object, configs: Iterable[Any], name: str) -> Any:
    """The field ``name`` of the first of ``configs`` that has one, for ``owner.__getattr__``, so
    every setting reads as an attribute of the object built from it.

    Raises:
        AttributeError: no config has that field (as an ordinary missing attribute would).
    """
    for config in configs:
        if config is not None and name in {field.name for field in dataclasses.fields(config)}:
            return getattr(config, name)
    raise AttributeError(f"{type(owner).__name__!r} object has no attribute {name!r}")


def refuse_setting(owner: object, configs: Iterable[Any], name: str) -> None:
    """For ``owner.__setattr__``: a setting cannot be assigned on the object (the configs are
    frozen, and an assignment would shadow them unseen).

    Raises:
        AttributeError: ``name`` is a field of one of ``configs``, with what to do instead.
    """
    for config in configs:
        if config is not None and name in {field.name for field in dataclasses.fields(config)}:
            raise AttributeError(
                f"{type(owner).__name__}.{name} is a setting of its {type(config).__name__}, which is frozen: "
                f"build a new {type(owner).__name__}, or assign a new config made with "
                f"dataclasses.replace(config, {name}=...) between runs"
            )


def settings_of(config: type, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``arguments`` that are fields of the dataclass ``config``."""
    names = {field.name for field in dataclasses.fields(config)}
    return {name: value for name, value in arguments.items() if name in names}


_RECURRENT_INIT_SETTINGS = ("input_init", "gain", "forget_bias", "chrono_t_max")
"""The :class:`~lightning_gradhealth.InitConfig` settings that apply only with ``init``: they
shape what init writes to the recurrent layers (``uniform_scale`` serves ``linear_init`` too)."""


def init_settings_in_effect(config: InitConfig, seed: Optional[int]) -> dict[str, Any]:
    """The init settings as applied, for the configuration text: those that had no effect are
    left out, so the text never shows a scheme for weights that were not written.

    - ``init=None`` and ``linear_init=None``: no weight is written; ``init`` and ``linear_init``
      are shown with an ``initialized`` row that says so, and no other init setting.
    - ``init=None`` with ``linear_init``: only ``nn.Linear`` layers are written; the recurrent
      settings (``input_init``, ``gain``, ``forget_bias``, ``chrono_t_max``) are left out.
    - with ``init``: every setting, but ``forget_bias`` when ``chrono_t_max`` replaces it, and
      ``uniform_scale`` when no scheme is ``"uniform"``.

    ``custom`` is left to the monitor's settings, which measure the same matrices. ``seed`` is
    the seed the init used (or the configured one, ``None`` when none was given).

    Examples:
        >>> from lightning_gradhealth.model_init import InitConfig
        >>> init_settings_in_effect(InitConfig(), seed=None)
        {'init': None, 'linear_init': None, 'initialized': 'nothing: init=None and linear_init=None leave every weight as it was'}
        >>> sorted(init_settings_in_effect(InitConfig(init="orthogonal", chrono_t_max=50), seed=7))
        ['chrono_t_max', 'exclude', 'force_init', 'gain', 'init', 'input_init', 'linear_init', 'seed']
    """
    if not config.changes_weights:
        return {
            "init": None,
            "linear_init": None,
            "initialized": "nothing: init=None and linear_init=None leave every weight as it was",
        }
    left_out = {"custom"}
    if config.init is None:
        left_out.update(_RECURRENT_INIT_SETTINGS)
    if config.chrono_t_max is not None:
        left_out.add("forget_bias")
    if "uniform" not in (config.init, config.input_init if config.init is not None else None, config.linear_init):
        left_out.add("uniform_scale")
    settings = {**dataclasses.asdict(config), "seed": seed}
    applied = {name: value for name, value in settings.items() if name not in left_out}
    if config.init is None:
        applied["initialized"] = "nn.Linear layers only (linear_init): init=None leaves the recurrent layers as they were"
    return applied
