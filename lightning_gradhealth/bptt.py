r"""Exact per-timestep gradients through time of recurrent layers: the pure recurrences.

:math:`\partial L/\partial h_t` here is the TOTAL derivative: the direct gradient arriving at the
layer's output at step t plus everything that flows back through :math:`h_{t+1}, h_{t+2}, \dots`
A fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` hides its inner states, so given the layer's input,
its states and the gradients arriving at its outputs, this module recomputes the gates in one
batched matrix product and runs the exact backward recursion of the cell by hand: one function
per cell type (:func:`rnn_backward`, :func:`gru_backward`, :func:`lstm_backward`), chosen by
:func:`backward_through_time` through :data:`BACKWARD_BY_CELL_TYPE`; :func:`fused_timestep_grads`
does it for every layer (top-down) and direction of a fused module. It costs about one forward
pass plus the recurrent half of a backward pass, with no weight gradients.

The recursions run under ``torch.no_grad()``. Everything here is plain torch, with no hooks:
:mod:`lightning_gradhealth.probe` captures what these functions read during a real training step.

Examples:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> rnn = torch.nn.RNN(3, 4)
    >>> x = torch.randn(6, 2, 3, requires_grad=True)
    >>> states, _ = rnn(x)
    >>> direct = torch.zeros_like(states)
    >>> direct[-1] = 1.0                                  # L = states[-1].sum(): dL/dh_5 = 1
    >>> weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0).to(torch.float32)
    >>> grads = backward_through_time("rnn_tanh", weights, x.detach(), states.detach(), torch.zeros(2, 4), direct)
    >>> torch.allclose(grads.input, torch.autograd.grad(states[-1].sum(), x)[0], atol=1e-6)
    True
    >>> tuple(timestep_norms(grads.state).shape)
    (6,)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Literal, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_gradhealth.defaults import REPLAY_TOLERANCE, SATURATED_TANH
from lightning_gradhealth.layers import cell_type_of

__all__ = [
    "BACKWARD_BY_CELL_TYPE",
    "KERNEL_BACKWARD_BY_CELL_TYPE",
    "REPLAYS",
    "CellWeights",
    "Replay",
    "TimestepGrads",
    "backward_through_time",
    "fused_timestep_grads",
    "gru_backward",
    "gru_backward_kernel",
    "kernel_gate_grads",
    "kernel_weights",
    "lstm_backward",
    "lstm_backward_kernel",
    "reverse_padded",
    "rnn_backward",
    "rnn_backward_kernel",
    "saturated_fraction",
    "state_residual",
    "timestep_norms",
]


Replay = Literal["recursion", "kernel"]
REPLAYS: tuple[Replay, ...] = ("recursion", "kernel")
"""The two exact ways of computing the gradients through time of a fused layer: a backward
recursion by hand (:data:`BACKWARD_BY_CELL_TYPE`) or the layer's own kernel
(:data:`KERNEL_BACKWARD_BY_CELL_TYPE`)."""


@dataclass(frozen=True)
class CellWeights:
    """The weights of one layer/direction, PyTorch layout (gate blocks stacked along rows).

    Attributes:
        w_ih: ``(G * H, I)`` input-to-hidden weights of the G gate blocks.
        w_hh: ``(G * H, H_out)`` hidden-to-hidden weights.
        b_ih: ``(G * H,)`` input bias, or ``None`` (``bias=False``).
        b_hh: ``(G * H,)`` recurrent bias, or ``None``.
        w_hr: ``(H_out, H)`` an LSTM's projection (``proj_size``), else ``None``.
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor] = None
    b_hh: Optional[Tensor] = None
    w_hr: Optional[Tensor] = None

    @classmethod
    def of_layer(cls, weights: Mapping[str, Tensor], layer: int, reverse: bool) -> "CellWeights":
        """One layer/direction of a fused module, from the weights by name (``weight_ih_l1_reverse``, ...)."""
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        optional = [weights.get(kind + suffix) for kind in ("bias_ih", "bias_hh", "weight_hr")]
        return cls(weights["weight_ih" + suffix], weights["weight_hh" + suffix], *optional)

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
            LSTM ``g_t``, GRU ``n_t``) over valid steps, batch and units that are saturated
            (:func:`saturated_fraction`); ``None`` for ReLU.
        residual: 0-d tensor, how far the states recomputed from the inputs and the given
            previous states are from the given states (:func:`state_residual`): the replay's
            check of itself.
        replay: which replay computed them: ``"recursion"`` (:data:`BACKWARD_BY_CELL_TYPE`) or
            ``"kernel"`` (:data:`KERNEL_BACKWARD_BY_CELL_TYPE`).
    """

    state: Tensor
    cell: Optional[Tensor]
    input: Tensor
    saturation: Optional[Tensor] = None
    residual: Optional[Tensor] = None
    replay: str = "recursion"


def saturated_fraction(candidates: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Fraction of ``(T, B, H)`` tanh outputs with ``|value| >``
    :data:`~lightning_gradhealth.defaults.SATURATED_TANH`, over the valid steps of each sequence
    (``lengths``; all steps when ``None``).

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


def state_residual(recomputed: Tensor, states: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    r"""``max |recomputed - states| / max(1, max |states|)`` over the valid steps of each sequence.

    The backward recursions recompute every :math:`h_t` from :math:`x_t` and the given
    :math:`h_{t-1}`; when these match the given :math:`h_t` (to float precision), the inputs and
    states the replay was given are those the layer really ran on. Two fused reductions; the
    result is NaN or Inf when either tensor holds NaN or Inf (nothing to compare: such a layer's
    gradients come out non-finite and are reported as such).

    Examples:
        >>> states = torch.tensor([[[0.5]], [[2.0]]])                   # (T=2, B=1, H=1)
        >>> state_residual(states + torch.tensor([[[0.0]], [[0.2]]]), states)
        tensor(0.1000)
        >>> state_residual(states + torch.tensor([[[0.0]], [[0.2]]]), states, lengths=torch.tensor([1]))
        tensor(0.)
    """
    difference = recomputed - states
    if lengths is not None:
        valid = torch.arange(states.shape[0], device=states.device)[:, None] < lengths.to(states.device)[None, :]
        difference.mul_(valid[..., None])
    if difference.numel() == 0:
        return difference.new_zeros(())
    largest = torch.linalg.vector_norm(states, math.inf)  # padding is zero in the captured states
    return torch.linalg.vector_norm(difference, math.inf) / largest.clamp(min=1.0)


def timestep_norms(grads: Tensor) -> Tensor:
    r"""Frobenius norm over batch and hidden units at every timestep: ``(T, B, ...) -> (T,)``.

    Exact to rounding for any finite entries. A plain sum of squares is exact while it stays in
    float's normal range; a step whose norm comes out below :math:`\sqrt{\epsilon_{\min}}`
    (float32: 1.1e-19, where squares of small entries underflow) or Inf (where squares of large
    ones overflow) is computed again as :math:`m_t \, \| g_t / m_t \|` with
    :math:`m_t = \max |g_t|` (the scaling of LAPACK's ``nrm2``). A step whose entries are all 0
    (or that has none) has norm 0; NaN and Inf entries give NaN and Inf.

    Examples:
        >>> timestep_norms(torch.ones(2, 4, 9))
        tensor([6., 6.])
        >>> timestep_norms(torch.full((1, 2, 2), 1e-30))     # the sum of squares is 0 in float32
        tensor([2.0000e-30])
    """
    flat = grads.flatten(1)
    norms = torch.linalg.vector_norm(flat, dim=1)
    if flat.shape[1] == 0:
        return norms
    inexact = (norms < math.sqrt(torch.finfo(norms.dtype).tiny)) | torch.isinf(norms)
    if bool(inexact.any()):
        rows = flat[inexact]  # a copy, scaled in place
        largest = torch.linalg.vector_norm(rows, math.inf, dim=1, keepdim=True)
        scale = torch.where(torch.isfinite(largest) & (largest > 0), largest, torch.ones_like(largest))
        norms[inexact] = torch.linalg.vector_norm(rows.div_(scale), dim=1) * scale.squeeze(1)
    return norms


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


def gate_affine(weights: CellWeights, inputs: Tensor, previous: Tensor) -> Tensor:
    r"""The gates' pre-activations :math:`a_t = W_{ih} x_t + W_{hh} h_{t-1} + b_{ih} + b_{hh}` over
    ``(T, B, ·)``, in one ``(T, B, G * H)`` buffer: the biases summed once, the recurrent product
    accumulated into the input product in place, so the two parts are never stored apart (each
    pass over a ``(T, B, G * H)`` tensor costs as much as a small matrix product).

    Examples:
        >>> lstm = nn.LSTM(3, 4)
        >>> weights = CellWeights.of_layer(dict(lstm.named_parameters()), 0, False).to(torch.float32)
        >>> x, previous = torch.randn(5, 2, 3), torch.randn(5, 2, 4)
        >>> expected = x @ weights.w_ih.T + weights.b_ih + previous @ weights.w_hh.T + weights.b_hh
        >>> torch.allclose(gate_affine(weights, x, previous), expected, atol=1e-6)
        True
    """
    biases = [bias for bias in (weights.b_ih, weights.b_hh) if bias is not None]
    total = _affine(inputs, weights.w_ih, sum(biases[1:], biases[0]) if biases else None)
    total.view(-1, total.shape[-1]).addmm_(previous.reshape(-1, previous.shape[-1]), weights.w_hh.T)
    return total


class _Recurrence(NamedTuple):
    """What every cell's backward recursion starts from, for all T steps at once (time-major).

    Attributes:
        direct_grads: ``(T, B, H_out)`` the direct gradient on each h_t, with each sequence's
            gradient on its final state h_n added at its own last step.
        previous: ``(T, B, H_out)`` h_{t-1} for every t (the initial state first).
        input_part: ``(T, B, G * H)`` the gates' input affine part, W_ih x_t + b_ih.
        recurrent_part: ``(T, B, G * H)`` the gates' recurrent affine part, W_hh h_{t-1} + b_hh.
    """

    direct_grads: Tensor
    previous: Tensor
    input_part: Tensor
    recurrent_part: Tensor


def _direct_and_previous(
    states: Tensor, initial_state: Tensor, output_grads: Tensor, final_state_grad: Optional[Tensor], lengths: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """The direct gradient on every h_t (the final state's gradient at each sequence's last step
    included), and h_{t-1} for every t."""
    final_state_part = _at_last_steps(final_state_grad, states.shape[0], lengths)
    direct_grads = output_grads if final_state_part is None else output_grads + final_state_part
    return direct_grads, torch.cat([initial_state[None], states[:-1]])


def _prepare(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor],
    lengths: Optional[Tensor],
) -> _Recurrence:
    """The direct gradients, previous states and gate affine parts shared by every cell type."""
    direct_grads, previous = _direct_and_previous(states, initial_state, output_grads, final_state_grad, lengths)
    input_part = _affine(inputs, weights.w_ih, weights.b_ih)
    return _Recurrence(direct_grads, previous, input_part, _affine(previous, weights.w_hh, weights.b_hh))


def _step_back(state_grads: Tensor, direct_grads: Tensor, w_hh: Tensor, gate_grads_at: Callable[[int], Tensor]) -> None:
    r"""The loop every recursion shares, last step first:
    :math:`\partial L/\partial h_{t-1} = \delta_{t-1} + W_{hh}^\top \partial L/\partial a_t`, written
    into ``state_grads`` by one fused ``addmm`` per step; ``gate_grads_at(t)`` computes the
    ``(B, G * H)`` gate gradients of step t once ``state_grads[t]`` is final (and whatever
    else the cell carries back)."""
    steps = state_grads.shape[0]
    if steps:
        state_grads[-1] = direct_grads[-1]
    for t in reversed(range(steps)):
        gate_grads = gate_grads_at(t)
        if t:
            torch.addmm(direct_grads[t - 1], gate_grads.flatten(1), w_hh, out=state_grads[t - 1])


@torch.no_grad()
def rnn_backward(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    *,
    nonlinearity: Literal["tanh", "relu"] = "tanh",
) -> TimestepGrads:
    r"""Backward through time of an Elman RNN, :math:`h_t = \phi(a_t)` with
    :math:`a_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}`:

    .. math::
        \frac{\partial L}{\partial h_t} = \delta_t + W_{hh}^\top \frac{\partial L}{\partial a_{t+1}},
        \qquad
        \frac{\partial L}{\partial a_t} = \frac{\partial L}{\partial h_t} \odot \phi'(a_t),

    where :math:`\delta_t` is the direct gradient and :math:`\phi'(a_t) = 1 - h_t^2` (tanh) or
    :math:`[a_t > 0]` (ReLU).

    Args:
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths: as in
            :func:`backward_through_time`.
        nonlinearity: ``"tanh"`` or ``"relu"``, as the layer's.

    Returns:
        :class:`TimestepGrads` with ``cell=None``; ``saturation=None`` for ReLU.

    Raises:
        ValueError: another ``nonlinearity``.
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected 'tanh' or 'relu'")
    direct_grads, previous = _direct_and_previous(states, initial_state, output_grads, final_state_grad, lengths)
    pre_activations = gate_affine(weights, inputs, previous)
    if nonlinearity == "tanh":
        derivative = 1 - states * states
    else:
        derivative = (pre_activations > 0).to(states.dtype)
    state_grads = torch.empty_like(states)
    pre_activation_grads = torch.empty_like(pre_activations)
    def gate_grads_at(t: int) -> Tensor:
        return torch.mul(state_grads[t], derivative[t], out=pre_activation_grads[t])

    _step_back(state_grads, direct_grads, weights.w_hh, gate_grads_at)
    activation = torch.tanh if nonlinearity == "tanh" else torch.relu
    residual = state_residual(activation(pre_activations), states, lengths)
    saturation = saturated_fraction(states, lengths) if nonlinearity == "tanh" else None
    return TimestepGrads(state_grads, None, pre_activation_grads @ weights.w_ih, saturation, residual)


@torch.no_grad()
def gru_backward(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> TimestepGrads:
    r"""Backward through time of a GRU, :math:`h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}` with
    :math:`r_t = \sigma(a^r_t)`, :math:`z_t = \sigma(a^z_t)`,
    :math:`n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn}))`:

    .. math::
        \frac{\partial L}{\partial h_t} = \delta_t + z_{t+1} \odot \frac{\partial L}{\partial h_{t+1}}
            + W_{hh}^\top \Big[\frac{\partial L}{\partial a^r_{t+1}};\;
              \frac{\partial L}{\partial a^z_{t+1}};\;
              r_{t+1} \odot \frac{\partial L}{\partial a^n_{t+1}}\Big],

    where :math:`\delta_t` is the direct gradient and every gate gradient is
    :math:`\partial L/\partial h_t` times a factor known before the recursion:
    :math:`\partial L/\partial a^n_t = \partial L/\partial h_t \odot (1 - z_t)(1 - n_t^2)`,
    :math:`\partial L/\partial a^r_t = \partial L/\partial a^n_t \odot (W_{hn} h_{t-1} + b_{hn}) \odot r_t (1 - r_t)`,
    :math:`\partial L/\partial a^z_t = \partial L/\partial h_t \odot (h_{t-1} - n_t) \odot z_t (1 - z_t)`.

    Args:
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths: as in
            :func:`backward_through_time`.

    Returns:
        :class:`TimestepGrads` with ``cell=None``, the saturation of the candidate :math:`n_t`.
    """
    direct_grads, previous, input_part, recurrent_part = _prepare(
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths
    )
    input_r, input_z, input_n = input_part.chunk(3, dim=-1)
    hidden_r, hidden_z, hidden_n = recurrent_part.chunk(3, dim=-1)
    reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
    candidate = torch.tanh(input_n + reset * hidden_n)
    to_candidate = (1 - update) * (1 - candidate * candidate)
    to_reset = to_candidate * hidden_n * reset * (1 - reset)
    to_update = (previous - candidate) * update * (1 - update)
    input_factors = torch.stack([to_reset, to_update, to_candidate], dim=-2)  # (T, B, 3, H)
    recurrent_factors = torch.stack([to_reset, to_update, to_candidate * reset], dim=-2)
    recurrent_grads = torch.empty_like(recurrent_factors)
    state_grads = torch.empty_like(states)
    last = inputs.shape[0] - 1

    def recurrent_grads_at(t: int) -> Tensor:
        if t < last:  # the path through z_{t+1} * h_t
            state_grads[t].addcmul_(state_grads[t + 1], update[t + 1])
        return torch.mul(recurrent_factors[t], state_grads[t].unsqueeze(1), out=recurrent_grads[t])

    _step_back(state_grads, direct_grads, weights.w_hh, recurrent_grads_at)
    pre_activation_grads = (input_factors * state_grads.unsqueeze(2)).flatten(2)
    residual = state_residual(torch.lerp(candidate, previous, update), states, lengths)
    saturation = saturated_fraction(candidate, lengths)
    return TimestepGrads(state_grads, None, pre_activation_grads @ weights.w_ih, saturation, residual)


@torch.no_grad()
def lstm_backward(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    *,
    initial_cell: Tensor,
    final_cell_grad: Optional[Tensor] = None,
) -> TimestepGrads:
    r"""Backward through time of an LSTM, :math:`c_t = f_t \odot c_{t-1} + i_t \odot g_t`,
    :math:`\tilde h_t = o_t \odot \tanh c_t` and :math:`h_t = W_{hr} \tilde h_t` with
    ``proj_size`` (else :math:`h_t = \tilde h_t`), gates :math:`i, f, o = \sigma(a^{i,f,o}_t)`,
    :math:`g_t = \tanh(a^g_t)`:

    .. math::
        \frac{\partial L}{\partial h_t} = \delta_t + W_{hh}^\top \frac{\partial L}{\partial a_{t+1}},
        \qquad
        \frac{\partial L}{\partial c_t} = \frac{\partial L}{\partial \tilde h_t} \odot o_t \odot (1 - \tanh^2 c_t)
            + f_{t+1} \odot \frac{\partial L}{\partial c_{t+1}},

    where :math:`\delta_t` is the direct gradient,
    :math:`\partial L/\partial \tilde h_t = W_{hr}^\top \partial L/\partial h_t`, and the gate
    gradients are :math:`\partial L/\partial c_t` (input, forget, cell gates) or
    :math:`\partial L/\partial \tilde h_t` (output gate) times a factor known before the recursion.

    Args:
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths: as in
            :func:`backward_through_time`.
        initial_cell: ``(B, H)`` c_{-1}.
        final_cell_grad: ``(B, H)`` gradient on the final cell state c_n, if any; it enters
            at each sequence's own last step.

    Returns:
        :class:`TimestepGrads` with ``cell`` dL/dc_t, the saturation of the candidate :math:`g_t`.
    """
    direct_grads, previous = _direct_and_previous(states, initial_state, output_grads, final_state_grad, lengths)
    steps = inputs.shape[0]
    gates = gate_affine(weights, inputs, previous).unflatten(-1, (4, -1))
    # each activation reads its gate's strided view and writes a contiguous tensor: one pass each,
    # and the step-by-step loops below read them one timestep at a time
    gate_input, gate_forget = torch.sigmoid(gates[:, :, 0]), torch.sigmoid(gates[:, :, 1])
    gate_cell, gate_output = torch.tanh(gates[:, :, 2]), torch.sigmoid(gates[:, :, 3])
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
    gate_grads = torch.empty_like(gates)
    state_grads = torch.empty_like(states)
    cell_grads = torch.empty_like(cells)
    final_cell_part = _at_last_steps(final_cell_grad, steps, lengths)
    carry_cell = torch.zeros_like(initial_cell) if final_cell_part is None else final_cell_part[-1]  # f_{t+1} dL/dc_{t+1}

    def gate_grads_at(t: int) -> Tensor:
        nonlocal carry_cell
        grad_h = state_grads[t]
        grad_unprojected = grad_h if weights.w_hr is None else grad_h @ weights.w_hr
        grad_c = torch.addcmul(carry_cell, grad_unprojected, output_to_cell[t], out=cell_grads[t])
        torch.mul(gate_factors[t, :, :3], grad_c.unsqueeze(1), out=gate_grads[t, :, :3])
        torch.mul(gate_factors[t, :, 3], grad_unprojected, out=gate_grads[t, :, 3])
        if t:
            carry_cell = grad_c * gate_forget[t]
            if final_cell_part is not None:
                carry_cell += final_cell_part[t - 1]
        return gate_grads[t]

    _step_back(state_grads, direct_grads, weights.w_hh, gate_grads_at)
    pre_activation_grads = gate_grads.flatten(-2)
    recomputed = gate_output * tanh_cells
    residual = state_residual(recomputed if weights.w_hr is None else recomputed @ weights.w_hr.T, states, lengths)
    saturation = saturated_fraction(gate_cell, lengths)
    return TimestepGrads(state_grads, cell_grads, pre_activation_grads @ weights.w_ih, saturation, residual)


BACKWARD_BY_CELL_TYPE: dict[str, Callable[..., TimestepGrads]] = {
    "rnn_tanh": partial(rnn_backward, nonlinearity="tanh"),
    "rnn_relu": partial(rnn_backward, nonlinearity="relu"),
    "gru": gru_backward,
    "lstm": lstm_backward,
}
"""The backward recursion of each cell type (:func:`~lightning_gradhealth.layers.cell_type_of`);
each takes ``(weights, inputs, states, initial_state, output_grads, final_state_grad, lengths)``,
and the LSTM's also ``initial_cell=`` and ``final_cell_grad=``."""


_LAYER_BY_CELL_TYPE: dict[str, tuple[type[nn.RNNBase], dict[str, Any]]] = {
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, {}),
    "lstm": (nn.LSTM, {}),
}


def _exact_cudnn() -> contextlib.AbstractContextManager[Any]:
    """cuDNN without TF32 inside the replay, so a float32 replay computes in float32 (the identity
    block must pass the gates' input part on unrounded); its other settings stay as they are."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)


def kernel_gate_grads(
    cell_type: str,
    weights: CellWeights,
    input_part: Tensor,
    initial_state: Tensor,
    direct_grads: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    initial_cell: Optional[Tensor] = None,
    final_cell_grad: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    r"""The gradient on every gate's pre-activation at every step, from one run of the layer's own
    fused kernel forward and backward.

    The layer is run again on :math:`u_t = W_{ih} x_t + b_{ih}` with an identity input matrix and no
    input bias, its own :math:`W_{hh}`, :math:`b_{hh}` (and :math:`W_{hr}`): it computes the same
    states, and since :math:`u_t` enters every gate's pre-activation :math:`a_t` with coefficient 1,
    the kernel's gradient on its input is :math:`\partial L/\partial a_t` for every t and gate
    (for a GRU's candidate, the pre-activation of the tanh, which :math:`u_t` enters outside the
    reset gate). One backward pass through the kernel gives all T steps, with no loop over T in
    Python; what it costs is the identity block, a ``(G H) x (G H)`` input projection.

    Args:
        cell_type: as in :func:`backward_through_time`.
        weights: this layer/direction's weights (``w_ih`` is not read: ``input_part`` holds it).
        input_part: ``(T, B, G * H)`` :math:`W_{ih} x_t + b_{ih}`.
        initial_state: ``(B, H_out)`` h_{-1}.
        direct_grads: ``(T, B, H_out)`` the direct gradient on each h_t, the gradient on each
            sequence's final state included at its last step.
        lengths: ``(B,)`` valid steps per sequence, or ``None``.
        initial_cell: ``(B, H)`` an LSTM's c_{-1}.
        final_cell_grad: ``(B, H)`` the gradient on an LSTM's final cell state, if any.

    Returns:
        ``(gate_grads, states)``: ``(T, B, G * H)`` :math:`\partial L/\partial a_t`, and the
        ``(T, B, H_out)`` states the kernel computed, free-running from ``initial_state`` (zero
        past each sequence's length).

    Examples:
        >>> rnn = nn.RNN(3, 4)
        >>> x, h0 = torch.randn(6, 2, 3), torch.zeros(2, 4)
        >>> states, _ = rnn(x)
        >>> weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0).to(torch.float32)
        >>> direct = torch.ones_like(states)
        >>> gate_grads, replayed = kernel_gate_grads("rnn_tanh", weights, _affine(x, weights.w_ih, weights.b_ih), h0, direct)
        >>> torch.allclose(replayed, states.detach(), atol=1e-6), tuple(gate_grads.shape)
        (True, (6, 2, 4))
    """
    layer_class, options = _LAYER_BY_CELL_TYPE[cell_type]
    width = input_part.shape[-1]
    if weights.w_hr is not None:
        options = {**options, "proj_size": weights.w_hr.shape[0]}
    hidden = width // {"lstm": 4, "gru": 3}.get(cell_type, 1)
    layer = layer_class(width, hidden, bias=weights.b_hh is not None, device="meta", **options)
    identity = torch.eye(width, dtype=input_part.dtype, device=input_part.device)
    parameters = {"weight_ih_l0": identity, "weight_hh_l0": weights.w_hh}
    if weights.b_hh is not None:
        parameters |= {"bias_ih_l0": torch.zeros_like(weights.b_hh), "bias_hh_l0": weights.b_hh}
    if weights.w_hr is not None:
        parameters["weight_hr_l0"] = weights.w_hr
    with torch.enable_grad(), _exact_cudnn():
        gate_inputs = input_part.detach().requires_grad_()
        sequence: Any = gate_inputs if lengths is None else pack_padded_sequence(gate_inputs, lengths.cpu(), enforce_sorted=False)
        hx = initial_state[None] if initial_cell is None else (initial_state[None], initial_cell[None])
        output, finals = functional_call(layer, parameters, (sequence, hx))
        if lengths is not None:
            output = pad_packed_sequence(output, total_length=input_part.shape[0])[0]
        outputs, output_grads = [output], [direct_grads]
        if final_cell_grad is not None:
            outputs.append(finals[1][0])
            output_grads.append(final_cell_grad)
        (gate_grads,) = torch.autograd.grad(outputs, gate_inputs, output_grads)
    return gate_grads, output.detach()


def _through_next_step(gate_grads: Tensor, weight: Tensor) -> Tensor:
    r"""``(T, B, H_out)``: :math:`W^\top g_{t+1}` at every step t, zero at the last: what the
    gates of step t + 1 send back to h_t through ``weight``, for all steps in one product."""
    sent = torch.zeros(*gate_grads.shape[:-1], weight.shape[1], dtype=gate_grads.dtype, device=gate_grads.device)
    sent[:-1] = _affine(gate_grads[1:], weight.T, None)
    return sent


@torch.no_grad()
def rnn_backward_kernel(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    *,
    nonlinearity: Literal["tanh", "relu"] = "tanh",
) -> TimestepGrads:
    r""":func:`rnn_backward` through the layer's own kernel: with
    :math:`\partial L/\partial a_t` for every t from :func:`kernel_gate_grads`,
    :math:`\partial L/\partial h_t = \delta_t + W_{hh}^\top \partial L/\partial a_{t+1}` is one
    batched product, with no loop over T.

    The arguments and the result are those of :func:`rnn_backward`; the result's ``residual``
    compares the kernel's free-running states with ``states``.

    Examples:
        >>> rnn = nn.RNN(3, 4)
        >>> x = torch.randn(6, 2, 3)
        >>> states = rnn(x)[0].detach()
        >>> weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0).to(torch.float32)
        >>> direct = torch.randn_like(states)
        >>> by_kernel = rnn_backward_kernel(weights, x, states, torch.zeros(2, 4), direct)
        >>> by_recursion = rnn_backward(weights, x, states, torch.zeros(2, 4), direct)
        >>> torch.allclose(by_kernel.state, by_recursion.state, atol=1e-6)
        True
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected 'tanh' or 'relu'")
    final_state_part = _at_last_steps(final_state_grad, inputs.shape[0], lengths)
    direct_grads = output_grads if final_state_part is None else output_grads + final_state_part
    input_part = _affine(inputs, weights.w_ih, weights.b_ih)
    gate_grads, replayed = kernel_gate_grads(f"rnn_{nonlinearity}", weights, input_part, initial_state, direct_grads, lengths)
    state_grads = _through_next_step(gate_grads, weights.w_hh).add_(direct_grads)
    saturation = saturated_fraction(states, lengths) if nonlinearity == "tanh" else None
    residual = state_residual(replayed, states, lengths)
    return TimestepGrads(state_grads, None, _affine(gate_grads, weights.w_ih.T, None), saturation, residual)


@torch.no_grad()
def gru_backward_kernel(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> TimestepGrads:
    r""":func:`gru_backward` through the layer's own kernel: with the gate gradients of every step
    from :func:`kernel_gate_grads`, the recursion of :func:`gru_backward` becomes

    .. math::
        \frac{\partial L}{\partial h_t} = s_t + z_{t+1} \odot \frac{\partial L}{\partial h_{t+1}},
        \qquad
        s_t = \delta_t + W_{hh}^\top \Big[\frac{\partial L}{\partial a^r_{t+1}};\;
              \frac{\partial L}{\partial a^z_{t+1}};\;
              r_{t+1} \odot \frac{\partial L}{\partial a^n_{t+1}}\Big],

    where every :math:`s_t` comes from one batched product (the gates recomputed from the captured
    states): what is left of the loop over T is one element-wise multiply-add per step.

    The arguments and the result are those of :func:`gru_backward`; the result's ``residual``
    compares the kernel's free-running states with ``states``.

    Examples:
        >>> gru = nn.GRU(3, 4)
        >>> x = torch.randn(6, 2, 3)
        >>> states = gru(x)[0].detach()
        >>> weights = CellWeights(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0).to(torch.float32)
        >>> direct = torch.randn_like(states)
        >>> by_kernel = gru_backward_kernel(weights, x, states, torch.zeros(2, 4), direct)
        >>> torch.allclose(by_kernel.state, gru_backward(weights, x, states, torch.zeros(2, 4), direct).state, atol=1e-6)
        True
    """
    direct_grads, previous, input_part, recurrent_part = _prepare(
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths
    )
    gate_grads, replayed = kernel_gate_grads("gru", weights, input_part, initial_state, direct_grads, lengths)
    input_r, input_z, input_n = input_part.chunk(3, dim=-1)
    hidden_r, hidden_z, hidden_n = recurrent_part.chunk(3, dim=-1)
    reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
    recurrent_grads = gate_grads.clone()
    recurrent_grads[..., 2 * reset.shape[-1] :].mul_(reset)
    sent = _through_next_step(recurrent_grads, weights.w_hh).add_(direct_grads)
    state_grads = torch.empty_like(states)
    state_grads[-1] = sent[-1]
    for t in reversed(range(inputs.shape[0] - 1)):
        torch.addcmul(sent[t], update[t + 1], state_grads[t + 1], out=state_grads[t])
    saturation = saturated_fraction(torch.tanh(input_n + reset * hidden_n), lengths)
    residual = state_residual(replayed, states, lengths)
    return TimestepGrads(state_grads, None, _affine(gate_grads, weights.w_ih.T, None), saturation, residual)


@torch.no_grad()
def lstm_backward_kernel(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    output_grads: Tensor,
    final_state_grad: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    *,
    initial_cell: Tensor,
    final_cell_grad: Optional[Tensor] = None,
) -> TimestepGrads:
    r""":func:`lstm_backward` through the layer's own kernel: with
    :math:`\partial L/\partial a_t` of every gate and step from :func:`kernel_gate_grads`,
    :math:`\partial L/\partial h_t = \delta_t + W_{hh}^\top \partial L/\partial a_{t+1}` is one
    batched product. The cell state's gradient is left to an element-wise recursion, one
    multiply-add per step:

    .. math::
        \frac{\partial L}{\partial c_t} = \frac{\partial L}{\partial \tilde h_t} \odot o_t \odot (1 - \tanh^2 c_t)
            + f_{t+1} \odot \frac{\partial L}{\partial c_{t+1}},

    with the gates recomputed from the captured states in one product and the cells by
    :math:`c_t = f_t \odot c_{t-1} + i_t \odot g_t`, one multiply-add per step.

    The arguments and the result are those of :func:`lstm_backward`; the result's ``residual``
    compares the kernel's free-running states with ``states``.

    Examples:
        >>> lstm = nn.LSTM(3, 4)
        >>> x, zeros = torch.randn(6, 2, 3), torch.zeros(2, 4)
        >>> states = lstm(x)[0].detach()
        >>> weights = CellWeights(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0).to(torch.float32)
        >>> direct = torch.randn_like(states)
        >>> by_kernel = lstm_backward_kernel(weights, x, states, zeros, direct, initial_cell=zeros)
        >>> by_recursion = lstm_backward(weights, x, states, zeros, direct, initial_cell=zeros)
        >>> torch.allclose(by_kernel.cell, by_recursion.cell, atol=1e-6)
        True
    """
    direct_grads, _, input_part, recurrent_part = _prepare(
        weights, inputs, states, initial_state, output_grads, final_state_grad, lengths
    )
    steps = inputs.shape[0]
    gate_grads, replayed = kernel_gate_grads(
        "lstm", weights, input_part, initial_state, direct_grads, lengths, initial_cell=initial_cell,
        final_cell_grad=final_cell_grad,
    )
    state_grads = _through_next_step(gate_grads, weights.w_hh).add_(direct_grads)
    grad_unprojected = state_grads if weights.w_hr is None else _affine(state_grads, weights.w_hr.T, None)
    gates = input_part.add_(recurrent_part).view(*input_part.shape[:-1], 4, -1)
    gate_input, gate_forget, gate_cell, gate_output = (gate.contiguous() for gate in gates.unbind(dim=-2))
    gate_input.sigmoid_(), gate_forget.sigmoid_(), gate_cell.tanh_(), gate_output.sigmoid_()
    cells = torch.empty_like(gate_cell)
    cell_inputs = gate_input * gate_cell
    cell = initial_cell
    for t in range(steps):
        cell = torch.addcmul(cell_inputs[t], gate_forget[t], cell, out=cells[t])
    tanh_cells = cells.tanh()
    # dL/dc_t = local_t + f_{t+1} dL/dc_{t+1}, local_t = dL/dh~_t o_t (1 - tanh^2 c_t) plus the
    # final cell's gradient at each sequence's last step
    local = torch.addcmul(gate_output, gate_output, tanh_cells * tanh_cells, value=-1).mul_(grad_unprojected)
    final_cell_part = _at_last_steps(final_cell_grad, steps, lengths)
    if final_cell_part is not None:
        local.add_(final_cell_part)
    cell_grads = torch.empty_like(cells)
    cell_grads[-1] = local[-1]
    for t in reversed(range(steps - 1)):
        torch.addcmul(local[t], gate_forget[t + 1], cell_grads[t + 1], out=cell_grads[t])
    saturation = saturated_fraction(gate_cell, lengths)
    residual = state_residual(replayed, states, lengths)
    return TimestepGrads(state_grads, cell_grads, _affine(gate_grads, weights.w_ih.T, None), saturation, residual)


KERNEL_BACKWARD_BY_CELL_TYPE: dict[str, Callable[..., TimestepGrads]] = {
    "rnn_tanh": partial(rnn_backward_kernel, nonlinearity="tanh"),
    "rnn_relu": partial(rnn_backward_kernel, nonlinearity="relu"),
    "gru": gru_backward_kernel,
    "lstm": lstm_backward_kernel,
}
"""The same per-timestep gradients as :data:`BACKWARD_BY_CELL_TYPE`, through the layer's own
fused kernel (:func:`kernel_gate_grads`), with the same arguments."""


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
    *,
    replay: Replay = "recursion",
) -> TimestepGrads:
    r"""Exact total derivatives dL/dh_t (and dL/dc_t) of one recurrent layer, one direction.

    ``replay="recursion"`` recomputes the gates from the inputs and the layer's own output states
    in one batched product, then runs the cell's backward recursion from the last step to the
    first: the function of :data:`BACKWARD_BY_CELL_TYPE` for ``cell_type`` (:func:`rnn_backward`,
    :func:`gru_backward`, :func:`lstm_backward`, whose docstrings give the equations).
    ``replay="kernel"`` takes every gate's gradient from one forward and backward pass of the
    layer's own kernel instead (:data:`KERNEL_BACKWARD_BY_CELL_TYPE`): no matrix product per
    step, for one wider input projection. Both are exact; which is faster depends on the device,
    the cell, T and H (``benchmarks/replay.py``).

    Args:
        cell_type: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        weights: this layer/direction's weights.
        inputs: ``(T, B, I)`` the layer's input, time-major, in the direction's reading order.
        states: ``(T, B, H_out)`` the states h_t the layer produced (its output sequence).
        initial_state: ``(B, H_out)`` h_{-1}.
        output_grads: ``(T, B, H_out)`` the direct gradient on each h_t (zero on padding).
        final_state_grad: ``(B, H_out)`` gradient on the final state h_n, if any.
        initial_cell: ``(B, H)`` c_{-1}, LSTM only (required there).
        final_cell_grad: ``(B, H)`` gradient on c_n, LSTM only.
        lengths: ``(B,)`` valid steps per sequence for packed input; steps past a sequence's
            length get zero gradient, and its h_n gradient enters at its own last step.
        replay: ``"recursion"`` or ``"kernel"``.

    Returns:
        :class:`TimestepGrads`, in the same time order as ``inputs``.

    Raises:
        ValueError: an unknown ``cell_type`` or ``replay``.
        TypeError: an LSTM without ``initial_cell``, or cell-state arguments for another cell type.
    """
    if replay not in REPLAYS:
        raise ValueError(f"unknown replay {replay!r}; expected one of {', '.join(map(repr, REPLAYS))}")
    backward = (BACKWARD_BY_CELL_TYPE if replay == "recursion" else KERNEL_BACKWARD_BY_CELL_TYPE).get(cell_type)
    if backward is None:
        raise ValueError(f"unknown cell type {cell_type!r}; expected one of {', '.join(map(repr, BACKWARD_BY_CELL_TYPE))}")
    cell_state = {
        name: value for name, value in (("initial_cell", initial_cell), ("final_cell_grad", final_cell_grad)) if value is not None
    }
    # A batch-first layer's sequences arrive as transposed views; the recursions read and write one
    # timestep at a time, which on time-major memory is a contiguous block (about 15% faster for
    # the reference LSTM than strided rows, for three copies)
    inputs, states, output_grads = inputs.contiguous(), states.contiguous(), output_grads.contiguous()
    grads = backward(weights, inputs, states, initial_state, output_grads, final_state_grad, lengths, **cell_state)
    return replace(grads, replay=replay)


def _layer_parameters(weights: Mapping[str, Tensor], layer: int, bidirectional: bool) -> dict[str, Tensor]:
    """One layer's weights of a fused module (both directions), named as layer 0 of a one-layer module."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {
        f"{kind}_l0{direction}": weights[f"{kind}_l{layer}{direction}"]
        for direction in (("", "_reverse") if bidirectional else ("",))
        for kind in kinds
        if f"{kind}_l{layer}{direction}" in weights
    }


def kernel_weights(module: nn.RNNBase) -> dict[str, Tensor]:
    """The weights a fused module's kernel runs with, by name: ``module._flat_weights_names``."""
    return {name: getattr(module, name) for name in module._flat_weights_names}


_BUILT_IN_LAYERS = (nn.LSTM, nn.GRU, nn.RNN)


def _layer_forward(
    module: nn.RNNBase,
    weights: Mapping[str, Tensor],
    layer: int,
    inputs: Tensor,
    states: Tensor,
    cells: Optional[Tensor],
    lengths: Optional[Tensor],
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
    layer_weights = _layer_parameters(weights, layer, module.bidirectional)
    parameters = {name: weight.to(inputs.dtype) for name, weight in layer_weights.items()}
    output, _ = functional_call(one_layer, parameters, (sequence, hx))
    return output if lengths is None else pad_packed_sequence(output, total_length=inputs.shape[0])[0]




@torch.no_grad()
def fused_timestep_grads(
    module: nn.RNNBase,
    inputs: Tensor,
    initial_states: Tensor,
    initial_cells: Optional[Tensor] = None,
    output_grad: Optional[Tensor] = None,
    final_state_grad: Optional[Tensor] = None,
    final_cell_grad: Optional[Tensor] = None,
    *,
    outputs: Optional[Tensor] = None,
    layer_outputs: Optional[Sequence[Tensor]] = None,
    dropout_masks: Optional[Sequence[Tensor]] = None,
    weights: Optional[Mapping[str, Tensor]] = None,
    lengths: Optional[Tensor] = None,
    grad_scale: float = 1.0,
    replay: Replay = "recursion",
    tolerance: float = REPLAY_TOLERANCE,
) -> dict[tuple[int, bool], TimestepGrads]:
    """Exact per-timestep total gradients of every layer and direction of a fused module.

    Layers are processed top down, each layer's input gradient being the direct gradient of the
    layer below (through the dropout mask between them, if any). The states of the layers below
    the top are recomputed with the layer's own kernel unless ``layer_outputs`` gives them.
    Everything runs on the weights' device, in float32 (float64 for float64 weights), under
    ``torch.no_grad()``.

    With ``replay="kernel"`` the kernel runs free from the initial state, so its states can drift
    from those the layer computed where the dynamics amplify rounding (a chaotic layer, a long
    sequence): a layer/direction whose kernel replay differs from the captured states by more
    than ``tolerance`` is computed again by the recursion, which starts every step from the
    captured state (its result says ``replay="recursion"``).

    Args:
        module: the ``nn.RNN``/``nn.LSTM``/``nn.GRU`` whose call is measured.
        inputs: ``(T, B, I)`` the call's input, time-major, padded with zeros.
        initial_states: ``(L * D, B, H_out)`` h_0 of every layer and direction, PyTorch's order.
        initial_cells: ``(L * D, B, H)`` an LSTM's c_0; ``None`` for the other layers.
        output_grad: ``(T, B, D * H_out)`` the gradient that reached the output sequence,
            time-major (zero on padding); ``None``: it got none.
        final_state_grad: ``(L * D, B, H_out)`` the gradient that reached h_n, or ``None``.
        final_cell_grad: ``(L * D, B, H)`` the gradient that reached an LSTM's c_n, or ``None``.
        outputs: ``(T, B, D * H_out)`` the output sequence the call produced, time-major, which
            spares recomputing the top layer.
        layer_outputs: the output sequence of every layer, ``(T, B, D * H_out)`` each, when the
            call ran layer by layer (then nothing is recomputed).
        dropout_masks: the ``L - 1`` inter-layer dropout masks the call applied, ``(T, B, D * H_out)``
            each (scaled: 0 or ``1 / (1 - p)``); layer ``l + 1`` read ``layer_outputs[l] * mask``.
        weights: the weights the kernel ran with, by name (``weight_ih_l0``, ...); default the
            module's own (:func:`kernel_weights`).
        lengths: ``(B,)`` valid steps per sequence (packed input), or ``None``.
        grad_scale: the gradients are divided by it (the AMP loss scale they were taken under).
        replay: ``"recursion"`` or ``"kernel"`` (:func:`backward_through_time`).
        tolerance: the relative state difference up to which a kernel replay is kept.

    Returns:
        ``{(layer, reverse): TimestepGrads}``: one entry per layer and direction (``reverse``
        is ``True`` for the backward direction of a bidirectional layer), entries indexed by
        input position (the reverse direction unflipped), each with its ``residual``.

    Examples:
        >>> gru = nn.GRU(3, 4, num_layers=2, bidirectional=True)
        >>> grads = fused_timestep_grads(gru, torch.randn(5, 2, 3), torch.zeros(4, 2, 4), output_grad=torch.ones(5, 2, 8))
        >>> sorted(grads), tuple(grads[1, True].state.shape)
        ([(0, False), (0, True), (1, False), (1, True)], (5, 2, 4))
    """
    weights = kernel_weights(module) if weights is None else weights
    weight = weights["weight_hh_l0"]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    directions = 2 if module.bidirectional else 1
    width = module.proj_size or module.hidden_size

    def prepared(tensor: Optional[Tensor], scale: float = 1.0) -> Optional[Tensor]:
        if tensor is None:
            return None
        tensor = tensor.to(device=weight.device, dtype=dtype)
        return tensor if scale == 1.0 else tensor / scale

    masks = [prepared(mask) for mask in dropout_masks or ()]
    states = prepared(initial_states)
    cells = prepared(initial_cells)
    layer_inputs = [prepared(inputs)]
    if layer_outputs is not None:
        outputs_by_layer = [prepared(output) for output in layer_outputs]
        layer_inputs += [output * mask for output, mask in zip(outputs_by_layer[:-1], masks)] if masks else outputs_by_layer[:-1]
    else:
        for layer in range(module.num_layers if outputs is None else module.num_layers - 1):
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_cells = None if cells is None else cells[rows]
            layer_inputs.append(_layer_forward(module, weights, layer, layer_inputs[-1], states[rows], layer_cells, lengths))
        outputs_by_layer = layer_inputs[1:] + ([prepared(outputs)] if outputs is not None else [])

    direct = prepared(output_grad, grad_scale)
    if direct is None:
        direct = torch.zeros_like(outputs_by_layer[-1])
    final_states = prepared(final_state_grad, grad_scale)
    final_cells = prepared(final_cell_grad, grad_scale)

    results: dict[tuple[int, bool], TimestepGrads] = {}
    for layer in reversed(range(module.num_layers)):
        below = torch.zeros_like(layer_inputs[layer])
        for direction in range(directions):
            cell_weights = CellWeights.of_layer(weights, layer, bool(direction)).to(dtype)
            columns = slice(direction * width, (direction + 1) * width)
            row = layer * directions + direction
            order = (lambda t: reverse_padded(t, lengths)) if direction else (lambda t: t)
            arguments = (
                cell_type_of(module),
                cell_weights,
                order(layer_inputs[layer]),
                order(outputs_by_layer[layer][..., columns]),
                states[row],
                order(direct[..., columns]),
                None if final_states is None else final_states[row],
                None if cells is None else cells[row],
                None if final_cells is None else final_cells[row],
                lengths,
            )
            grads = backward_through_time(*arguments, replay=replay)
            if grads.replay == "kernel" and not float(grads.residual) <= tolerance:
                grads = backward_through_time(*arguments, replay="recursion")
            unflipped = TimestepGrads(
                order(grads.state),
                None if grads.cell is None else order(grads.cell),
                order(grads.input),
                grads.saturation,
                grads.residual,
                grads.replay,
            )
            results[layer, bool(direction)] = unflipped
            below += unflipped.input
        direct = below * masks[layer - 1] if masks and layer > 0 else below
    return results
