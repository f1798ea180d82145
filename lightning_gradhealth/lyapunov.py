r"""Lyapunov exponents of a recurrent layer's state dynamics, by the QR method.

A recurrent layer maps its state :math:`s_{t-1}` to :math:`s_t` (:math:`s = h` for an RNN or a
GRU, :math:`s = (h, c)` for an LSTM, :math:`h` being the projected state with ``proj_size``).
Along the trajectory the layer actually took on a batch, the state-to-state Jacobians
:math:`J_t = \partial s_t / \partial s_{t-1}` say how a small perturbation of the state grows or
shrinks, and so how far back gradients can reach. The Lyapunov exponents
:math:`\lambda_1 \ge \lambda_2 \ge \dots` are the average logarithmic growth rates per step of the
product :math:`J_T \cdots J_1` (natural log per step): :math:`\lambda_1 > 0` is chaos (perturbations
grow, gradients explode), :math:`\lambda_1 < 0` is contraction (gradients vanish at the rate
:math:`e^{\lambda_1}` per step), and :math:`1 / |\lambda_1|` steps is the horizon over which the
layer keeps, or loses, information (:func:`horizon_steps`).

The product cannot be formed directly: its columns all turn towards the most expanding direction
and overflow. The QR method (Benettin, Galgani, Giorgilli & Strelcyn 1980; used for recurrent
networks by Engelken, Wolf & Abbott 2020, "Lyapunov spectra of chaotic recurrent neural networks")
evolves an orthonormal frame :math:`Q_0` of ``k`` tangent vectors instead, re-orthonormalizing it at
every step:

.. math::
    J_t Q_{t-1} = Q_t R_t, \qquad
    \lambda_i = \frac{1}{T} \sum_{t=1}^{T} \log |(R_t)_{ii}|,

which is exact: :math:`J_T \cdots J_1 Q_0 = Q_T R_T \cdots R_1`, the QR factorization of the
product, without ever forming it. Here :math:`J_t Q_{t-1}` is computed as ``k`` analytic
Jacobian-vector products per sequence (one function per cell type, :data:`JACOBIAN_PRODUCT_BY_CELL_TYPE`),
from the layer's inputs and the states it produced: the gates are recomputed for all steps in batched
matrix products, as :mod:`~lightning_gradhealth.bptt` does, and an LSTM's cells by an
element-wise forward recursion. :func:`finite_time_exponents` runs the QR recursion for any
Jacobian product, :func:`lyapunov_exponents` for one layer/direction, and
:func:`fused_lyapunov_exponents` for every layer and direction of a fused ``nn.RNN``/``nn.LSTM``/``nn.GRU``.

Conventions:

- The initial frame is :func:`initial_frame`: the same fixed orthonormal frame for every sequence,
  drawn once from a seeded generator (never the global RNG), so results are deterministic.
- ``warmup`` steps are discarded: the frame evolves through them (it turns towards the most
  expanding directions), but their :math:`\log |R_{ii}|` are not counted, and the sums are
  divided by the number of counted steps.
- Packed sequences (``lengths``): each sequence counts only its own valid steps; a sequence no
  longer than ``warmup`` has no counted step and is left out of the average.
- Exponents are computed per sequence, then averaged over the batch (by index :math:`i`) and
  sorted descending. The batch is first thinned to at most ``max_sequences`` evenly spaced
  sequences (:func:`sampled_sequences`, default :data:`MAX_SEQUENCES`): each sequence costs ``k``
  Jacobian-vector products per step, ``k`` times what the gradient probe spends on it, and a
  few sequences of a batch already give the batch's average (see ``benchmarks/lyapunov.py``).
- Everything runs under ``torch.no_grad()`` on the weights' device, in float32 (float64 for
  float64 weights).

Examples:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> lstm = torch.nn.LSTM(3, 6, num_layers=2)
    >>> x = torch.randn(40, 2, 3)
    >>> outputs, _ = lstm(x)
    >>> exponents = fused_lyapunov_exponents(lstm, x, torch.zeros(2, 2, 6), torch.zeros(2, 2, 6), outputs=outputs, k=4)
    >>> sorted(exponents), tuple(exponents[1, False].shape)
    ([(0, False), (1, False)], (4,))
    >>> bool((exponents[1, False] < 0).all())                 # a freshly initialized LSTM contracts
    True
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_gradhealth.bptt import CellWeights, _affine, _layer_forward, gate_affine, kernel_weights, reverse_padded
from lightning_gradhealth.layers import cell_type_of

__all__ = [
    "JACOBIAN_PRODUCT_BY_CELL_TYPE",
    "FRAME_SEED",
    "MAX_SEQUENCES",
    "JacobianProduct",
    "finite_time_exponents",
    "fused_lyapunov_exponents",
    "gru_jacobian_product",
    "horizon_steps",
    "initial_frame",
    "lstm_jacobian_product",
    "lyapunov_exponents",
    "rnn_jacobian_product",
    "sampled_sequences",
]

MAX_SEQUENCES = 4
"""Default number of sequences of a batch whose exponents are averaged (:func:`sampled_sequences`).

Each sequence costs ``k`` Jacobian-vector products per step, so ``k = 8`` tangent vectors of one
sequence cost about what the gradient probe spends on 8 sequences. On the reference LSTM
(``nn.LSTM(32, 256)``, T = 100, batch 64, k = 8, 2 CPU threads) 4 sequences take 0.40 of the probe's
replay, 8 sequences 0.56, 16 about 1.15, the whole batch about 3.4; the average over the 4 differs
from the whole batch's by 1.1e-3 (exponents near -0.48). ``benchmarks/lyapunov.py`` measures it."""

FRAME_SEED = 0
"""Seed of the generator that draws :func:`initial_frame`."""

JacobianProduct = Callable[[int, Tensor], Tensor]
"""``product(t, frame)``: the ``(B, k, D)`` tangent vectors ``frame`` (rows) mapped by
:math:`J_t`, i.e. ``frame @ J_t.mT`` per sequence; ``t`` counts steps in the layer's reading order."""


def _check_arguments(k: int, warmup: int, steps: int) -> None:
    """Raise a ``ValueError`` for ``k < 1``, ``warmup < 0`` or ``warmup >= steps``."""
    if k < 1:
        raise ValueError(f"k must be at least 1 (the number of exponents), got {k}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more steps, got {warmup}")
    if warmup >= steps:
        raise ValueError(f"warmup ({warmup}) must be smaller than the number of steps ({steps}): no step would be counted")


def initial_frame(dimension: int, k: int, *, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""The fixed ``(k, dimension)`` orthonormal frame (rows) the tangent vectors start from.

    The Q factor of a ``(dimension, k)`` standard normal matrix drawn in float64 on the CPU from a
    generator seeded with :data:`FRAME_SEED` (the global RNG is left alone), then moved to
    ``device`` and ``dtype``: the same frame on every device and every call. A random frame is
    generic: unlike the first columns of the identity, it is not orthogonal to the expanding
    directions of a structured weight matrix (a permutation, a block-diagonal matrix).

    Examples:
        >>> frame = initial_frame(5, 3)
        >>> tuple(frame.shape), torch.allclose(frame @ frame.T, torch.eye(3), atol=1e-6)
        ((3, 5), True)
        >>> torch.equal(frame, initial_frame(5, 3))
        True
    """
    generator = torch.Generator().manual_seed(FRAME_SEED)
    columns, _ = torch.linalg.qr(torch.randn(dimension, k, generator=generator, dtype=torch.float64))
    return columns.T.to(device=device, dtype=dtype)


def sampled_sequences(batch: int, max_sequences: Optional[int], device: Optional[torch.device] = None) -> Tensor:
    """Indices of at most ``max_sequences`` evenly spaced sequences of a batch of ``batch``
    (``i * batch // max_sequences``), all of them when ``max_sequences`` is ``None`` or not smaller.

    Examples:
        >>> sampled_sequences(64, 8)
        tensor([ 0,  8, 16, 24, 32, 40, 48, 56])
        >>> sampled_sequences(3, 8)
        tensor([0, 1, 2])
    """
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be at least 1 or None, got {max_sequences}")
    if max_sequences is None or max_sequences >= batch:
        return torch.arange(batch, device=device)
    return torch.arange(max_sequences, device=device) * batch // max_sequences


def _previous_states(states: Tensor, initial_state: Tensor) -> Tensor:
    """``(T, B, H)``: the state before each step, the initial state first."""
    return torch.cat([initial_state[None], states[:-1]])


@torch.no_grad()
def rnn_jacobian_product(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    *,
    nonlinearity: Literal["tanh", "relu"] = "tanh",
) -> JacobianProduct:
    r"""Jacobian-vector products of an Elman RNN, :math:`h_t = \phi(a_t)`,
    :math:`a_t = W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}`:

    .. math::
        J_t = \frac{\partial h_t}{\partial h_{t-1}} = \operatorname{diag}(\phi'(a_t))\, W_{hh},

    with :math:`\phi'(a_t) = 1 - h_t^2` (tanh) or :math:`[a_t > 0] = [h_t > 0]` (ReLU): read
    from the states alone.

    Args:
        weights: the layer/direction's weights.
        inputs: ``(T, B, I)`` the layer's input in its reading order (not read here: the
            derivative comes from the states; the other cells need it).
        states: ``(T, B, H)`` the states :math:`h_t` it produced.
        initial_state: ``(B, H)`` :math:`h_{-1}`.
        nonlinearity: ``"tanh"`` or ``"relu"``, as the layer's.

    Returns:
        A :data:`JacobianProduct` on ``(B, k, H)`` frames.

    Raises:
        ValueError: another ``nonlinearity``.

    Examples:
        >>> rnn = torch.nn.RNN(2, 3)
        >>> x, h0 = torch.randn(4, 1, 2), torch.randn(1, 1, 3)
        >>> states, _ = rnn(x, h0)
        >>> weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0).to(torch.float32)
        >>> product = rnn_jacobian_product(weights, x, states.detach(), h0[0])
        >>> jacobian = torch.autograd.functional.jacobian(lambda h: rnn(x[:1], h.view(1, 1, 3))[0].flatten(), h0.flatten())
        >>> torch.allclose(product(0, torch.eye(3)[None])[0], jacobian.T, atol=1e-6)   # rows: e_j -> J_0 e_j
        True
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; expected 'tanh' or 'relu'")
    derivative = 1 - states * states if nonlinearity == "tanh" else (states > 0).to(states.dtype)
    recurrent = weights.w_hh.T

    def product(t: int, frame: Tensor) -> Tensor:
        return (frame @ recurrent).mul_(derivative[t].unsqueeze(1))

    return product


@torch.no_grad()
def gru_jacobian_product(weights: CellWeights, inputs: Tensor, states: Tensor, initial_state: Tensor) -> JacobianProduct:
    r"""Jacobian-vector products of a GRU, :math:`h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}` with
    :math:`r_t = \sigma(a^r_t)`, :math:`z_t = \sigma(a^z_t)`,
    :math:`n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W^n_{hh} h_{t-1} + b^n_{hh}))`:

    .. math::
        J_t = \operatorname{diag}(z_t) + \operatorname{diag}(\rho_t) W^r_{hh}
            + \operatorname{diag}(\zeta_t) W^z_{hh} + \operatorname{diag}(\nu_t \odot r_t) W^n_{hh},

    where :math:`W^{r,z,n}_{hh}` are the gate blocks of :math:`W_{hh}`,
    :math:`\nu_t = (1 - z_t)(1 - n_t^2)`, :math:`\rho_t = \nu_t \odot (W^n_{hh} h_{t-1} + b^n_{hh}) \odot r_t (1 - r_t)`
    and :math:`\zeta_t = (h_{t-1} - n_t) \odot z_t (1 - z_t)`.

    Args:
        weights, states, initial_state: as in :func:`rnn_jacobian_product`.
        inputs: ``(T, B, I)`` the layer's input in its reading order.

    Returns:
        A :data:`JacobianProduct` on ``(B, k, H)`` frames.

    Examples:
        >>> gru = torch.nn.GRU(2, 3)
        >>> x, h0 = torch.randn(4, 1, 2), torch.randn(1, 1, 3)
        >>> states, _ = gru(x, h0)
        >>> weights = CellWeights(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0).to(torch.float32)
        >>> product = gru_jacobian_product(weights, x, states.detach(), h0[0])
        >>> jacobian = torch.autograd.functional.jacobian(lambda h: gru(x[:1], h.view(1, 1, 3))[0].flatten(), h0.flatten())
        >>> torch.allclose(product(0, torch.eye(3)[None])[0], jacobian.T, atol=1e-6)
        True
    """
    previous = _previous_states(states, initial_state)
    input_r, input_z, input_n = _affine(inputs, weights.w_ih, weights.b_ih).chunk(3, dim=-1)
    hidden_r, hidden_z, hidden_n = _affine(previous, weights.w_hh, weights.b_hh).chunk(3, dim=-1)
    reset, update = torch.sigmoid(input_r + hidden_r), torch.sigmoid(input_z + hidden_z)
    candidate = torch.tanh(input_n + reset * hidden_n)
    to_candidate = (1 - update) * (1 - candidate * candidate)
    to_reset = to_candidate * hidden_n * reset * (1 - reset)
    to_update = (previous - candidate) * update * (1 - update)
    gate_factors = torch.stack([to_reset, to_update, to_candidate * reset], dim=-2)  # (T, B, 3, H)
    recurrent = weights.w_hh.T

    def product(t: int, frame: Tensor) -> Tensor:
        through_gates = (frame @ recurrent).unflatten(-1, (3, -1)).mul_(gate_factors[t].unsqueeze(1)).sum(-2)
        return torch.addcmul(through_gates, update[t].unsqueeze(1), frame)

    return product


@torch.no_grad()
def lstm_jacobian_product(
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    *,
    initial_cell: Tensor,
) -> JacobianProduct:
    r"""Jacobian-vector products of an LSTM on its state :math:`s_t = (h_t, c_t)`, with
    :math:`c_t = f_t \odot c_{t-1} + i_t \odot g_t`, :math:`\tilde h_t = o_t \odot \tanh c_t`,
    :math:`h_t = W_{hr} \tilde h_t` with ``proj_size`` (else :math:`h_t = \tilde h_t`), gates
    :math:`i, f, o = \sigma(a^{i,f,o}_t)`, :math:`g_t = \tanh(a^g_t)`:

    .. math::
        J_t = \begin{pmatrix} W_{hr} (D^c_t C_t + D^o_t W^o_{hh}) & W_{hr} D^c_t \operatorname{diag}(f_t) \\
                              C_t & \operatorname{diag}(f_t) \end{pmatrix},
        \qquad
        C_t = \frac{\partial c_t}{\partial h_{t-1}} = D^i_t W^i_{hh} + D^f_t W^f_{hh} + D^g_t W^g_{hh},

    where :math:`W^{i,f,g,o}_{hh}` are the gate blocks of :math:`W_{hh}`, and the diagonal factors
    are :math:`D^i_t = i_t (1 - i_t) g_t`, :math:`D^f_t = f_t (1 - f_t) c_{t-1}`,
    :math:`D^g_t = i_t (1 - g_t^2)`, :math:`D^o_t = o_t (1 - o_t) \tanh c_t` and
    :math:`D^c_t = o_t (1 - \tanh^2 c_t)`. The cells :math:`c_t` come from the element-wise
    forward recursion over the recomputed gates.

    Args:
        weights, inputs, states, initial_state: as in :func:`gru_jacobian_product`; ``states``
            are the (projected) outputs :math:`h_t`, ``(T, B, H_out)``.
        initial_cell: ``(B, H)`` :math:`c_{-1}`.

    Returns:
        A :data:`JacobianProduct` on ``(B, k, H_out + H)`` frames, :math:`h` coordinates first.

    Examples:
        >>> lstm = torch.nn.LSTM(2, 3, proj_size=2)
        >>> x, h0, c0 = torch.randn(4, 1, 2), torch.randn(1, 1, 2), torch.randn(1, 1, 3)
        >>> states, _ = lstm(x, (h0, c0))
        >>> weights = CellWeights(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0, lstm.weight_hr_l0)
        >>> product = lstm_jacobian_product(weights.to(torch.float32), x, states.detach(), h0[0], initial_cell=c0[0])
        >>> def step(s):
        ...     _, (h, c) = lstm(x[:1], (s[:2].view(1, 1, 2), s[2:].view(1, 1, 3)))
        ...     return torch.cat([h.flatten(), c.flatten()])
        >>> jacobian = torch.autograd.functional.jacobian(step, torch.cat([h0.flatten(), c0.flatten()]))
        >>> torch.allclose(product(0, torch.eye(5)[None])[0], jacobian.T, atol=1e-6)
        True
    """
    width = states.shape[-1]
    gates = gate_affine(weights, inputs, _previous_states(states, initial_state)).unflatten(-1, (4, -1))
    gate_input, gate_forget = torch.sigmoid(gates[..., 0, :]), torch.sigmoid(gates[..., 1, :])
    gate_cell, gate_output = torch.tanh(gates[..., 2, :]), torch.sigmoid(gates[..., 3, :])
    cells = torch.empty_like(gate_cell)
    cell_inputs = gate_input * gate_cell
    cell = initial_cell
    for t in range(inputs.shape[0]):
        cell = torch.addcmul(cell_inputs[t], gate_forget[t], cell, out=cells[t])
    tanh_cells = cells.tanh()
    previous_cells = torch.cat([initial_cell[None], cells[:-1]])
    output_to_cell = gate_output * (1 - tanh_cells * tanh_cells)
    gate_factors = torch.stack(
        [
            gate_input * (1 - gate_input) * gate_cell,
            gate_forget * (1 - gate_forget) * previous_cells,
            gate_input * (1 - gate_cell * gate_cell),
            gate_output * (1 - gate_output) * tanh_cells,
        ],
        dim=-2,
    )  # (T, B, 4, H)
    recurrent = weights.w_hh.T
    projection = None if weights.w_hr is None else weights.w_hr.T

    def product(t: int, frame: Tensor) -> Tensor:
        state_part, cell_part = frame[..., :width], frame[..., width:]
        through_gate = (state_part @ recurrent).unflatten(-1, (4, -1)).mul_(gate_factors[t].unsqueeze(1)).unbind(-2)
        mapped = torch.empty_like(frame)
        new_cell = torch.add(through_gate[0], through_gate[1], out=mapped[..., width:]).add_(through_gate[2])
        new_cell.addcmul_(gate_forget[t].unsqueeze(1), cell_part)
        if projection is None:
            torch.addcmul(through_gate[3], output_to_cell[t].unsqueeze(1), new_cell, out=mapped[..., :width])
        else:
            mapped[..., :width] = torch.addcmul(through_gate[3], output_to_cell[t].unsqueeze(1), new_cell) @ projection
        return mapped

    return product


JACOBIAN_PRODUCT_BY_CELL_TYPE: dict[str, Callable[..., JacobianProduct]] = {
    "rnn_tanh": partial(rnn_jacobian_product, nonlinearity="tanh"),
    "rnn_relu": partial(rnn_jacobian_product, nonlinearity="relu"),
    "gru": gru_jacobian_product,
    "lstm": lstm_jacobian_product,
}
"""The Jacobian product of each cell type (:func:`~lightning_gradhealth.layers.cell_type_of`); each
takes ``(weights, inputs, states, initial_state)``, the LSTM's also ``initial_cell=``."""


@torch.no_grad()
def finite_time_exponents(
    jacobian_product: JacobianProduct,
    frame: Tensor,
    steps: int,
    *,
    lengths: Optional[Tensor] = None,
    warmup: int = 0,
) -> Tensor:
    r"""Per-sequence finite-time Lyapunov exponents by the QR method, in the frame's order.

    For :math:`t = 0, \dots, T - 1`: :math:`J_t Q_{t-1} = Q_t R_t` (Householder QR), and

    .. math::
        \lambda_i = \frac{1}{T_b - w} \sum_{t = w}^{T_b - 1} \log |(R_t)_{ii}|,

    with :math:`T_b` the sequence's length and :math:`w` = ``warmup``: steps past a sequence's
    length are not counted. Entry :math:`i` is the exponent of the :math:`i`-th vector of the
    frame (not sorted): the growth rate of the volume the first :math:`i` vectors span, over that
    of the first :math:`i - 1`.

    Args:
        jacobian_product: maps ``(B, k, D)`` tangent vectors (rows) through :math:`J_t`
            (a :data:`JacobianProduct`).
        frame: ``(B, k, D)`` orthonormal rows :math:`Q_{-1}^\top`.
        steps: :math:`T`, the number of steps.
        lengths: ``(B,)`` valid steps per sequence, or ``None`` (all ``steps``).
        warmup: :math:`w`, leading steps through which the frame evolves without being counted.

    Returns:
        ``(B, k)`` exponents, natural log per step; NaN for a sequence no longer than ``warmup``.
        A direction mapped exactly to zero (a dead ReLU layer) gives :math:`-\infty`.

    Raises:
        ValueError: no tangent vector, ``warmup`` negative or not smaller than ``steps``.

    Examples:
        >>> jacobian = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
        >>> exponents = finite_time_exponents(lambda t, frame: frame @ jacobian.T, initial_frame(2, 2)[None], 200)
        >>> torch.allclose(exponents, torch.tensor([[math.log(2.0), math.log(0.5)]]), atol=0.02)
        True
    """
    _check_arguments(frame.shape[1], warmup, steps)
    batch = frame.shape[0]
    log_growth = frame.new_zeros(batch, frame.shape[1])
    valid = None
    if lengths is not None:
        lengths = lengths.to(frame.device)
        valid = torch.arange(steps, device=frame.device)[:, None] < lengths[None, :]
    for t in range(steps):
        orthonormal, triangular = torch.linalg.qr(jacobian_product(t, frame).mT)
        frame = orthonormal.mT  # past a sequence's length, its frame evolves on padding but is not counted
        if t >= warmup:
            growth = triangular.diagonal(dim1=-2, dim2=-1).abs().log()
            log_growth += growth if valid is None else torch.where(valid[t, :, None], growth, 0.0)
    counted = torch.full((batch,), steps - warmup, device=frame.device) if lengths is None else (lengths - warmup).clamp(min=0)
    return log_growth / counted[:, None]


@torch.no_grad()
def lyapunov_exponents(
    cell_type: str,
    weights: CellWeights,
    inputs: Tensor,
    states: Tensor,
    initial_state: Tensor,
    *,
    initial_cell: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    k: int = 8,
    warmup: int = 0,
    max_sequences: Optional[int] = MAX_SEQUENCES,
) -> Tensor:
    r"""The top-``k`` Lyapunov exponents of one recurrent layer/direction on a batch.

    Recomputes the layer's gates from its inputs and states, runs the QR method
    (:func:`finite_time_exponents`) from :func:`initial_frame` with the cell's Jacobian product
    (:data:`JACOBIAN_PRODUCT_BY_CELL_TYPE`) on each sampled sequence, averages the exponents over
    the sequences that have a counted step, and sorts them descending. Runs on the weights'
    device in float32 (float64 for float64 weights).

    Args:
        cell_type: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        weights: the layer/direction's weights.
        inputs: ``(T, B, I)`` the layer's input, time-major, in the direction's reading order.
        states: ``(T, B, H_out)`` the states :math:`h_t` it produced (its output sequence).
        initial_state: ``(B, H_out)`` :math:`h_{-1}`.
        initial_cell: ``(B, H)`` :math:`c_{-1}`, LSTM only (required there).
        lengths: ``(B,)`` valid steps per sequence (packed input), or ``None``.
        k: how many exponents; ``min(k, D)`` come back, ``D`` being the state's dimension
            (``H``; ``H_out + H`` for an LSTM).
        warmup: leading steps of each sequence whose growth is not counted.
        max_sequences: average over at most this many evenly spaced sequences of the batch
            (:func:`sampled_sequences`); ``None``: all of them.

    Returns:
        ``(min(k, D),)`` exponents, sorted descending, natural log per step; NaN when a sampled
        sequence's states are not finite.

    Raises:
        ValueError: an unknown ``cell_type``, ``k < 1``, ``warmup`` negative or not smaller than
            ``T``, no sequence longer than ``warmup``, or ``max_sequences < 1``.
        TypeError: an LSTM without ``initial_cell``, or ``initial_cell`` for another cell type.

    Examples:
        >>> rnn = torch.nn.RNN(2, 4, bias=False)
        >>> with torch.no_grad():
        ...     _ = rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(4, 4))[0])   # orthogonal
        ...     _ = rnn.weight_ih_l0.zero_()
        >>> x, h0 = torch.zeros(30, 3, 2), 1e-4 * torch.randn(3, 4)    # tanh stays linear near 0
        >>> states, _ = rnn(x, h0[None])
        >>> weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0).to(torch.float32)
        >>> lyapunov_exponents("rnn_tanh", weights, x, states.detach(), h0, k=2).abs().max() < 1e-5
        tensor(True)
    """
    make_product = JACOBIAN_PRODUCT_BY_CELL_TYPE.get(cell_type)
    if make_product is None:
        expected = ", ".join(map(repr, JACOBIAN_PRODUCT_BY_CELL_TYPE))
        raise ValueError(f"unknown cell type {cell_type!r}; expected one of {expected}")
    if (cell_type == "lstm") != (initial_cell is not None):
        raise TypeError("initial_cell is required for an LSTM and accepted only there")
    _check_arguments(k, warmup, inputs.shape[0])
    device = weights.w_hh.device
    dtype = torch.promote_types(weights.w_hh.dtype, torch.float32)
    index = sampled_sequences(inputs.shape[1], max_sequences, device)

    def prepared(tensor: Tensor, batch_dim: int) -> Tensor:
        return tensor.to(device=device, dtype=dtype).index_select(batch_dim, index)

    sampled_lengths = None if lengths is None else lengths.to(device).index_select(0, index)
    counted = None if sampled_lengths is None else sampled_lengths > warmup
    if counted is not None and not bool(counted.any()):
        raise ValueError(f"no sampled sequence is longer than warmup ({warmup}): no step would be counted")
    cell_state = {} if initial_cell is None else {"initial_cell": prepared(initial_cell, 0)}
    product = make_product(weights.to(dtype), prepared(inputs, 1), prepared(states, 1), prepared(initial_state, 0), **cell_state)
    dimension = states.shape[-1] + (0 if initial_cell is None else initial_cell.shape[-1])
    frame = initial_frame(dimension, min(k, dimension), device=device, dtype=dtype).expand(len(index), -1, -1)
    per_sequence = finite_time_exponents(product, frame, inputs.shape[0], lengths=sampled_lengths, warmup=warmup)
    return (per_sequence if counted is None else per_sequence[counted]).mean(0).sort(descending=True).values


@torch.no_grad()
def fused_lyapunov_exponents(
    module: nn.RNNBase,
    inputs: Tensor,
    initial_states: Tensor,
    initial_cells: Optional[Tensor] = None,
    *,
    outputs: Optional[Tensor] = None,
    layer_outputs: Optional[Sequence[Tensor]] = None,
    dropout_masks: Optional[Sequence[Tensor]] = None,
    weights: Optional[Mapping[str, Tensor]] = None,
    lengths: Optional[Tensor] = None,
    k: int = 8,
    warmup: int = 0,
    max_sequences: Optional[int] = MAX_SEQUENCES,
) -> dict[tuple[int, bool], Tensor]:
    """The top-``k`` Lyapunov exponents of every layer and direction of a fused module.

    The batch is sampled first (:func:`sampled_sequences`), then each layer's input and states are
    those the call ran on: ``layer_outputs`` when given, else the lower layers are recomputed with
    the layer's own kernel (through the inter-layer ``dropout_masks``), the top layer's states
    being ``outputs`` when given. The backward direction of a bidirectional layer reads its input
    reversed (within each sequence's length); its exponents are those of that reading order.
    Arguments as in :func:`lightning_gradhealth.bptt.fused_timestep_grads`.

    Args:
        module: the ``nn.RNN``/``nn.LSTM``/``nn.GRU`` whose call is measured.
        inputs: ``(T, B, I)`` the call's input, time-major, padded with zeros.
        initial_states: ``(L * D, B, H_out)`` h_0 of every layer and direction, PyTorch's order.
        initial_cells: ``(L * D, B, H)`` an LSTM's c_0; ``None`` for the other layers.
        outputs: ``(T, B, D * H_out)`` the output sequence the call produced, time-major.
        layer_outputs: the output sequence of every layer, ``(T, B, D * H_out)`` each.
        dropout_masks: the ``L - 1`` inter-layer dropout masks the call applied (scaled).
        weights: the weights the kernel ran with, by name; default the module's own.
        lengths: ``(B,)`` valid steps per sequence (packed input; on the CPU, as
            ``pack_padded_sequence`` wants them when lower layers are recomputed), or ``None``.
        k, warmup, max_sequences: as in :func:`lyapunov_exponents`.

    Returns:
        ``{(layer, reverse): exponents}``, each ``(min(k, D),)`` sorted descending.

    Raises:
        ValueError: as :func:`lyapunov_exponents`.

    Examples:
        >>> gru = nn.GRU(3, 4, num_layers=2, bidirectional=True)
        >>> exponents = fused_lyapunov_exponents(gru, torch.randn(20, 2, 3), torch.zeros(4, 2, 4), k=3, warmup=5)
        >>> sorted(exponents), tuple(exponents[1, True].shape)
        ([(0, False), (0, True), (1, False), (1, True)], (3,))
    """
    _check_arguments(k, warmup, inputs.shape[0])
    weights = kernel_weights(module) if weights is None else weights
    weight = weights["weight_hh_l0"]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    directions = 2 if module.bidirectional else 1
    width = module.proj_size or module.hidden_size
    index = sampled_sequences(inputs.shape[1], max_sequences, weight.device)

    def prepared(tensor: Optional[Tensor], batch_dim: int = 1) -> Optional[Tensor]:
        if tensor is None:
            return None
        return tensor.to(device=weight.device, dtype=dtype).index_select(batch_dim, index)

    lengths = None if lengths is None else lengths.index_select(0, index.to(lengths.device))
    masks = [prepared(mask) for mask in dropout_masks or ()]
    states = prepared(initial_states)
    cells = prepared(initial_cells)
    layer_inputs = [prepared(inputs)]
    if layer_outputs is not None:
        outputs_by_layer = [prepared(output) for output in layer_outputs]
        layer_inputs += [output * mask for output, mask in zip(outputs_by_layer[:-1], masks)] if masks else outputs_by_layer[:-1]
    else:
        outputs_by_layer = []
        for layer in range(module.num_layers if outputs is None else module.num_layers - 1):
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_cells = None if cells is None else cells[rows]
            outputs_by_layer.append(_layer_forward(module, weights, layer, layer_inputs[-1], states[rows], layer_cells, lengths))
            layer_inputs.append(outputs_by_layer[-1] * masks[layer] if layer < len(masks) else outputs_by_layer[-1])
        outputs_by_layer += [prepared(outputs)] if outputs is not None else []

    results: dict[tuple[int, bool], Tensor] = {}
    for layer in range(module.num_layers):
        for direction in range(directions):
            cell_weights = CellWeights.of_layer(weights, layer, bool(direction)).to(dtype)
            columns = slice(direction * width, (direction + 1) * width)
            row = layer * directions + direction
            order = (lambda t: reverse_padded(t, lengths)) if direction else (lambda t: t)
            results[layer, bool(direction)] = lyapunov_exponents(
                cell_type_of(module),
                cell_weights,
                order(layer_inputs[layer]),
                order(outputs_by_layer[layer][..., columns]),
                states[row],
                initial_cell=None if cells is None else cells[row],
                lengths=lengths,
                k=k,
                warmup=warmup,
                max_sequences=None,
            )
    return results


def horizon_steps(exponents: Tensor) -> float:
    r"""The horizon implied by the top exponent, :math:`1 / |\lambda_1|` steps.

    The number of steps over which a perturbation of the state, or a gradient through time,
    changes by a factor :math:`e`: it decays for :math:`\lambda_1 < 0` (the memory of the layer),
    grows for :math:`\lambda_1 > 0` (the predictability horizon of chaotic dynamics).
    ``inf`` for :math:`\lambda_1 = 0` (marginal stability).

    Examples:
        >>> horizon_steps(torch.tensor([-0.25, -0.9]))
        4.0
        >>> horizon_steps(torch.tensor([0.0]))
        inf
    """
    top = abs(float(exponents[0]))
    return math.inf if top == 0 else 1.0 / top
