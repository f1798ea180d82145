"""Module-level initialization by role, per gate block, checked against numpy.linalg and the papers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradhealth import InitConfig, initialize_
from lightning_gradhealth.layers import find_recurrent_weights

SUPPORTED_LAYERS = {
    "rnn_tanh": lambda: nn.RNN(5, 12, num_layers=2, bidirectional=True),
    "rnn_relu": lambda: nn.RNN(5, 12, nonlinearity="relu", batch_first=True),
    "lstm": lambda: nn.LSTM(5, 12, num_layers=2, bidirectional=True),
    "lstm_proj": lambda: nn.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=4),
    "gru": lambda: nn.GRU(5, 12, num_layers=3, bidirectional=True),
    "rnn_cell": lambda: nn.RNNCell(5, 12),
    "lstm_cell": lambda: nn.LSTMCell(5, 12),
    "gru_cell": lambda: nn.GRUCell(5, 12),
}


def _blocks(record) -> list[np.ndarray]:
    return np.split(record.tensor.detach().double().numpy(), len(record.gates), axis=0)


@pytest.mark.parametrize("layer", SUPPORTED_LAYERS)
@pytest.mark.parametrize("gain", [1.0, 1.3])
def test_orthogonal_makes_every_gate_block_of_every_recurrent_matrix_orthogonal(layer, gain):
    model = nn.Sequential(SUPPORTED_LAYERS[layer]())
    initialize_(model, "orthogonal", gain=gain, generator=torch.Generator().manual_seed(0))
    recurrent = [r for r in find_recurrent_weights(model) if r.role == "recurrent"]
    assert recurrent
    for record in recurrent:
        for block in _blocks(record):
            gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
            np.testing.assert_allclose(gram, gain**2 * np.eye(gram.shape[0]), atol=1e-5, err_msg=record.full_name)
            np.testing.assert_allclose(np.linalg.svd(block, compute_uv=False), gain, atol=1e-5)


def test_orthogonal_per_gate_is_what_a_whole_matrix_init_is_not():
    lstm = nn.LSTM(64, 64)
    nn.init.orthogonal_(lstm.weight_hh_l0)
    whole_radius = max(np.abs(np.linalg.eigvals(b)).max() for b in np.split(lstm.weight_hh_l0.detach().numpy(), 4))
    initialize_(lstm, "orthogonal")
    per_gate_radius = [np.abs(np.linalg.eigvals(b)).max() for b in np.split(lstm.weight_hh_l0.detach().numpy(), 4)]
    assert whole_radius < 0.8
    np.testing.assert_allclose(per_gate_radius, 1.0, atol=1e-5)


@pytest.mark.parametrize("layer", ["rnn_relu", "lstm", "gru_cell"])
def test_identity_is_exact(layer):
    model = nn.Sequential(SUPPORTED_LAYERS[layer]())
    initialize_(model, "identity", gain=0.7)
    for record in find_recurrent_weights(model):
        if record.role == "recurrent":
            for block in _blocks(record):
                expected = np.float32(0.7) * np.eye(*block.shape, dtype=np.float32)
                np.testing.assert_array_equal(block, expected.astype(np.float64))


def test_glorot_uses_the_rnn_fan_rule_for_input_and_recurrent_blocks():
    lstm = nn.LSTM(300, 200)
    initialize_(lstm, "glorot", input_init="glorot", generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / ((300 + 200) + 200))
    for weight in (lstm.weight_ih_l0, lstm.weight_hh_l0):
        assert weight.abs().max().item() <= bound
        for block in weight.detach().chunk(4):
            assert block.var().item() == pytest.approx(bound**2 / 3, rel=0.03)


def test_he_uses_fan_in_and_the_gain_of_each_gates_nonlinearity():
    gru = nn.GRU(300, 200)
    initialize_(gru, "he", input_init="kaiming", generator=torch.Generator().manual_seed(0))
    for weight in (gru.weight_ih_l0, gru.weight_hh_l0):
        stds = [block.std().item() for block in weight.detach().chunk(3)]
        # r and z are followed by a sigmoid (gain 1), n by a tanh (gain 5/3); fan_in = 300 + 200
        np.testing.assert_allclose(stds, np.array([1, 1, 5 / 3]) / math.sqrt(500), rtol=0.03)


def test_lstm_forget_bias_is_counted_once_across_both_bias_vectors():
    lstm = nn.LSTM(3, 6, num_layers=2, bidirectional=True)
    initialize_(lstm, "orthogonal", forget_bias=2.5)
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        effective = (getattr(lstm, "bias_ih" + suffix) + getattr(lstm, "bias_hh" + suffix)).detach()
        i, f, g, o = effective.chunk(4)
        assert torch.equal(f, torch.full((6,), 2.5))
        assert torch.equal(torch.cat([i, g, o]), torch.zeros(18))


def test_gru_and_rnn_biases_are_zeroed():
    model = nn.ModuleList([nn.GRU(3, 4), nn.RNNCell(3, 4)])
    initialize_(model, "orthogonal", forget_bias=3.0)
    for name, param in model.named_parameters():
        if "bias" in name:
            assert torch.count_nonzero(param) == 0, name


def test_chrono_biases_follow_tallec_and_ollivier():
    t_max, hidden = 100, 3000
    cell = nn.LSTMCell(2, hidden)
    initialize_(cell, "orthogonal", chrono_t_max=t_max, generator=torch.Generator().manual_seed(0))
    i, f, g, o = (cell.bias_ih + cell.bias_hh).detach().double().chunk(4)
    assert torch.equal(i, -f)
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(o) == 0
    # exp(b_f) ~ U[1, T_max - 1]: compare its empirical distribution with that uniform (KS distance)
    forget_times = np.sort(np.exp(f.numpy()))
    assert forget_times.min() >= 1 and forget_times.max() <= t_max - 1
    uniform_cdf = (forget_times - 1) / (t_max - 2)
    empirical_cdf = np.arange(1, hidden + 1) / hidden
    assert np.abs(uniform_cdf - empirical_cdf).max() < 1.63 / math.sqrt(hidden)  # KS test at 1%


def test_input_matrices_get_their_own_scheme_or_are_kept():
    torch.manual_seed(0)
    gru = nn.GRU(4, 4)
    before = gru.weight_ih_l0.detach().clone()
    initialize_(gru, "orthogonal", input_init=None)
    assert torch.equal(gru.weight_ih_l0, before)
    initialize_(gru, "orthogonal", input_init="identity")
    assert torch.equal(gru.weight_ih_l0.detach(), torch.eye(4).repeat(3, 1))


def test_linear_layers_are_untouched_unless_opted_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.LSTM(300, 4))
    before = model[0].weight.detach().clone()
    initialize_(model, "orthogonal")
    assert torch.equal(model[0].weight, before)
    initialize_(model, None, linear_init="he", generator=torch.Generator().manual_seed(0))
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    assert torch.count_nonzero(model[0].bias) == 0


def test_exclude_leaves_weights_loaded_before_fit_alone():
    torch.manual_seed(0)
    model = nn.ModuleDict({"pretrained": nn.LSTM(3, 5), "fresh": nn.LSTM(3, 5)})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = initialize_(model, "orthogonal", exclude=["pretrained"])
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == name.startswith("pretrained."), name
    assert {r.layer_key for r in report} == {"fresh.l0"}


def test_exclude_pattern_that_matches_nothing_is_an_error_and_writes_nothing():
    torch.manual_seed(0)
    lstm = nn.Sequential(nn.LSTM(3, 5))
    before = lstm[0].weight_hh_l0.detach().clone()
    with pytest.raises(ValueError, match="exclude pattern 'encoder.*' matches no module"):
        initialize_(lstm, "orthogonal", exclude=["encoder.*"])
    assert torch.equal(lstm[0].weight_hh_l0, before)


def test_custom_matrices_are_initialized_per_gate():
    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.recurrent_kernel = nn.Parameter(torch.randn(3 * 8, 8))

    model = nn.ModuleDict({"cell": Cell()})
    initialize_(model, "orthogonal", custom={"cell.recurrent_*": 3})
    for block in model["cell"].recurrent_kernel.detach().double().chunk(3):
        np.testing.assert_allclose((block @ block.T).numpy(), np.eye(8), atol=1e-5)


def test_weights_keep_their_storage_device_and_dtype():
    lstm = nn.LSTM(3, 5).double()
    pointers = {name: p.data_ptr() for name, p in lstm.named_parameters()}
    initialize_(lstm, "orthogonal", chrono_t_max=20)
    for name, param in lstm.named_parameters():
        assert param.data_ptr() == pointers[name] and param.dtype == torch.float64 and param.requires_grad


def test_the_same_seed_gives_the_same_weights():
    def init_with(seed: int) -> dict[str, torch.Tensor]:
        model = nn.LSTM(3, 5, num_layers=2)
        initialize_(model, "orthogonal", chrono_t_max=30, generator=torch.Generator().manual_seed(seed))
        return {name: p.detach() for name, p in model.named_parameters()}

    first, again, other = init_with(7), init_with(7), init_with(8)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["weight_hh_l1"], other["weight_hh_l1"])


def test_report_names_each_parameter_role_gates_and_scheme():
    report = initialize_(nn.ModuleDict({"rnn": nn.LSTM(3, 5, proj_size=2)}), "orthogonal", gain=2.0)
    rows = {r.parameter: r for r in report}
    assert rows["rnn.weight_hh_l0"].scheme == "orthogonal x2"
    assert rows["rnn.weight_hr_l0"].gates == ("proj",)
    assert rows["rnn.weight_ih_l0"].scheme == "glorot (fan 5+5)"
    assert rows["rnn.bias_ih_l0"].scheme == "zeros, forget gate 1"


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"init": "orthonormal"}, ValueError, "Unknown init scheme 'orthonormal'. Did you mean 'orthogonal'?"),
        ({"init": "orthogonal", "input_init": "glorrot"}, ValueError, "Unknown input_init scheme 'glorrot'"),
        ({"init": "orthogonal", "gain": -1.0}, ValueError, "gain must be a finite number > 0"),
        ({"init": "orthogonal", "gain": float("nan")}, ValueError, "gain must be a finite number > 0"),
        ({"init": "orthogonal", "gain": float("inf")}, ValueError, "gain must be a finite number > 0"),
        ({"init": "uniform", "uniform_scale": 0.0}, ValueError, "uniform_scale must be a finite number > 0"),
        ({"init": "orthogonal", "forget_bias": float("nan")}, ValueError, "forget_bias must be a finite number"),
        ({"init": "orthogonal", "chrono_t_max": 1}, ValueError, "chrono_t_max must be an integer >= 2"),
        ({"chrono_t_max": 100}, ValueError, "chrono_t_max initializes LSTM biases, which happens only with init"),
        ({"init": "orthogonal", "custom": {"cell.W": 0}}, ValueError, "gate count must be an integer >= 1"),
        ({"init": "orthogonal", "exclude": "encoder"}, TypeError, "exclude must be a list of glob patterns"),
    ],
)
def test_bad_options_fail_at_construction_with_a_message_that_says_what_is_allowed(options, error, message):
    with pytest.raises(error, match=re.escape(message)):
        InitConfig(**options)
