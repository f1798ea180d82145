"""Lyapunov exponents (lightning_gradhealth/lyapunov.py) against independent references.

- Linear maps, where the exponents are known in closed form: log |eigenvalues| of W, 0 for an
  orthogonal W and for an identity ReLU network (IRNN) that stays in its linear region.
- Small layers: the finite-time exponents equal those of the explicit product of the per-step
  Jacobians, each taken by autograd (``torch.func.jacrev``) of the hand-written cell step of
  tests/reference_rnn.py along the hand-unrolled trajectory, whose QR gives the exponents directly.
- The transition to chaos of random tanh networks (Sompolinsky, Crisanti & Sommers 1988).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_gradhealth.bptt import CellWeights
from lightning_gradhealth.lyapunov import (
    finite_time_exponents,
    fused_lyapunov_exponents,
    initial_frame,
    lyapunov_exponents,
)
from reference_rnn import cell_step, unrolled


def _active_relu_rnn(**kwargs) -> nn.RNN:
    """A ReLU RNN whose units are mostly active (input bias + 1, recurrent weights halved). Too many
    dead units make the product of the J_t of rank below k: its exponents are then -inf, which the
    QR method gives, but the QR of the explicit product gives a large finite number."""
    rnn = nn.RNN(4, 5, nonlinearity="relu", **kwargs)
    with torch.no_grad():
        for name, parameter in rnn.named_parameters():
            if name.startswith("bias_ih"):
                parameter.add_(1.0)
            elif name.startswith("weight_hh"):
                parameter.mul_(0.5)
    return rnn


LAYERS = {
    "rnn_tanh": lambda **kw: nn.RNN(4, 5, **kw),
    "rnn_relu": _active_relu_rnn,
    "lstm": lambda **kw: nn.LSTM(4, 5, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(4, 5, proj_size=3, **kw),
    "gru": lambda **kw: nn.GRU(4, 5, **kw),
}
CELL_TYPE = {"rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm", "lstm_proj": "lstm", "gru": "gru"}


def _growth(product: Tensor, frame: Tensor) -> Tensor:
    """log |diag R| of the QR factorization of ``product @ frame.T``."""
    return torch.linalg.qr(product @ frame.T)[1].diagonal().abs().log()


def _reference_layer_exponents(
    module, cell_type, key, layer_inputs, states, cells, h0, c0, lengths, k, warmup
) -> tuple[Tensor, Tensor]:
    """Exponents of one layer/direction from the explicit product of autograd Jacobians, per sequence,
    averaged over the sequences longer than ``warmup`` and sorted; and the volume growth rate
    ``sum_t log |det J_t| / T`` (counted steps, averaged alike), the sum of all D exponents."""
    reverse = key.endswith("_reverse")
    width = h0.shape[-1]
    per_sequence, volume_rates = [], []
    for b in range(h0.shape[0]):
        length = int(lengths[b])
        if length <= warmup:
            continue
        positions = list(reversed(range(length))) if reverse else list(range(length))
        h, c = h0[b], None if c0 is None else c0[b]
        state = h if c is None else torch.cat([h, c])
        product = torch.eye(state.shape[0], dtype=state.dtype)
        warmup_product, log_volume = product, 0.0
        for step, position in enumerate(positions):
            x = layer_inputs[position][b]

            def cell(state: Tensor, x: Tensor = x) -> Tensor:
                h, c = (state, None) if c0 is None else (state[:width], state[width:])
                new_h, new_c = cell_step(cell_type, module, f"_{key}", x[None], h[None], None if c is None else c[None],
                                         torch.ones(1, 1, dtype=torch.bool))
                return new_h[0] if new_c is None else torch.cat([new_h[0], new_c[0]])

            jacobian = torch.func.jacrev(cell)(state).detach()
            product = jacobian @ product
            if step >= warmup:
                log_volume += torch.linalg.slogdet(jacobian).logabsdet
            if step == warmup - 1:
                warmup_product = product
            h = states[position][b]
            state = h if c0 is None else torch.cat([h, cells[position][b]])
        frame = initial_frame(product.shape[0], min(k, product.shape[0]), dtype=product.dtype)
        per_sequence.append((_growth(product, frame) - _growth(warmup_product, frame)) / (length - warmup))
        volume_rates.append(log_volume / (length - warmup))
    return torch.stack(per_sequence).mean(0).sort(descending=True).values, torch.stack(volume_rates).mean()


def _check_against_reference(name: str, *, num_layers=2, bidirectional=True, packed=True, warmup=3, k=4,
                             dtype=torch.float64, atol=1e-5, dropout=False, compared=4):
    """``fused_lyapunov_exponents`` against the reference on every layer and direction: the top
    ``compared`` exponents against the explicit product (whose QR loses the directions it shrinks
    by more than 1 / eps relative to the top one), and, when ``k`` covers the whole state, their
    sum against the volume growth rate."""
    torch.manual_seed(0)
    module = LAYERS[name](num_layers=num_layers, bidirectional=bidirectional).to(dtype)
    cell_type = CELL_TYPE[name]
    steps, batch, directions = 7, 3, 2 if bidirectional else 1
    width = module.proj_size if isinstance(module, nn.LSTM) and module.proj_size else 5
    x = torch.randn(steps, batch, 4, dtype=dtype)
    lengths = torch.tensor([7, 3, 5]) if packed else torch.full((batch,), steps)
    h0 = torch.randn(num_layers * directions, batch, width, dtype=dtype)
    c0 = torch.randn(num_layers * directions, batch, 5, dtype=dtype) if cell_type == "lstm" else None
    masks = [(torch.rand(steps, batch, directions * width) > 0.3).to(dtype) / 0.7 for _ in range(num_layers - 1)]

    _, _, _, states, cells = unrolled(module, cell_type, x, h0, c0, lengths, masks if dropout else None)
    states = {key: torch.stack(values).detach() for key, values in states.items()}
    cells = {key: torch.stack(values).detach() for key, values in cells.items() if values[0] is not None}
    valid = (torch.arange(steps)[:, None] < lengths[None])[..., None]
    layer_outputs = [torch.cat([states[f"l{layer}" + s] for s in ("", "_reverse")[:directions]], -1) * valid
                     for layer in range(num_layers)]

    if dropout:  # the call ran layer by layer, its outputs and masks captured
        computed = fused_lyapunov_exponents(module, x, h0, c0, layer_outputs=layer_outputs, dropout_masks=masks,
                                            lengths=lengths if packed else None, k=k, warmup=warmup, max_sequences=None)
    else:  # the fused call itself: the lower layers are recomputed from its input and initial states
        call_input = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        with torch.no_grad():
            output, _ = module(call_input, h0 if c0 is None else (h0, c0))
        output = pad_packed_sequence(output, total_length=steps)[0] if packed else output
        torch.testing.assert_close(output, layer_outputs[-1])  # the reference is the same network
        computed = fused_lyapunov_exponents(module, x, h0, c0, outputs=output, lengths=lengths if packed else None,
                                            k=k, warmup=warmup, max_sequences=None)

    reference_module = copy.deepcopy(module).double()
    dimension = width + (5 if c0 is not None else 0)
    keys = [f"l{layer}" + s for layer in range(num_layers) for s in ("", "_reverse")[:directions]]
    assert sorted(computed) == sorted((int(key[1]), key.endswith("_reverse")) for key in keys)
    for row, key in enumerate(keys):
        layer = int(key[1])
        layer_input = x if layer == 0 else layer_outputs[layer - 1] * (masks[layer - 1] if dropout else 1)
        reference, volume_rate = _reference_layer_exponents(
            reference_module, cell_type, key, layer_input.double(), states[key].double(),
            cells[key].double() if key in cells else None, h0[row].double(), None if c0 is None else c0[row].double(),
            lengths, k, warmup,
        )
        result = computed[layer, key.endswith("_reverse")]
        assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        message = lambda text: f"{key}: {text}"  # noqa: E731
        torch.testing.assert_close(result[:compared].double(), reference[:compared], atol=atol, rtol=0, msg=message)
        assert len(result) == min(k, dimension)
        if k >= dimension:
            torch.testing.assert_close(result.sum().double(), volume_rate, atol=atol * len(result), rtol=0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_bidirectional_packed_matches_product_of_jacobians(name):
    # the ReLU layers keep at least 3 of their 5 units active at every step (see _active_relu_rnn)
    _check_against_reference(name, k=3 if name == "rnn_relu" else 4)


@pytest.mark.parametrize("name", list(LAYERS))
def test_single_layer_matches_product_of_jacobians(name):
    _check_against_reference(name, num_layers=1, bidirectional=False, packed=False, warmup=0, k=10, compared=3)


def test_layer_outputs_and_dropout_masks():
    _check_against_reference("lstm_proj", dropout=True, warmup=1)


def test_float32_is_exact_to_float_precision():
    _check_against_reference("lstm", dtype=torch.float32, atol=1e-4)


def test_linear_map_gives_log_moduli_of_eigenvalues():
    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.tensor([1.2, -0.9, 0.7, -0.5, 0.3, 0.1], dtype=torch.float64)
    basis = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=generator, dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ torch.linalg.inv(basis)
    expected = torch.from_numpy(np.sort(np.log(np.abs(np.linalg.eigvals(matrix.numpy()))))[::-1].copy())

    def product(t: int, frame: Tensor) -> Tensor:
        return frame @ matrix.T

    frame = initial_frame(6, 6, dtype=torch.float64).expand(2, -1, -1)
    long_run = finite_time_exponents(product, frame, 1000)
    torch.testing.assert_close(long_run[0], expected, atol=5e-3, rtol=0)  # transients fade as 1/T
    # once the frame is aligned with the Schur vectors, each step's R has exactly the eigenvalues on its diagonal
    aligned = finite_time_exponents(product, frame, 200, warmup=100)
    torch.testing.assert_close(aligned, expected.expand(2, -1), atol=1e-9, rtol=0)
    top3 = finite_time_exponents(product, frame[:, :3], 200, warmup=100)
    torch.testing.assert_close(top3[0], expected[:3], atol=1e-9, rtol=0)


def test_orthogonal_linear_map_gives_zero_exponents():
    generator = torch.Generator().manual_seed(0)
    orthogonal = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))[0]
    exponents = finite_time_exponents(lambda t, frame: frame @ orthogonal.T, initial_frame(7, 7, dtype=torch.float64)[None], 50)
    assert exponents.abs().max() < 1e-12


def test_irnn_in_its_linear_region_has_zero_exponents():
    irnn = nn.RNN(3, 6, nonlinearity="relu", bias=False)
    with torch.no_grad():
        irnn.weight_hh_l0.copy_(torch.eye(6))
        irnn.weight_ih_l0.abs_()
    x, h0 = torch.rand(40, 2, 3) + 0.1, torch.rand(1, 2, 6)  # positive inputs and states: ReLU is the identity
    with torch.no_grad():
        states, _ = irnn(x, h0)
    weights = CellWeights(irnn.weight_ih_l0, irnn.weight_hh_l0)
    exponents = lyapunov_exponents("rnn_relu", weights, x, states, h0[0], k=6)
    assert exponents.shape == (6,)
    assert exponents.abs().max() < 1e-6


def _random_tanh_exponents(gain: float, hidden: int = 200) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    rnn = nn.RNN(1, hidden, bias=False).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(gain * torch.randn(hidden, hidden, generator=generator, dtype=torch.float64) / math.sqrt(hidden))
        rnn.weight_ih_l0.zero_()
        x = torch.zeros(200, 2, 1, dtype=torch.float64)
        h0 = torch.randn(1, 2, hidden, generator=generator, dtype=torch.float64)
        states, _ = rnn(x, h0)
    weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0)
    return lyapunov_exponents("rnn_tanh", weights, x, states, h0[0], k=4, warmup=100), rnn.weight_hh_l0.detach()


def test_random_tanh_network_is_chaotic_above_gain_one():
    exponents, _ = _random_tanh_exponents(3.0)
    assert exponents[0] > 0.1
    assert torch.all(exponents[:-1] >= exponents[1:])


def test_random_tanh_network_contracts_below_gain_one():
    exponents, weight = _random_tanh_exponents(0.5)
    # the state decays to 0, where the network is linear: lambda_1 = log of W's spectral radius
    assert exponents[0] < 0
    assert abs(float(exponents[0]) - math.log(float(torch.linalg.eigvals(weight).abs().max()))) < 0.01


def test_sampled_sequences_are_those_averaged():
    torch.manual_seed(0)
    gru = nn.GRU(4, 5)
    x, h0 = torch.randn(9, 6, 4), torch.randn(1, 6, 5)
    lengths = torch.tensor([9, 4, 7, 2, 8, 5])
    sampled = fused_lyapunov_exponents(gru, x, h0, lengths=lengths, k=3, max_sequences=3)
    chosen = torch.tensor([0, 2, 4])
    expected = fused_lyapunov_exponents(gru, x[:, chosen], h0[:, chosen], lengths=lengths[chosen], k=3, max_sequences=None)
    torch.testing.assert_close(sampled[0, False], expected[0, False])
    everything = fused_lyapunov_exponents(gru, x, h0, lengths=lengths, k=3, max_sequences=None)
    assert not torch.allclose(sampled[0, False], everything[0, False])


def _rnn_call(steps: int = 5, lengths: Optional[Tensor] = None) -> dict:
    rnn = nn.RNN(2, 3)
    x, h0 = torch.randn(steps, 2, 2), torch.zeros(2, 3)
    with torch.no_grad():
        states, _ = rnn(x, h0[None])
    weights = CellWeights(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    return dict(cell_type="rnn_tanh", weights=weights, inputs=x, states=states, initial_state=h0, lengths=lengths)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(warmup=5), ValueError, r"warmup \(5\) must be smaller than the number of steps \(5\)"),
        (dict(warmup=-1), ValueError, "warmup must be 0 or more"),
        (dict(warmup=3, lengths=torch.tensor([2, 3])), ValueError, "no sampled sequence is longer than warmup"),
        (dict(max_sequences=0), ValueError, "max_sequences must be at least 1"),
        (dict(cell_type="lstm_peephole"), ValueError, "unknown cell type 'lstm_peephole'"),
        (dict(cell_type="lstm"), TypeError, "initial_cell is required for an LSTM"),
        (dict(initial_cell=torch.zeros(2, 3)), TypeError, "accepted only there"),
    ],
)
def test_argument_checks(overrides, error, message):
    arguments = _rnn_call()
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        lyapunov_exponents(**arguments)


def test_fused_argument_checks_fail_before_any_work():
    lstm = nn.LSTM(2, 3)
    with pytest.raises(ValueError, match="k must be at least 1"):
        fused_lyapunov_exponents(lstm, torch.randn(4, 1, 2), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), k=0)
    with pytest.raises(ValueError, match=r"warmup \(4\) must be smaller"):
        fused_lyapunov_exponents(lstm, torch.randn(4, 1, 2), torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), warmup=4)


def test_k_is_capped_at_the_state_dimension_and_the_global_rng_is_untouched():
    arguments = _rnn_call()
    state = torch.random.get_rng_state()
    exponents = lyapunov_exponents(**arguments, k=50)
    assert exponents.shape == (3,)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(exponents, lyapunov_exponents(**arguments, k=50))
