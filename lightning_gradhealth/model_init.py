"""Initialization of every recurrent layer of a model, by role and per gate block.

Hidden-to-hidden matrices get ``init``; input-to-hidden matrices get ``input_init`` (default
Glorot uniform, the Keras convention); biases are zeroed, with the LSTM forget-gate bias set to
``forget_bias`` counted once across ``bias_ih`` and ``bias_hh`` (PyTorch adds both vectors, so
setting both to 1 would give an effective bias of 2), or chrono-initialized (Tallec & Ollivier
2018) when ``chrono_t_max`` is given. Plain ``nn.Linear`` layers are touched only when
``linear_init`` is given.

This is the code :class:`~lightning_gradhealth.GradHealth` runs at the start of fit; without
Lightning, call :func:`initialize_` directly. (The schemes themselves, on single tensors, are in
:mod:`lightning_gradhealth.inits`.)

Examples:
    >>> import torch
    >>> model = torch.nn.LSTM(8, 16, num_layers=2)
    >>> report = initialize_(model, "orthogonal", generator=torch.Generator().manual_seed(0))
    >>> f = slice(16, 32)   # forget-gate rows
    >>> float((model.bias_ih_l0 + model.bias_hh_l0)[f].mean().detach())
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_gradhealth._validation import boolean, finite_number, gate_counts, optional_integer, pattern_list
from lightning_gradhealth.inits import init_scheme_, resolve_scheme
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.layers import (
    Role,
    WeightRecord,
    find_linear_weights,
    find_recurrent_weights,
    match_patterns,
)

__all__ = ["InitConfig", "InitRecord", "find_weights_to_initialize", "format_init_report", "initialize_"]


@dataclass(frozen=True)
class InitConfig:
    """Validated initialization options; every check runs at construction.

    Args:
        init: scheme of the hidden-to-hidden matrices, or ``None`` to initialize nothing in the
            recurrent layers (see :data:`~lightning_gradhealth.inits.SCHEME_NAMES`). The
            recurrent-layer options below take effect only when ``init`` is given.
        input_init: scheme of the input-to-hidden matrices (``None``: keep the framework's).
        gain: multiplier of the ``init`` scheme (the singular value for orthogonal).
        forget_bias: effective LSTM forget-gate bias, ``bias_ih + bias_hh``.
        chrono_t_max: if given, chrono init of LSTM gate biases for dependencies up to this
            many steps: ``b_f ~ log U[1, T_max - 1]``, ``b_i = -b_f`` (replaces ``forget_bias``).
        uniform_scale: range of the ``"uniform"`` baseline, ``U[-scale, scale]``.
        linear_init: scheme for plain ``nn.Linear`` layers (e.g. ``"he"`` before ReLU);
            ``None`` leaves them untouched. Independent of ``init``.
        custom: your own hidden-to-hidden matrices: glob pattern over parameter names ->
            gate count, e.g. ``{"decoder.cell.W_hh": 4}``. Every parameter a pattern matches
            must be such a matrix, of shape ``(gates * H, H)`` (checked against the model
            before any weight is written: see :func:`~lightning_gradhealth.layers.find_recurrent_weights`).
        exclude: glob patterns over module or parameter names whose weights are left as they
            are, e.g. weights loaded before fit: ``["encoder.*"]``.
        seed: seed of the init draws when no generator is given; ``None``: the global RNG
            (:class:`~lightning_gradhealth.GradHealth` then uses ``torch.initial_seed()``).
        force_init: :class:`~lightning_gradhealth.GradHealth` keeps the modules whose weights
            were loaded or trained before the fit (:mod:`~lightning_gradhealth.provenance`);
            ``True`` initializes them too. :func:`initialize_`, called by you, writes them
            either way. Frozen parameters (``requires_grad=False``) are never written.

    Every number may also be a numpy or 0-d torch scalar of a real dtype (stored as a Python
    ``float`` or ``int``); a bool is not a number here.

    Raises:
        TypeError: an argument of the wrong type, named with what was given and what is allowed:
            a scheme name that is not a string, a number that is not a real number (or, for
            ``chrono_t_max`` and ``seed``, not an integer), ``custom`` that is not a dict of
            pattern -> integer, ``exclude`` that is not a list of strings (one bare string
            included: write ``exclude=["encoder.*"]``).
        ValueError: unknown scheme names (with the valid names and the closest match), a
            non-positive or non-finite gain or scale, a non-finite forget bias, ``chrono_t_max``
            below 2, a gate count below 1, an empty pattern, a seed outside ``[0, 2**63)``, or
            ``chrono_t_max`` given without ``init``.
    """

    init: Optional[str] = None
    input_init: Optional[str] = "glorot"
    gain: float = 1.0
    forget_bias: float = 1.0
    chrono_t_max: Optional[int] = None
    uniform_scale: float = 0.01
    linear_init: Optional[str] = None
    custom: Optional[dict[str, int]] = None
    exclude: Optional[list[str]] = None
    seed: Optional[int] = None
    force_init: bool = False

    def __post_init__(self) -> None:
        settings = {
            "init": resolve_scheme(self.init, "init"),
            "input_init": resolve_scheme(self.input_init, "input_init"),
            "gain": finite_number("gain", self.gain, "a finite number > 0", above=0),
            "forget_bias": finite_number("forget_bias", self.forget_bias, "a finite number"),
            "chrono_t_max": optional_integer(
                "chrono_t_max", self.chrono_t_max, "an integer >= 2 (the longest dependency in steps) or None", minimum=2
            ),
            "uniform_scale": finite_number("uniform_scale", self.uniform_scale, "a finite number > 0", above=0),
            "linear_init": resolve_scheme(self.linear_init, "linear_init"),
            "custom": gate_counts("custom", self.custom),
            "exclude": pattern_list("exclude", self.exclude),
            "seed": optional_integer("seed", self.seed, "None or an integer in [0, 2**63)", minimum=0, maximum=2**63 - 1),
            "force_init": boolean("force_init", self.force_init),
        }
        for name, value in settings.items():
            object.__setattr__(self, name, value)
        if self.init is None and self.chrono_t_max is not None:
            raise ValueError("chrono_t_max initializes LSTM biases, which happens only with init=...; pass an init scheme")

    @property
    def changes_weights(self) -> bool:
        """Whether applying this configuration writes any weight."""
        return self.init is not None or self.linear_init is not None


@dataclass(frozen=True)
class InitRecord:
    """What initialization did to one parameter (one row of the init report).

    Attributes:
        layer_key: the layer/direction the parameter belongs to.
        parameter: the parameter's name in ``model.named_parameters()``.
        role: ``"recurrent"``, ``"input"``, ``"bias"`` or ``"linear"``.
        gates: names of its gate blocks.
        scheme: what was written, in words (e.g. ``"orthogonal"``, ``"zeros, forget gate 1"``).
        projection: the parameter is an LSTM's projection ``weight_hr``.
    """

    layer_key: LayerKey
    parameter: str
    role: Role
    gates: tuple[str, ...]
    scheme: str
    projection: bool = False


def _scheme_text(scheme: str, record: WeightRecord, gain: float, uniform_scale: float) -> str:
    """A short human description of a scheme applied to one weight."""
    if scheme == "uniform":
        return f"uniform +-{uniform_scale:g}"
    gain_text = "" if gain == 1 else f" x{gain:g}"
    if scheme in ("glorot", "glorot_normal"):
        return f"{scheme} (fan {record.fans.fan_in}+{record.fans.fan_out}){gain_text}"
    if scheme == "he":
        return f"he (fan_in {record.fans.fan_in}, {'/'.join(dict.fromkeys(record.nonlinearities))}){gain_text}"
    return f"{scheme}{gain_text}"


def _init_bias_(record: WeightRecord, config: InitConfig, generator: Optional[torch.Generator]) -> str:
    """Zero a bias vector; for an LSTM's ``bias_ih``, set the forget (and chrono input) gate."""
    bias: Tensor = record.tensor
    with torch.no_grad():
        bias.zero_()
        if record.cell_type != "lstm" or not record.param_name.startswith("bias_ih"):
            return "zeros"
        input_gate, forget_gate = bias.chunk(4)[:2]
        if config.chrono_t_max is None:
            forget_gate.fill_(config.forget_bias)
            return f"zeros, forget gate {config.forget_bias:g}"
        uniform = 1 + (config.chrono_t_max - 2) * torch.rand(forget_gate.shape, generator=generator, dtype=torch.float64)
        chrono = torch.log(uniform).to(device=bias.device, dtype=bias.dtype)
        forget_gate.copy_(chrono)
        input_gate.copy_(-chrono)
        return f"chrono T_max={config.chrono_t_max}"


def _excluded(records: list[WeightRecord], exclude: Sequence[str]) -> set[str]:
    """Full names of the records whose parameter, module or layer key matches a pattern of ``exclude``.

    Raises:
        ValueError: a pattern matches none of the weights that would be initialized.
    """
    names_of = {r.full_name: {r.full_name, r.module_name, str(r.layer_key)} for r in records}
    for pattern, matched in match_patterns(exclude, set().union(*names_of.values())).items():
        if not matched:
            raise ValueError(
                f"exclude pattern {pattern!r} matches no module or parameter that init would write; "
                f"patterns are globs over names such as {next(iter(names_of), 'rnn.weight_hh_l0')!r}"
            )
    return {
        full_name
        for full_name, names in names_of.items()
        if any(matched for matched in match_patterns(exclude, names).values())
    }


def _targets(model: nn.Module, config: InitConfig) -> list[tuple[WeightRecord, str]]:
    """Every weight ``config`` initializes, with its scheme (``"bias"`` for bias vectors), in
    model order; ``exclude`` applied, frozen parameters included. A parameter a ``custom``
    pattern claims as recurrent is not also a plain linear weight.

    Raises:
        ValueError: a ``custom`` or ``exclude`` pattern that matches nothing.
    """
    targets: list[tuple[WeightRecord, Optional[str]]] = []
    if config.init is not None:
        for record in find_recurrent_weights(model, config.custom):
            scheme = config.init if record.role == "recurrent" else config.input_init
            targets.append((record, "bias" if record.role == "bias" else scheme))
    if config.linear_init is not None:
        claimed = {id(record.tensor) for record, _ in targets}
        for record in find_linear_weights(model):
            if id(record.tensor) not in claimed:
                targets.append((record, config.linear_init if record.role == "linear" else "bias"))
    excluded = _excluded([record for record, _ in targets], config.exclude) if config.exclude else set()
    return [(record, scheme) for record, scheme in targets if scheme is not None and record.full_name not in excluded]


def find_weights_to_initialize(model: nn.Module, config: InitConfig) -> list[WeightRecord]:
    """The weights :func:`initialize_` writes with ``config``, frozen ones included (it skips those).

    Examples:
        >>> [r.param_name for r in find_weights_to_initialize(torch.nn.GRU(4, 8), InitConfig(init="orthogonal"))]
        ['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0']
    """
    return [record for record, _ in _targets(model, config)]


def initialize_(
    model: nn.Module,
    init: Union[str, InitConfig, None] = "orthogonal",
    *,
    generator: Optional[torch.Generator] = None,
    **options: Any,
) -> list[InitRecord]:
    """Initialize every recurrent layer of ``model`` in place; return one :class:`InitRecord` per parameter written.

    Writes happen under ``torch.no_grad()`` with ``copy_``, so parameters keep their storage
    (cuDNN's flattened weight buffer stays valid) and their device and dtype. Frozen
    parameters (``requires_grad=False``) are never written.

    Args:
        model: any module tree holding ``nn.RNN``/``LSTM``/``GRU`` layers or ``nn.*Cell`` cells.
        init: scheme of the hidden-to-hidden matrices, or a whole :class:`InitConfig`.
        generator: a CPU generator for reproducible weights (default: one seeded with the
            config's ``seed`` if it has one, else the global RNG).
        **options: the other fields of :class:`InitConfig` (``input_init``, ``gain``,
            ``forget_bias``, ``chrono_t_max``, ``uniform_scale``, ``linear_init``, ``custom``,
            ``exclude``, ``seed``) when ``init`` is a scheme name.

    Raises:
        ValueError: invalid options (see :class:`InitConfig`), or a ``custom`` or ``exclude``
            pattern that matches nothing.
        TypeError: options given together with an :class:`InitConfig`.

    Examples:
        >>> gru = torch.nn.GRU(4, 8, bidirectional=True)
        >>> [r.parameter for r in initialize_(gru, "identity")][:2]
        ['weight_ih_l0', 'weight_hh_l0']
    """
    if isinstance(init, InitConfig):
        if options:
            raise TypeError(f"initialize_ takes either an InitConfig or options, got both ({', '.join(options)})")
        config = init
    else:
        config = InitConfig(init=init, **options)
    if generator is None and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    report: list[InitRecord] = []
    for record, scheme in _targets(model, config):
        if not record.tensor.requires_grad:  # frozen: never written
            continue
        if scheme == "bias":
            text = _init_bias_(record, config, generator)
        else:
            gain = config.gain if record.role == "recurrent" else 1.0
            init_scheme_(
                record.tensor,
                scheme,
                gain=gain,
                gates=len(record.gates),
                fans=record.fans,
                nonlinearities=record.nonlinearities,
                uniform_scale=config.uniform_scale,
                generator=generator,
            )
            text = _scheme_text(scheme, record, gain, config.uniform_scale)
        report.append(InitRecord(record.layer_key, record.full_name, record.role, record.gates, text, record.projection))
    return report


def format_init_report(report: Sequence[InitRecord]) -> str:
    """The init report as a fixed-width text table, one row per parameter."""
    header = ("layer", "parameter", "role", "gates", "scheme")
    rows = [header] + [
        (str(r.layer_key), r.parameter.rpartition(".")[2], r.role, ",".join(r.gates), r.scheme) for r in report
    ]
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
