"""Finds the recurrent weights of a model: one small record per weight matrix or bias vector.

Supported: ``nn.RNN`` (tanh and relu), ``nn.LSTM`` (``proj_size`` included: its ``weight_hr`` is
a recurrent matrix too), ``nn.GRU`` with every layer and both directions; ``nn.RNNCell``,
``nn.LSTMCell`` and ``nn.GRUCell`` used in a loop; and hidden-to-hidden matrices of custom
modules named by glob patterns over ``model.named_parameters()`` with a gate count.

Each record names its layer with a :class:`~lightning_gradhealth.keys.LayerKey`: the module,
the layer and the direction of a fused module; a cell, or a custom module, is keyed by its
module name alone.

Examples:
    >>> import torch
    >>> records = find_recurrent_weights(torch.nn.Sequential(torch.nn.GRU(4, 8)))
    >>> [(str(r.layer_key), r.param_name, r.role, r.gates) for r in records][:2]
    [('0.l0', 'weight_ih_l0', 'input', ('r', 'z', 'n')), ('0.l0', 'weight_hh_l0', 'recurrent', ('r', 'z', 'n'))]
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Optional

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.parametrize import is_parametrized

from lightning_gradhealth.inits import Fans
from lightning_gradhealth.keys import LayerKey

__all__ = [
    "Role",
    "WeightRecord",
    "cell_type_of",
    "find_linear_weights",
    "find_recurrent_weights",
    "fused_layer_keys",
    "match_patterns",
    "parametrized_weights",
]

Role = Literal["recurrent", "input", "bias", "linear"]
"""What a weight does: hidden-to-hidden (``weight_hh``, ``weight_hr``, custom matrices),
input-to-hidden (``weight_ih``), a bias vector, or a plain ``nn.Linear`` weight."""

_GATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # cell type: (gate names, nonlinearity of each gate), in PyTorch's row order
    "lstm": (("i", "f", "g", "o"), ("sigmoid", "sigmoid", "tanh", "sigmoid")),
    "gru": (("r", "z", "n"), ("sigmoid", "sigmoid", "tanh")),
    "rnn_tanh": (("h",), ("tanh",)),
    "rnn_relu": (("h",), ("relu",)),
}
_PROJECTION_GATES = (("proj",), ("linear",))


@dataclass(frozen=True)
class WeightRecord:
    """One weight matrix or bias vector of a recurrent layer, and how it is used.

    Attributes:
        layer_key: the layer/direction it belongs to (its string: e.g. ``"encoder.rnn.l1_reverse"``).
        module_name: the owning module's name in ``model.named_modules()``.
        param_name: the parameter's name inside that module, e.g. ``"weight_hh_l1_reverse"``.
        role: see :data:`Role`.
        cell_type: ``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``, ``"custom"`` or ``"linear"``.
        gates: names of the row blocks, in order (LSTM ``i, f, g, o``; GRU ``r, z, n``).
        nonlinearities: the nonlinearity that follows each gate block.
        fans: fan-in and fan-out of one gate block (the RNN fan rule for cell matrices).
        tensor: the parameter itself.
        projection: an LSTM's ``weight_hr`` (``proj_size``), a recurrent matrix that is not
            square: it maps the cell's state to the projected output state.
    """

    layer_key: LayerKey
    module_name: str
    param_name: str
    role: Role
    cell_type: str
    gates: tuple[str, ...]
    nonlinearities: tuple[str, ...]
    fans: Fans
    tensor: nn.Parameter = field(compare=False, repr=False)
    projection: bool = False

    @property
    def full_name(self) -> str:
        """The name in ``model.named_parameters()``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


def cell_type_of(module: nn.Module) -> str:
    """``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"`` for a fused layer or a built-in cell."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    return "rnn_relu" if nonlinearity == "relu" else "rnn_tanh"


def _cell_records(
    module: nn.Module,
    module_name: str,
    layer_key: LayerKey,
    suffix: str,
    input_size: int,
) -> list[WeightRecord]:
    """Records of one cell (one layer/direction of a fused module, or an ``nn.*Cell``)."""
    cell_type = cell_type_of(module)
    gates, nonlinearities = _GATES[cell_type]
    hidden_size: int = module.hidden_size
    recurrent_width = getattr(module, "proj_size", 0) or hidden_size
    cell_fans = Fans(fan_in=input_size + recurrent_width, fan_out=hidden_size)
    # a parametrized weight (torch.nn.utils.parametrize) is not a parameter of the module: it is
    # computed on access, so it can be neither written by init nor read once for spectra
    params = {name: p for name, p in module.named_parameters(recurse=False) if not is_parametrized(module, name)}

    def record(
        prefix: str,
        role: Role,
        fans: Fans,
        gate_info: tuple[tuple[str, ...], tuple[str, ...]] = (gates, nonlinearities),
    ) -> list[WeightRecord]:
        name = prefix + suffix
        if name not in params:
            return []
        projection = prefix == "weight_hr"
        return [WeightRecord(layer_key, module_name, name, role, cell_type, *gate_info, fans, params[name], projection)]

    return [
        *record("weight_ih", "input", cell_fans),
        *record("weight_hh", "recurrent", cell_fans),
        *record("weight_hr", "recurrent", Fans(hidden_size, recurrent_width), _PROJECTION_GATES),
        *record("bias_ih", "bias", cell_fans),
        *record("bias_hh", "bias", cell_fans),
    ]


def fused_layer_keys(module_name: str, module: nn.RNNBase) -> list[LayerKey]:
    """The keys of every layer and direction of a fused ``nn.RNN``/``nn.LSTM``/``nn.GRU``, in PyTorch's order.

    Examples:
        >>> [str(key) for key in fused_layer_keys("rnn", nn.GRU(2, 3, num_layers=2, bidirectional=True))]
        ['rnn.l0', 'rnn.l0_reverse', 'rnn.l1', 'rnn.l1_reverse']
    """
    directions = (False, True) if module.bidirectional else (False,)
    return [LayerKey(module_name, layer, reverse) for layer in range(module.num_layers) for reverse in directions]


def _fused_records(module: nn.RNNBase, module_name: str) -> list[WeightRecord]:
    """Records of every layer and direction of an ``nn.RNN``/``nn.LSTM``/``nn.GRU``."""
    output_width = (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
    records: list[WeightRecord] = []
    for key in fused_layer_keys(module_name, module):
        input_size = module.input_size if key.layer == 0 else output_width
        suffix = f"_l{key.layer}" + ("_reverse" if key.reverse else "")
        records += _cell_records(module, module_name, key, suffix, input_size)
    return records


def match_patterns(patterns: Iterable[str], names: Iterable[str]) -> dict[str, list[str]]:
    """For each glob pattern, the names it matches (``fnmatch`` rules, case-sensitive).

    Examples:
        >>> match_patterns(["rnn.*_hh*"], ["rnn.weight_hh_l0", "rnn.weight_ih_l0"])
        {'rnn.*_hh*': ['rnn.weight_hh_l0']}
    """
    name_list = list(names)
    return {pattern: fnmatch.filter(name_list, pattern) for pattern in patterns}


def _not_recurrent(weight: nn.Parameter, gates: int) -> Optional[str]:
    """Why ``weight`` cannot be a hidden-to-hidden matrix of ``gates`` gate blocks, or ``None`` if it can.

    Such a matrix maps the state ``h_{t-1}`` (H units) to each of the ``gates`` gates (H units
    each): its shape is ``(gates * H, H)``, square ``H x H`` blocks stacked along dim 0 as in
    PyTorch. An input matrix ``(gates * H, input_size)``, a projection, a feed-forward weight of
    another shape or a bias vector is not one.

    Examples:
        >>> import torch
        >>> _not_recurrent(nn.Parameter(torch.empty(12, 3)), 4) is None
        True
        >>> _not_recurrent(nn.Parameter(torch.empty(12, 2)), 4)
        'its 4 gate blocks would be 3 x 2, not square'
    """
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "it is not materialized yet (a lazy module that has not run)"
    if weight.dim() != 2:
        return f"it is {weight.dim()}-D, not a matrix" + (" (a bias vector?)" if weight.dim() == 1 else "")
    rows, columns = weight.shape
    if not rows:
        return "it is empty"
    if rows % gates:
        return f"the gate count {gates} does not divide its {rows} rows"
    if rows != gates * columns:
        return f"its {gates} gate blocks would be {rows // gates} x {columns}, not square"
    return None


def _custom_records(
    model: nn.Module, custom: Mapping[str, int], builtin_names: set[str]
) -> list[WeightRecord]:
    """Records of the hidden-to-hidden matrices named by ``custom`` (glob pattern -> gate count)."""
    all_params = dict(model.named_parameters())
    matches = match_patterns(custom, all_params)
    chosen: dict[str, int] = {}
    for pattern, names in matches.items():
        if not names:
            raise ValueError(
                f"custom pattern {pattern!r} matches no parameter of the model; patterns are globs "
                f"over model.named_parameters() names, e.g. {next(iter(all_params), 'cell.weight_hh')!r}"
            )
        gates = custom[pattern]
        for name in names:
            if name in builtin_names:
                raise ValueError(
                    f"custom pattern {pattern!r} matches {name!r}, a weight of a built-in recurrent "
                    "layer that GradHealth already handles; custom patterns are for your own modules"
                )
            weight = all_params[name]
            reason = _not_recurrent(weight, gates)
            if reason is not None:
                owner = model.get_submodule(name.rpartition(".")[0])
                raise ValueError(
                    f"custom pattern {pattern!r} (gate count {gates}) matches {name!r}, a parameter of shape "
                    f"{tuple(weight.shape)} in a {type(owner).__name__}, which is not a hidden-to-hidden matrix: "
                    f"{reason}. A custom pattern may match only recurrent matrices of shape ({gates} * H, H): "
                    f"{gates} square H x H gate block(s) that map the state h_(t-1), stacked along dim 0 as in PyTorch "
                    "(not an input matrix, a projection, a bias or a feed-forward weight); narrow the pattern "
                    "or correct its gate count"
                )
            chosen[name] = gates

    owners = Counter(name.rpartition(".")[0] for name in chosen)
    records = []
    for name, gates in chosen.items():
        module_name, _, param_name = name.rpartition(".")
        key = LayerKey(module_name if owners[module_name] == 1 and module_name else name)
        weight = all_params[name]
        records.append(
            WeightRecord(
                key,
                module_name,
                param_name,
                "recurrent",
                "custom",
                tuple(f"gate{k}" for k in range(gates)) if gates > 1 else ("h",),
                ("linear",) * gates,
                Fans(fan_in=weight.shape[1], fan_out=weight.shape[0] // gates),
                weight,
            )
        )
    return records


def find_recurrent_weights(
    model: nn.Module, custom: Optional[Mapping[str, int]] = None
) -> list[WeightRecord]:
    """Every recurrent weight of ``model``, in ``named_modules()`` order, then the custom ones.

    Args:
        model: any module tree.
        custom: glob patterns over ``model.named_parameters()`` names of your own
            hidden-to-hidden matrices, each with its gate count, e.g. ``{"cell.W_hh": 4}``.

    Every parameter a custom pattern matches is checked before any record is made, so a caller
    that writes weights only after this call writes none when it raises.

    Raises:
        ValueError: a custom pattern matches nothing, matches a built-in layer's weight, or
            matches a parameter that is not a hidden-to-hidden matrix of its gate count: of shape
            ``(gates * H, H)``, square gate blocks stacked along dim 0 (an input matrix, a
            projection, a bias vector or an ``nn.Linear`` weight of another shape is refused).
    """
    records: list[WeightRecord] = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            records += _fused_records(module, module_name)
        elif isinstance(module, nn.RNNCellBase):
            records += _cell_records(module, module_name, LayerKey(module_name), "", module.input_size)
    if custom:
        records += _custom_records(model, custom, {record.full_name for record in records})
    return records


def parametrized_weights(model: nn.Module) -> list[str]:
    """Names of the parametrized weights of recurrent layers, which GradHealth leaves out."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and is_parametrized(module)
        for name in module.parametrizations
    ]


def has_uninitialized_params(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy module whose parameters are not materialized yet."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def find_linear_weights(model: nn.Module) -> list[WeightRecord]:
    """Weights and biases of every ``nn.Linear`` in ``model``, for opt-in feed-forward init.

    Fans are read off the shape (``fan_in = in_features``); the nonlinearity is taken to be ReLU,
    the use case of He initialization. ``nn.LazyLinear`` layers that have not run yet have no
    weights to write and are left out.
    """
    records: list[WeightRecord] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or has_uninitialized_params(module):
            continue
        fans = Fans(fan_in=module.in_features, fan_out=module.out_features)
        for param_name, param in module.named_parameters(recurse=False):
            role: Role = "linear" if param_name == "weight" else "bias"
            records.append(
                WeightRecord(LayerKey(module_name), module_name, param_name, role, "linear", ("w",), ("relu",), fans, param)
            )
    return records
