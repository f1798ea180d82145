r"""Exact per-timestep gradient norms through time, :math:`\|\partial L / \partial h_t\|` for every t.

:math:`\partial L/\partial h_t` here is the TOTAL derivative: the direct gradient arriving at the
layer's output at step t plus everything that flows back through :math:`h_{t+1}, h_{t+2}, \dots`
A hook on a fused layer's output sees only the direct part, and fused kernels hide the inner
states, so this module measures in two ways:

- Cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``, and custom cells you mark) are called
  once per timestep by your own loop, and autograd accumulates every path into each call's
  output: a tensor hook on ``h_t`` (and ``c_t``) receives the total derivative directly.
- Fused layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): the layer's input, initial states, and the
  gradients arriving at its outputs (the output sequence, ``h_n`` and ``c_n``) are captured
  during the real step; afterwards :func:`backward_through_time` recomputes the gates in one
  batched matrix product and runs the exact backward recursion of the cell by hand, layer by
  layer (top-down) and direction by direction. It costs about one forward pass plus the
  recurrent half of a backward pass, with no weight gradients.

Everything runs on the weights' own device, in float32 (float64 for float64 weights), under
``torch.no_grad()``.

Examples:
    >>> import torch
    >>> lstm = torch.nn.LSTM(3, 8)
    >>> probe = TimestepProbe(torch.nn.ModuleDict({"rnn": lstm}))
    >>> probe.attach(); probe.arm()
    >>> output, _ = lstm(torch.randn(20, 4, 3))
    >>> output[-1].sum().backward()                    # the loss sees only the last step
    >>> norms = probe.compute()
    >>> sorted(norms), tuple(norms["rnn.l0"].shape)
    (['rnn.l0', 'rnn.l0.cell'], (20,))
    >>> probe.detach()
"""

from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle

from lightning_gradhealth.layers import cell_type_of, layer_key

__all__ = [
    "CellWeights",
    "FusedCapture",
    "TimestepGrads",
    "TimestepProbe",
    "backward_through_time",
    "fused_timestep_grads",
    "reverse_padded",
    "timestep_norms",
]


@dataclass(frozen=True)
class CellWeights:
    """The weights of one layer/direction, PyTorch layout (gate blocks stacked along rows)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor] = None
    b_hh: Optional[Tensor] = None
    w_hr: Optional[Tensor] = None

    def to(self, dtype: torch.dtype) -> "CellWeights":
        """The same weights, detached, in ``dtype``."""
        cast = lambda w: None if w is None else w.detach().to(dtype)  # noqa: E731
        return CellWeights(cast(self.w_ih), cast(self.w_hh), cast(self.b_ih), cast(self.b_hh), cast(self.w_hr))


@dataclass(frozen=True)
class TimestepGrads:
    """Total derivatives of the loss for one layer/direction, time-major.

    Attributes:
        state: ``(T, B, H_out)``: dL/dh_t, the layer's output state (projected for ``proj_size``).
        cell: ``(T, B, H)``: dL/dc_t for an LSTM, else ``None``.
        input: ``(T, B, I)``: dL/dx_t, the gradient this layer sends to its input.
        saturation: 0-d tensor, the fraction of the layer's tanh candidate units (RNN ``h_t``,
            LSTM ``g_t``, GRU ``n_t``) over valid steps, batch and units with
            ``|tanh| > SATURATED_TANH``, where ``tanh' < 0.02`` blocks the gradient; ``None``
            for ReLU.
    """

    state: Tensor
    cell: Optional[Tensor]
    input: Tensor
    saturation: Optional[Tensor] = None


SATURATED_TANH = 0.99


def saturated_fraction(candidates: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Fraction of ``(T, B, H)`` tanh outputs with ``|value| > SATURATED_TANH``, over the valid
    steps of each sequence (``lengths``; all steps when ``None``).

    Examples:
        >>> candidates = torch.tensor([[[0.999, 0.2]], [[-0.995, 0.999]]])   # (T=2, B=1, H=2)
        >>> saturated_fraction(candidates)
        tensor(0.7500)
        >>> saturated_fraction(candidates, lengths=torch.tensor([1]))      # only t = 0 is valid
        tensor(0.5000)
    """
    saturated = candidates.abs() > SATURATED_TANH
    if lengths is None:
        return saturated.float().mean()
    valid = torch.arange(candidates.shape[0], device=candidates.device)[:, None] < lengths.to(candidates.device)[None, :]
    return (saturated & valid[..., None]).sum() / (valid.sum() * candidates.shape[-1]).clamp(min=1)


def timestep_norms(grads: Tensor) -> Tensor:
    r"""Frobenius norm over batch and hidden units at every timestep: ``(T, B, H) -> (T,)``.

    Examples:
        >>> timestep_norms(torch.ones(2, 4, 9))
        tensor([6., 6.])
    """
    return torch.linalg.vector_norm(grads.flatten(1), dim=1)


def reverse_padded(sequence: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Reverse each sequence of a time-major padded batch within its own length; pads stay zero.

    This is the order in which the backward direction of a bidirectional layer reads its input;
    applying it twice gives the original (on valid steps).

    Examples:
        >>> x = torch.tensor([[1., 10.], [2., 20.], [3., 0.]]).unsqueeze(-1)  # lengths 3 and 2
        >>> reverse_padded(x, torch.tensor([3, 2])).squeeze(-1)
        tensor([[ 3., 20.],
                [ 2., 10.],
                [ 1.,  0.]])
    """
    if lengths is None:
        return sequence.flip(0)
    steps = sequence.shape[0]
    source = lengths.to(sequence.device)[None, :] - 1 - torch.arange(steps, device=sequence.device)[:, None]
    valid = source >= 0
    index = source.clamp(min=0)[..., None].expand_as(sequence)
    return torch.gather(sequence, 0, index) * valid[..., None]


def _previous_states(states: Tensor, initial: Tensor) -> Tensor:
    """``h_{t-1}`` for every t: the initial state followed by all states but the last."""
    return torch.cat([initial[None], states[:-1]])


def _at_last_steps(final_grad: Optional[Tensor], steps: int, lengths: Optional[Tensor]) -> Optional[Tensor]:
    """``(T, B, H)`` zeros with each sequence's gradient on its final state placed at its last step."""
    if final_grad is None:
        return None
    placed = final_grad.new_zeros((steps, *final_grad.shape))
    if lengths is None:
        placed[-1] = final_grad
    else:
        batch = torch.arange(final_grad.shape[0], device=final_grad.device)
        placed[lengths.to(final_grad.device) - 1, batch] = final_grad
    return placed


def _affine(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` over ``(T, B, F)`` in one matrix product."""
    flat = x.reshape(-1, x.shape[-1])
    product = flat @ weight.T if bias is None else torch.addmm(bias, flat, weight.T)
    return product.view(*x.shape[:-1], weight.shape[0])


def backward_through_time(
    cell_type: str,
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    initial_cell: Optional[Tensor] = None,
    final_cell_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> TimestepGrads:
    r"""Exact total derivatives dL/dh_t (and dL/dc_t) of one recurrent layer, one direction.

    Recomputes the gates from the inputs and the layer's own output states in one batched
    product, then runs the cell's backward recursion from the last step to the first:

    .. math::
        \frac{\partial L}{\partial h_t} = \underbrace{\delta_t}_{\text{direct}}
            + W_{hh}^\top \frac{\partial L}{\partial a_{t+1}}
            \;(+\; \text{the GRU's } z_{t+1} \odot \tfrac{\partial L}{\partial h_{t+1}}),

    where :math:`a_t` are the gate pre-activations. For an LSTM,
    :math:`\partial L/\partial c_t = \partial L/\partial \tilde h_t \odot o_t \odot (1 - \tanh^2 c_t)
    + f_{t+1} \odot \partial L/\partial c_{t+1}` with :math:`\tilde h_t` the unprojected state
    (:math:`h_t = W_{hr} \tilde h_t` with ``proj_size``).

    Args:
        cell_type: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        weights: this layer/direction's weights.
        inputs: ``(T, B, I)`` the layer's input, time-major, in the direction's reading order.
        states: ``(T, B, H_out)`` the states h_t the layer produced (its output sequence).
        initial_state: ``(B, H_out)`` h_{-1}.
        output_grads: ``(T, B, H_out)`` the direct gradient on each h_t (zero on padding).
        final_state_grad: ``(B, H_out)`` gradient on the final state h_n, if any.
        initial_cell: ``(B, H)`` c_{-1}, LSTM only.
        final_cell_grad: ``(B, H)`` gradient on c_n, LSTM only.
        lengths: ``(B,)`` valid steps per sequence for packed input; steps past a sequence's
            length get zero gradient, and its h_n gradient enters at its own last step.

    Returns:
        :class:`TimestepGrads`, in the same time order as ``inputs``.
    """
    steps = inputs.shape[0]
    final_state_part = _at_last_steps(final_state_grad, steps, lengths)
    direct_grads = output_grads if final_state_part is None else output_grads + final_state_part
    previous = _previous_states(states, initial_state)
    input_part = _affine(inputs, weights.w_ih, weights.b_ih)
    recurrent_part = _affine(previous, weights.w_hh, weights.b_hh)
    state_grads = torch.empty_like(states)
    carry = torch.zeros_like(initial_state)

    if cell_type in ("rnn_tanh", "rnn_relu"):
        pre_activation_grads = torch.empty_like(input_part)
        if cell_type == "rnn_tanh":
            derivative = 1 - states * states
        else:
            derivative = ((input_part + recurrent_part) > 0).to(states.dtype)
        for t in reversed(range(steps)):
            grad_h = torch.add(direct_grads[t], carry, out=state_grads[t])
            carry = torch.mul(grad_h, derivative[t], out=pre_activation_grads[t]) @ weights.w_hh
        saturation = saturated_fraction(states, lengths) if cell_type == "rnn_tanh" else None
        return TimestepGrads(state_grads, None, pre_activation_grads @ weights.w_ih, saturation)

    if cell_type == "gru":
        input_r, input_z, input_n = input_part.chunk(3, dim=-1)
        hidden_r, hidden_z, hidden_n = recurrent_part.chunk(3, dim=-1)
        reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
        candidate = torch.tanh(input_n + reset * hidden_n)
        # h_t = (1 - z) n + z h_{t-1}: every gate gradient is dL/dh_t times a factor known up front
        to_candidate = (1 - update) * (1 - candidate * candidate)
        to_reset = to_candidate * hidden_n * reset * (1 - reset)
        to_update = (previous - candidate) * update * (1 - update)
        input_factors = torch.stack([to_reset, to_update, to_candidate], dim=-2)  # (T, B, 3, H)
        recurrent_factors = torch.stack([to_reset, to_update, to_candidate * reset], dim=-2)
        recurrent_grads = torch.empty_like(recurrent_factors)
        for t in reversed(range(steps)):
            grad_h = torch.add(direct_grads[t], carry, out=state_grads[t])
            torch.mul(recurrent_factors[t], grad_h.unsqueeze(1), out=recurrent_grads[t])
            carry = torch.addcmul(recurrent_grads[t].flatten(1) @ weights.w_hh, grad_h, update[t])
        pre_activation_grads = (input_factors * state_grads.unsqueeze(2)).flatten(2)
        return TimestepGrads(state_grads, None, pre_activation_grads @ weights.w_ih, saturated_fraction(candidate, lengths))

    if cell_type != "lstm":
        raise ValueError(f"unknown cell type {cell_type!r}; expected 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'")
    if initial_cell is None:
        raise ValueError("an LSTM needs its initial cell state")
    gates = input_part.add_(recurrent_part).view(*input_part.shape[:-1], 4, -1)
    # contiguous per-gate copies: the step-by-step loops below read them one timestep at a time
    gate_input, gate_forget, gate_cell, gate_output = (gate.contiguous() for gate in gates.unbind(dim=-2))
    gate_input.sigmoid_(), gate_forget.sigmoid_(), gate_cell.tanh_(), gate_output.sigmoid_()
    cells = torch.empty_like(gate_cell)
    cell_inputs = gate_input * gate_cell
    cell = initial_cell
    for t in range(steps):
        cell = torch.addcmul(cell_inputs[t], gate_forget[t], cell, out=cells[t])
    tanh_cells = cells.tanh()
    # Everything in the recursion that does not depend on the recursion, for all steps at once:
    # dL/dc_t = dL/dh~_t * output_to_cell_t + f_{t+1} dL/dc_{t+1}, and the gate pre-activation
    # gradients are dL/dc_t (input, forget, cell gates) or dL/dh~_t (output gate) times
    # gate_factors; s(1 - s) is written addcmul(s, s, s, value=-1) to save passes over memory.
    output_to_cell = torch.addcmul(gate_output, gate_output, tanh_cells * tanh_cells, value=-1)
    gate_factors = torch.empty_like(gates)
    factor_input, factor_forget, factor_cell, factor_output = gate_factors.unbind(dim=-2)
    torch.addcmul(gate_input, gate_input, gate_input, value=-1, out=factor_input).mul_(gate_cell)
    torch.addcmul(gate_forget, gate_forget, gate_forget, value=-1, out=factor_forget)
    factor_forget[1:].mul_(cells[:-1])
    factor_forget[0].mul_(initial_cell)
    torch.addcmul(gate_input, gate_input, gate_cell * gate_cell, value=-1, out=factor_cell)
    torch.addcmul(gate_output, gate_output, gate_output, value=-1, out=factor_output).mul_(tanh_cells)
    pre_activation_grads = torch.empty_like(input_part)
    gate_grads = pre_activation_grads.view(gate_factors.shape)
    cell_grads = torch.empty_like(cells)
    carry_cell = torch.zeros_like(initial_cell)
    final_cell_part = _at_last_steps(final_cell_grad, steps, lengths)
    if final_cell_part is not None:
        carry_cell = carry_cell + final_cell_part[-1]
    for t in reversed(range(steps)):
        grad_h = torch.add(direct_grads[t], carry, out=state_grads[t])
        grad_unprojected = grad_h if weights.w_hr is None else grad_h @ weights.w_hr
        grad_c = torch.addcmul(carry_cell, grad_unprojected, output_to_cell[t], out=cell_grads[t])
        torch.mul(gate_factors[t, :, :3], grad_c.unsqueeze(1), out=gate_grads[t, :, :3])
        torch.mul(gate_factors[t, :, 3], grad_unprojected, out=gate_grads[t, :, 3])
        carry = pre_activation_grads[t] @ weights.w_hh
        carry_cell = grad_c * gate_forget[t]
        if final_cell_part is not None and t > 0:
            carry_cell = carry_cell + final_cell_part[t - 1]
    return TimestepGrads(state_grads, cell_grads, pre_activation_grads @ weights.w_ih, saturated_fraction(gate_cell, lengths))


@dataclass
class FusedCapture:
    """What one call of a fused layer leaves for the probe, time-major and padded.

    ``inputs``, ``outputs`` and the initial states are detached copies taken at forward time;
    the three gradients are filled by tensor hooks during the backward pass (``None`` where
    the loss does not depend on that output). ``to_time_major`` turns the raw gradient of the
    output (packed, batch-first or unbatched, like the output itself) into ``(T, B, F)``.
    ``dropout_active``: the call ran inter-layer dropout, whose masks the kernel keeps to itself.
    """

    inputs: Tensor
    outputs: Tensor
    initial_states: Tensor
    initial_cells: Optional[Tensor]
    lengths: Optional[Tensor]
    to_time_major: Callable[[Tensor], Tensor]
    batched: bool
    dropout_active: bool
    output_grad: Optional[Tensor] = None
    final_state_grad: Optional[Tensor] = None
    final_cell_grad: Optional[Tensor] = None
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def received_gradient(self) -> bool:
        """Whether the backward pass reached any of this call's outputs."""
        return any(g is not None for g in (self.output_grad, self.final_state_grad, self.final_cell_grad))


def _accumulate(capture: FusedCapture, name: str) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``capture.<name>`` (it may fire again with retain_graph)."""

    def hook(grad: Tensor) -> None:
        previous = getattr(capture, name)
        setattr(capture, name, grad.detach() if previous is None else previous + grad.detach())

    return hook


def capture_fused_call(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Optional[FusedCapture]:
    """Record one forward call of ``module`` and hook the gradients of its outputs.

    Returns ``None`` when no output requires grad (nothing will flow back through this call).

    Raises:
        ValueError: the call does not look like the built-in layer's (a subclass with another
            signature or output), so it cannot be measured.
    """
    inputs = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(output, tuple) or len(output) != 2 or not isinstance(inputs, (Tensor, PackedSequence)):
        raise ValueError("its forward takes or returns something other than the built-in layer's (input, hx) -> (output, h_n)")
    sequence, finals = output
    final_state, final_cell = finals if isinstance(finals, tuple) else (finals, None)
    if isinstance(inputs, PackedSequence):
        padded_inputs, lengths = pad_packed_sequence(inputs)
        padded_outputs, _ = pad_packed_sequence(sequence)
        steps, batched, grad_target = padded_outputs.shape[0], True, sequence.data

        def to_time_major(grad: Tensor) -> Tensor:
            packed = PackedSequence(grad, sequence.batch_sizes, sequence.sorted_indices, sequence.unsorted_indices)
            return pad_packed_sequence(packed, total_length=steps)[0]

    else:
        batched, lengths, grad_target = inputs.dim() == 3, None, sequence
        if not batched:
            to_time_major = lambda grad: grad.unsqueeze(1)  # noqa: E731
        elif module.batch_first:
            to_time_major = lambda grad: grad.transpose(0, 1)  # noqa: E731
        else:
            to_time_major = lambda grad: grad  # noqa: E731
        padded_inputs, padded_outputs = to_time_major(inputs), to_time_major(sequence)
    if not (grad_target.requires_grad or final_state.requires_grad):
        return None

    directions = 2 if module.bidirectional else 1
    state_shape = (module.num_layers * directions, padded_inputs.shape[1], module.proj_size or module.hidden_size)
    cell_shape = (*state_shape[:2], module.hidden_size)
    initial = hx if isinstance(hx, tuple) else (hx, None)
    as_batched = (lambda t: t) if batched else (lambda t: t.unsqueeze(1))
    initial_states = padded_outputs.new_zeros(state_shape) if initial[0] is None else as_batched(initial[0]).detach()
    initial_cells = None
    if isinstance(module, nn.LSTM):
        initial_cells = padded_outputs.new_zeros(cell_shape) if initial[1] is None else as_batched(initial[1]).detach()
    dropout_active = module.training and module.dropout > 0 and module.num_layers > 1
    capture = FusedCapture(
        padded_inputs.detach(),
        padded_outputs.detach(),
        initial_states,
        initial_cells,
        lengths,
        to_time_major,
        batched,
        dropout_active,
    )
    for tensor, name in ((grad_target, "output_grad"), (final_state, "final_state_grad"), (final_cell, "final_cell_grad")):
        if tensor is not None and tensor.requires_grad:
            capture.handles.append(tensor.register_hook(_accumulate(capture, name)))
    return capture


def _layer_parameters(module: nn.RNNBase, layer: int) -> dict[str, Tensor]:
    """One layer's weights of a fused module, renamed as layer 0 of a one-layer module.

    Read by attribute from ``module._flat_weights_names``, the weights the kernel uses.
    """
    renamed = {}
    for name in module._flat_weights_names:
        match = _WEIGHT_NAME.fullmatch(name)
        if match and int(match["layer"]) == layer:
            renamed[f"{match['kind']}_l0{match['direction'] or ''}"] = getattr(module, name)
    return renamed


_WEIGHT_NAME = re.compile(r"(?P<kind>(?:weight|bias)_(?:ih|hh|hr))_l(?P<layer>\d+)(?P<direction>_reverse)?")
_BUILT_IN_LAYERS = (nn.LSTM, nn.GRU, nn.RNN)


def _layer_forward(
    module: nn.RNNBase, layer: int, inputs: Tensor, states: Tensor, cells: Optional[Tensor], lengths: Optional[Tensor]
) -> Tensor:
    """The output sequence of one layer (both directions) of ``module``, time-major and padded."""
    built_in = next(layer_class for layer_class in _BUILT_IN_LAYERS if isinstance(module, layer_class))
    one_layer = built_in(
        inputs.shape[-1],
        module.hidden_size,
        num_layers=1,
        bias=module.bias,
        bidirectional=module.bidirectional,
        device="meta",
        **({"proj_size": module.proj_size} if isinstance(module, nn.LSTM) else {}),
        **({"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}),
    )
    hx = states if cells is None else (states, cells)
    sequence: Any = inputs if lengths is None else pack_padded_sequence(inputs, lengths, enforce_sorted=False)
    # in the probe's dtype (float32 for bf16/fp16 weights, as under precision="bf16-true"), like its inputs
    parameters = {name: weight.to(inputs.dtype) for name, weight in _layer_parameters(module, layer).items()}
    output, _ = functional_call(one_layer, parameters, (sequence, hx))
    return output if lengths is None else pad_packed_sequence(output, total_length=inputs.shape[0])[0]


def fused_timestep_grads(module: nn.RNNBase, capture: FusedCapture, grad_scale: float = 1.0) -> dict[str, TimestepGrads]:
    """Exact per-timestep total gradients of every layer and direction of a fused module.

    Lower layers' states are recomputed with the layer's own kernel; layers are processed top
    down, each layer's input gradient being the direct gradient of the layer below. Gradients
    are divided by ``grad_scale`` (the AMP loss scale the hooks saw). When the call ran
    inter-layer dropout, every layer is recomputed without it: the measurement is then that of
    the dropout-free network under the real upstream gradients, not of the masked one.

    Returns:
        ``{"l0": ..., "l0_reverse": ..., "l1": ...}``: one :class:`TimestepGrads` per layer and
        direction, entries indexed by input position (the reverse direction unflipped).
    """
    weight = module.weight_hh_l0
    dtype = torch.promote_types(weight.dtype, torch.float32)
    directions = 2 if module.bidirectional else 1
    width = module.proj_size or module.hidden_size
    lengths = capture.lengths

    def prepared(tensor: Optional[Tensor]) -> Optional[Tensor]:
        return None if tensor is None else tensor.to(device=weight.device, dtype=dtype) / grad_scale

    layer_inputs = [capture.inputs.to(device=weight.device, dtype=dtype)]
    states = capture.initial_states.to(weight.device, dtype)
    cells = None if capture.initial_cells is None else capture.initial_cells.to(weight.device, dtype)
    # With inter-layer dropout the kernel's masks are unknown: the whole stack is then
    # recomputed without dropout, so that every layer's gates match the states they are paired with.
    recomputed_layers = module.num_layers if capture.dropout_active else module.num_layers - 1
    for layer in range(recomputed_layers):
        rows = slice(layer * directions, (layer + 1) * directions)
        layer_inputs.append(
            _layer_forward(module, layer, layer_inputs[-1], states[rows], None if cells is None else cells[rows], lengths)
        )
    layer_outputs = layer_inputs[1:]
    if not capture.dropout_active:
        layer_outputs.append(capture.outputs.to(weight.device, dtype))

    raw_output_grad = prepared(capture.output_grad)
    direct = torch.zeros_like(layer_outputs[-1]) if raw_output_grad is None else capture.to_time_major(raw_output_grad)
    final_states = prepared(capture.final_state_grad)
    final_cells = prepared(capture.final_cell_grad)
    if final_states is not None and not capture.batched:
        final_states = final_states.unsqueeze(1)
        final_cells = None if final_cells is None else final_cells.unsqueeze(1)

    results: dict[str, TimestepGrads] = {}
    for layer in reversed(range(module.num_layers)):
        below = torch.zeros_like(layer_inputs[layer])
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            weights = CellWeights(
                getattr(module, "weight_ih" + suffix),
                getattr(module, "weight_hh" + suffix),
                getattr(module, "bias_ih" + suffix, None),
                getattr(module, "bias_hh" + suffix, None),
                getattr(module, "weight_hr" + suffix, None),
            ).to(dtype)
            columns = slice(direction * width, (direction + 1) * width)
            row = layer * directions + direction
            order = (lambda t: reverse_padded(t, lengths)) if direction else (lambda t: t)
            grads = backward_through_time(
                cell_type_of(module),
                weights,
                order(layer_inputs[layer]),
                order(layer_outputs[layer][..., columns]),
                states[row],
                order(direct[..., columns]),
                None if final_states is None else final_states[row],
                None if cells is None else cells[row],
                None if final_cells is None else final_cells[row],
                lengths,
            )
            results[suffix[1:]] = TimestepGrads(
                order(grads.state), None if grads.cell is None else order(grads.cell), order(grads.input), grads.saturation
            )
            below += results[suffix[1:]].input
        direct = below
    return results


class _InertHook:
    """What a copy of a watched module holds in place of the probe's forward hook: nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class _ProbeHook:
    """The probe's forward hook on one module, as an object rather than a closure, so that a copy
    of the module never carries the probe along.

    A deep copy of the module made while the probe is attached (an EMA model or a teacher copied
    during fit) gets an :class:`_InertHook` under the same hook id, whose handle joins the
    probe's, so :meth:`TimestepProbe.detach` removes it too; the copy's calls feed nothing. A
    pickled module stores the inert stand-in (a closure does not pickle).
    """

    def __init__(self, hook: Callable[..., None], handles: list[RemovableHandle]) -> None:
        self.hook, self.handles = hook, handles
        self.handle: Optional[RemovableHandle] = None

    def __call__(self, *args: Any) -> None:
        return self.hook(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        handle = self.handle
        hooks = handle.hooks_dict_ref() if handle is not None else None
        copied_hooks = memo.get(id(hooks)) if hooks is not None else None  # the copy being filled right now
        if handle is not None and copied_hooks is not None:
            extras = [ref() for ref in handle.extra_dict_ref]
            copied_extras = [copy.deepcopy(extra, memo) for extra in extras if extra is not None]  # memoized: reused
            copy_handle = RemovableHandle(copied_hooks, extra_dict=copied_extras)
            copy_handle.id = handle.id
            self.handles.append(copy_handle)
        return _InertHook()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_InertHook, ())


@dataclass
class _CellCalls:
    """Gradients of one cell module's outputs over one step: entry t is the t-th call (``None``
    until a gradient arrives; it stays ``None`` if the loss does not depend on that output)."""

    state_grads: list[Optional[Tensor]] = field(default_factory=list)
    cell_grads: list[Optional[Tensor]] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)


class TimestepProbe:
    """Measures ||dL/dh_t|| for every recurrent layer of a model on the steps you arm it for.

    ``attach`` registers one forward hook per recurrent module; while the probe is not armed
    the hooks return at once, and they hold no tensor. ``arm()`` before a forward pass makes
    them capture that pass (every call of a cell, one call per timestep; every call of a fused
    layer, of which the first that the loss reaches is measured); ``disarm()`` before the
    backward pass (activation checkpointing replays forwards there); after the backward pass,
    ``compute()`` returns the norms and releases everything captured. A module the probe
    cannot measure (a subclass whose calls differ from the built-in layer's, say) is left out
    and named in :attr:`failures`: a measurement never stops training.

    Args:
        model: the module tree to watch.
        custom_cells: glob patterns over module names of your own cells: modules called once
            per timestep whose output is ``h_t`` or a tuple ``(h_t, c_t, ...)``.

    Raises:
        ValueError: a ``custom_cells`` pattern matches no module.
    """

    def __init__(self, model: nn.Module, custom_cells: Sequence[str] = ()) -> None:
        module_names = [name for name, _ in model.named_modules()]
        for pattern in custom_cells:
            if not fnmatch.filter(module_names, pattern):
                raise ValueError(f"custom_cells pattern {pattern!r} matches no module of the model")
        self.fused: dict[str, nn.RNNBase] = {}
        self.cells: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.RNNBase):
                self.fused[name] = module
            elif isinstance(module, nn.RNNCellBase) or any(fnmatch.fnmatchcase(name, p) for p in custom_cells):
                self.cells[name] = module
        self.armed = False
        self.repeated_calls: set[str] = set()
        self.dropout_calls: set[str] = set()
        self.failures: dict[str, str] = {}
        self.saturation: dict[str, float] = {}
        self._fused_captures: dict[str, list[FusedCapture]] = {}
        self._cell_calls: dict[str, _CellCalls] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.fused.items():
            self._register(module, self._fused_hook(name), with_kwargs=True)
        for name, module in self.cells.items():
            self._register(module, self._cell_hook(name))

    def _register(self, module: nn.Module, hook: Callable[..., None], **kwargs: Any) -> None:
        probe_hook = _ProbeHook(hook, self._handles)
        probe_hook.handle = module.register_forward_hook(probe_hook, **kwargs)
        self._handles.append(probe_hook.handle)

    def detach(self) -> None:
        """Remove every hook and release what was captured: the model is as it was."""
        self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def arm(self) -> None:
        """Capture the next forward pass(es) until :meth:`compute` or :meth:`release`."""
        self.armed = True

    def disarm(self) -> None:
        """Stop capturing new calls; what was captured stays until :meth:`compute` or :meth:`release`."""
        self.armed = False

    @property
    def has_captures(self) -> bool:
        """Whether a forward pass was captured since the last release."""
        return bool(self._fused_captures or self._cell_calls)

    @property
    def has_gradients(self) -> bool:
        """Whether a backward pass has reached any captured output since the last release."""
        fused = any(capture.received_gradient for captures in self._fused_captures.values() for capture in captures)
        return fused or any(g is not None for calls in self._cell_calls.values() for g in calls.state_grads)

    def release(self) -> None:
        """Drop every captured tensor and gradient hook, and disarm."""
        self.armed = False
        for capture in [*(c for captures in self._fused_captures.values() for c in captures), *self._cell_calls.values()]:
            for handle in capture.handles:
                handle.remove()
        self._fused_captures.clear()
        self._cell_calls.clear()

    def _fused_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.armed or name in self.failures:
                return
            try:
                capture = capture_fused_call(module, args, kwargs, output)
            except Exception as error:  # a measurement must never stop the user's training
                self.failures[name] = f"{type(error).__name__}: {error}"
                return
            if capture is None:
                return
            captures = self._fused_captures.setdefault(name, [])
            if captures:
                self.repeated_calls.add(name)
            captures.append(capture)
            if capture.dropout_active:
                self.dropout_calls.add(name)

        return hook

    def _cell_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.armed:
                return
            calls = self._cell_calls.setdefault(name, _CellCalls())
            state, cell = (output[0], output[1] if len(output) > 1 else None) if isinstance(output, tuple) else (output, None)
            for tensor, grads in ((state, calls.state_grads), (cell, calls.cell_grads)):
                if not isinstance(tensor, Tensor):
                    continue
                grads.append(None)
                if tensor.requires_grad:
                    calls.handles.append(tensor.register_hook(_accumulate_into(grads, len(grads) - 1)))

        return hook

    def compute(self, grad_scale: float = 1.0) -> dict[str, Tensor]:
        """Per-timestep norms of the captured pass, then :meth:`release`.

        Args:
            grad_scale: the AMP loss scale the backward pass ran with (hooks see scaled
                gradients); norms are divided by it.

        Returns:
            ``{key: (T,) float tensor on the CPU}``: keys as in the public contract, e.g.
            ``"encoder.rnn.l1_reverse"`` and, for LSTM cell states, ``"encoder.rnn.l1_reverse.cell"``.
            The fused layers' saturated fractions (:func:`saturated_fraction`) of the same pass
            go to :attr:`saturation`, under the same keys.
        """
        norms: dict[str, Tensor] = {}
        saturation: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for name, captures in self._fused_captures.items():
                    capture = next((c for c in captures if c.received_gradient), captures[0])
                    try:
                        layer_grads = fused_timestep_grads(self.fused[name], capture, grad_scale)
                    except Exception as error:  # a measurement must never stop the user's training
                        self.failures[name] = f"{type(error).__name__}: {error}"
                        continue
                    for local_key, grads in layer_grads.items():
                        key = layer_key(name, local_key)
                        norms[key] = timestep_norms(grads.state)
                        if grads.saturation is not None:
                            saturation[key] = grads.saturation
                        if grads.cell is not None:
                            norms[key + ".cell"] = timestep_norms(grads.cell)
                for name, calls in self._cell_calls.items():
                    norms[name] = _call_norms(calls.state_grads) / grad_scale
                    if calls.cell_grads:
                        norms[name + ".cell"] = _call_norms(calls.cell_grads) / grad_scale
        finally:
            self.release()
        self.saturation = {key: float(value) for key, value in saturation.items()}
        return {key: value.float().cpu() for key, value in norms.items()}


def _accumulate_into(grads: list[Optional[Tensor]], slot: int) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``grads[slot]``."""

    def hook(grad: Tensor) -> None:
        previous = grads[slot]
        grads[slot] = grad.detach() if previous is None else previous + grad.detach()

    return hook


def _call_norms(grads: list[Optional[Tensor]]) -> Tensor:
    """``(T,)`` Frobenius norms of per-call gradients; a call whose output got no gradient counts 0."""
    present = next(g for g in grads if g is not None) if any(g is not None for g in grads) else None
    if present is None:
        return torch.zeros(len(grads))
    return torch.stack(
        [torch.linalg.vector_norm(g.float()) if g is not None else present.new_zeros((), dtype=torch.float32) for g in grads]
    )
