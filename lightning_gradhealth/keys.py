"""Layer keys: which recurrent state a measurement belongs to, as a typed value.

A measurement of a recurrent layer is identified by the module, the layer of a stacked fused
module, the direction and the state (``h``, or an LSTM's cell state ``c``). :class:`LayerKey`
holds these fields; everything inside the package reads them, never a string. The string
form, the public contract's key, is made only where a key is written out (public dictionaries,
TensorBoard tags, the report): the module's name in ``model.named_modules()``, then
``.l{layer}``, then ``_reverse`` for the backward direction, then ``.call{k}`` for the k-th
call (k >= 1) of a module run several times in one step, then ``.cell`` for a cell state.
A key also equals its string (and hashes like it), so records that carry a key, such as
:class:`~lightning_gradhealth.WeightRecord`, still compare with the names users write.

Examples:
    >>> key = LayerKey("encoder.rnn", layer=1, reverse=True)
    >>> str(key), str(key.cell_state)
    ('encoder.rnn.l1_reverse', 'encoder.rnn.l1_reverse.cell')
    >>> str(LayerKey("cell_reverse")), LayerKey("cell_reverse").reverse   # a cell loop's module name
    ('cell_reverse', False)
    >>> str(LayerKey("seq2seq.rnn", layer=0, call=1))   # the decoder call of an encoder-decoder LSTM
    'seq2seq.rnn.l0.call1'
    >>> LayerKey("rnn", 0) == "rnn.l0"
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Mapping, Optional, TypeVar

__all__ = ["LayerKey", "StateKind", "by_name"]

StateKind = Literal["h", "c"]
"""The state a per-timestep gradient is taken of: the layer's output state ``h``, or an LSTM's cell state ``c``."""


@dataclass(frozen=True, eq=False)
class LayerKey:
    """One layer and direction of a recurrent module, and one of its states.

    Attributes:
        module: the module's name in ``model.named_modules()`` (for one of several custom
            hidden-to-hidden matrices of one module, the matrix's parameter name).
        layer: the layer index of a fused ``nn.RNN``/``nn.LSTM``/``nn.GRU``; ``None`` for a
            cell (``nn.*Cell``, custom cells) or a custom matrix.
        reverse: the backward direction of a bidirectional layer, which computes last-to-first.
        state: ``"h"`` (the output state) or ``"c"`` (an LSTM's cell state).
        call: which call of the module in one training step, counting the calls the loss
            reaches in the order they ran (0: the first, whose string has no suffix).
    """

    module: str
    layer: Optional[int] = None
    reverse: bool = False
    state: StateKind = "h"
    call: int = 0

    def __str__(self) -> str:
        local = "" if self.layer is None else f"l{self.layer}" + ("_reverse" if self.reverse else "")
        name = ".".join(part for part in (self.module, local, f"call{self.call}" if self.call else "") if part)
        return name + (".cell" if self.state == "c" else "")

    def _fields(self) -> tuple[str, Optional[int], bool, str, int]:
        return (self.module, self.layer, self.reverse, self.state, self.call)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerKey):
            return self._fields() == other._fields()
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def cell_state(self) -> LayerKey:
        """The key of this layer's cell state (LSTM)."""
        return replace(self, state="c")

    @property
    def hidden_state(self) -> LayerKey:
        """The key of this layer's output state."""
        return replace(self, state="h")

    @property
    def first_call(self) -> LayerKey:
        """The same layer and state in the module's first call."""
        return replace(self, call=0)

    def to_dict(self) -> dict[str, Any]:
        """The fields, for a checkpoint (:meth:`from_dict` reads them back); ``call`` only when not 0."""
        fields = asdict(self)
        if not self.call:
            del fields["call"]
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> LayerKey:
        """The key whose :meth:`to_dict` gave ``fields``.

        Raises:
            ValueError: ``fields`` are not those of a key (a checkpoint from elsewhere).
        """
        required = {"module", "layer", "reverse", "state"}
        if not isinstance(fields, Mapping) or not required <= set(fields) <= {*required, "call"}:
            raise ValueError(f"not the fields of a layer key: {fields!r}")
        module, layer, reverse, state = fields["module"], fields["layer"], fields["reverse"], fields["state"]
        call = fields.get("call", 0)

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not (isinstance(module, str) and (layer is None or count(layer)) and isinstance(reverse, bool)) or not (
            state in ("h", "c") and count(call)
        ):
            raise ValueError(f"not the fields of a layer key: {fields!r}")
        return cls(module, layer, reverse, state, call)


Value = TypeVar("Value")


def by_name(values: Mapping[LayerKey, Value]) -> dict[str, Value]:
    """The same mapping keyed by the keys' public strings, for users and writers.

    Examples:
        >>> by_name({LayerKey("rnn", 0): 1.5})
        {'rnn.l0': 1.5}
    """
    return {str(key): value for key, value in values.items()}
