"""Discovery of recurrent weights: keys, roles, gate blocks and fans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gradhealth.inits import Fans
from lightning_gradhealth.layers import find_linear_weights, find_recurrent_weights


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3)
        self.cell = nn.GRUCell(4, 6)
        self.plain = nn.RNN(2, 5, nonlinearity="relu", bias=False)


def test_keys_follow_the_public_naming_contract():
    model = nn.ModuleDict({"encoder": Encoder()})
    keys = list(dict.fromkeys(r.layer_key for r in find_recurrent_weights(model)))
    assert keys == [
        "encoder.rnn.l0", "encoder.rnn.l0_reverse", "encoder.rnn.l1", "encoder.rnn.l1_reverse",
        "encoder.cell", "encoder.plain.l0",
    ]


def test_every_parameter_of_every_recurrent_layer_is_found_once_with_its_role():
    model = Encoder()
    records = find_recurrent_weights(model)
    assert sorted(r.full_name for r in records) == sorted(name for name, _ in model.named_parameters())
    roles = {r.full_name: r.role for r in records}
    assert roles["rnn.weight_hh_l1_reverse"] == "recurrent"
    assert roles["rnn.weight_hr_l1_reverse"] == "recurrent"
    assert roles["rnn.weight_ih_l1_reverse"] == "input"
    assert roles["rnn.bias_hh_l0"] == "bias"
    assert roles["cell.weight_hh"] == "recurrent"
    for record in records:
        assert record.tensor is model.get_parameter(record.full_name)


def test_gate_blocks_and_nonlinearities_follow_pytorch():
    by_name = {r.full_name: r for r in find_recurrent_weights(Encoder())}
    assert by_name["rnn.weight_hh_l0"].gates == ("i", "f", "g", "o")
    assert by_name["rnn.weight_hh_l0"].nonlinearities == ("sigmoid", "sigmoid", "tanh", "sigmoid")
    assert by_name["rnn.weight_hr_l0"].gates == ("proj",)
    assert by_name["cell.weight_ih"].gates == ("r", "z", "n")
    assert by_name["plain.weight_hh_l0"].nonlinearities == ("relu",)
    assert by_name["plain.weight_hh_l0"].cell_type == "rnn_relu"


def test_fans_follow_the_rnn_fan_rule_per_gate():
    by_name = {r.full_name: r for r in find_recurrent_weights(Encoder())}
    # layer 0: input 5, recurrent width = proj_size 3, hidden 7
    assert by_name["rnn.weight_hh_l0"].fans == Fans(fan_in=5 + 3, fan_out=7)
    assert by_name["rnn.weight_ih_l0"].fans == Fans(fan_in=5 + 3, fan_out=7)
    # layer 1 reads both directions' projected outputs: 2 * 3
    assert by_name["rnn.weight_ih_l1_reverse"].fans == Fans(fan_in=6 + 3, fan_out=7)
    # the projection maps hidden 7 to 3
    assert by_name["rnn.weight_hr_l1"].fans == Fans(fan_in=7, fan_out=3)
    assert by_name["cell.weight_hh"].fans == Fans(fan_in=4 + 6, fan_out=6)


class CustomCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W_hh = nn.Parameter(torch.randn(12, 3))
        self.W_xh = nn.Parameter(torch.randn(12, 2))


def test_custom_patterns_name_hidden_to_hidden_matrices_with_a_gate_count():
    model = nn.ModuleDict({"a": CustomCell(), "b": CustomCell()})
    records = find_recurrent_weights(model, custom={"*.W_hh": 4})
    assert [(r.layer_key, r.role, r.gates, r.fans) for r in records] == [
        ("a", "recurrent", ("gate0", "gate1", "gate2", "gate3"), Fans(3, 3)),
        ("b", "recurrent", ("gate0", "gate1", "gate2", "gate3"), Fans(3, 3)),
    ]


def test_custom_pattern_that_matches_nothing_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"custom pattern 'cell\.W_hidden' matches no parameter"):
        find_recurrent_weights(nn.ModuleDict({"cell": CustomCell()}), custom={"cell.W_hidden": 4})


def test_custom_gate_count_that_does_not_divide_the_matrix_is_rejected():
    with pytest.raises(ValueError, match=r"matches 'cell\.W_hh'.*the gate count 5 does not divide its 12 rows"):
        find_recurrent_weights(nn.ModuleDict({"cell": CustomCell()}), custom={"cell.W_hh": 5})


def test_custom_pattern_may_not_claim_a_builtin_layers_weight():
    with pytest.raises(ValueError, match="already handles"):
        find_recurrent_weights(nn.ModuleDict({"rnn": nn.GRU(2, 3)}), custom={"rnn.weight_hh*": 3})


def test_linear_layers_are_found_but_unmaterialized_lazy_ones_are_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LazyLinear(2), nn.LSTM(2, 2))
    assert [(r.full_name, r.role) for r in find_linear_weights(model)] == [("0.weight", "linear"), ("0.bias", "bias")]
