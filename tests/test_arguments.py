"""Every bad argument is named, early: GradHealth's constructor refuses each bad value with a
TypeError (wrong type) or ValueError (wrong value) that names the argument, what was given and
what is allowed; the model-dependent ``custom`` checks refuse at the start of fit, before any
weight changes."""

from __future__ import annotations

import inspect
import math
import re
import typing
from typing import Optional

import numpy as np
import pytest
import pytorch_lightning
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import PLSequenceModel, trainer_kwargs, weights
from lightning_gradhealth import GradHealth, initialize_
from lightning_gradhealth.config import SETTING_NAMES, SettingName
from lightning_gradhealth.layers import find_recurrent_weights

ARGUMENTS = list(inspect.signature(GradHealth).parameters)

NAN, INF = float("nan"), float("inf")
GATE_COUNT = "the gate count must be an integer >= 1"


def is_plain(value: object) -> bool:
    """Whether ``value`` is made of plain Python values only (what YAML, checkpoints and the config text hold)."""
    if isinstance(value, list):
        return all(map(is_plain, value))
    if isinstance(value, dict):
        return all(is_plain(key) and is_plain(item) for key, item in value.items())
    return type(value) in (bool, int, float, str, type(None))


@pytest.mark.parametrize(
    "arguments, error, fragments",
    [
        # clip_norm_type is named as such, not as clipping's internal norm_type
        ({"clip_norm_type": 0}, ValueError, ["clip_norm_type must be a number > 0, math.inf or 'inf'", "got 0"]),
        ({"clip_norm_type": NAN}, ValueError, ["clip_norm_type must be", "got nan"]),
        ({"clip_norm_type": "two"}, ValueError, ["clip_norm_type must be", "got 'two'"]),
        ({"clip_norm_type": None}, TypeError, ["clip_norm_type must be", "got None (NoneType)"]),
        # custom: a dict of pattern -> gate count, nothing else
        ({"custom": "cell.W_hh"}, TypeError, ["custom must be None or a dict of glob pattern -> gate count", "(str)"]),
        ({"custom": ["cell.W_hh"]}, TypeError, ["custom must be None or a dict", "e.g. custom={'cell.W_hh': 4}", "(list)"]),
        ({"custom": [("cell.W_hh", 4)]}, TypeError, ["custom must be None or a dict", "got [('cell.W_hh', 4)] (list)"]),
        ({"custom": 4}, TypeError, ["custom must be None or a dict", "got 4 (int)"]),
        ({"custom": {"cell.W_hh": 0}}, ValueError, [f"custom pattern 'cell.W_hh': {GATE_COUNT}", "got 0"]),
        ({"custom": {"cell.W_hh": "4"}}, TypeError, [f"custom pattern 'cell.W_hh': {GATE_COUNT}", "got '4' (str)"]),
        ({"custom": {"cell.W_hh": 4.0}}, TypeError, [GATE_COUNT, "got 4.0 (float)"]),
        ({"custom": {"cell.W_hh": True}}, TypeError, [GATE_COUNT, "got True (bool)"]),
        ({"custom": {"": 4}}, ValueError, ["custom patterns must be non-empty strings", "got ''"]),
        ({"custom": {4: 4}}, TypeError, ["custom patterns must be non-empty strings", "got 4 (int)"]),
        # pattern lists: a list of strings; one bare string is refused with the list to write instead
        ({"exclude": "rnn*"}, TypeError, ["exclude must be a list of glob patterns", "write exclude=['rnn*']"]),
        ({"exclude": 5}, TypeError, ["exclude must be None or a list of glob patterns", "got 5 (int)"]),
        ({"exclude": {"rnn": 1}}, TypeError, ["exclude must be None or a list of glob patterns", "(dict)"]),
        ({"exclude": [b"rnn"]}, TypeError, ["exclude patterns must be non-empty strings", "got b'rnn' (bytes)"]),
        ({"exclude": [""]}, ValueError, ["exclude patterns must be non-empty strings", "got ''"]),
        ({"custom_cells": "decoder"}, TypeError, ["custom_cells must be a list of glob", "write custom_cells=['decoder']"]),
        ({"custom_cells": 3.5}, TypeError, ["custom_cells must be None or a list of glob patterns", "got 3.5 (float)"]),
        ({"custom_cells": [None]}, TypeError, ["custom_cells patterns must be non-empty strings", "got None (NoneType)"]),
        # booleans are bools
        ({"timesteps": "no"}, TypeError, ["timesteps must be True or False", "got 'no' (str)"]),
        ({"timesteps": 0}, TypeError, ["timesteps must be True or False", "got 0 (int)"]),
        ({"timesteps": None}, TypeError, ["timesteps must be True or False", "got None (NoneType)"]),
        # thresholds: ratios of gradient norms, in their meaningful range
        ({"vanish_below": 3.0}, ValueError, ["vanish_below must be a number in (0, 1)", "vanishing", "got 3.0"]),
        ({"vanish_below": 1.0}, ValueError, ["vanish_below must be a number in (0, 1)", "got 1.0"]),
        ({"vanish_below": 0.0}, ValueError, ["vanish_below must be a number in (0, 1)", "got 0.0"]),
        ({"vanish_below": -3.0}, ValueError, ["vanish_below must be a number in (0, 1)", "got -3.0"]),
        ({"vanish_below": NAN}, ValueError, ["vanish_below must be a number in (0, 1)", "got nan"]),
        ({"vanish_below": "1e-3"}, TypeError, ["vanish_below must be a number in (0, 1)", "got '1e-3' (str)"]),
        ({"explode_above": 0.5}, ValueError, ["explode_above must be a finite number > 1", "exploding", "got 0.5"]),
        ({"explode_above": 1}, ValueError, ["explode_above must be a finite number > 1", "got 1"]),
        ({"explode_above": INF}, ValueError, ["explode_above must be a finite number > 1", "got inf"]),
        ({"horizon_factor": 0.5}, ValueError, ["horizon_factor must be a finite number > 1", "horizon", "got 0.5"]),
        ({"horizon_factor": 1.0}, ValueError, ["horizon_factor must be a finite number > 1", "got 1.0"]),
        ({"horizon_factor": [1000]}, TypeError, ["horizon_factor must be a finite number > 1", "got [1000] (list)"]),
        # numbers are real numbers, not bools, in range
        ({"init": "orthogonal", "gain": True}, TypeError, ["gain must be a finite number > 0", "got True (bool)"]),
        ({"init": "orthogonal", "gain": "2"}, TypeError, ["gain must be a finite number > 0", "got '2' (str)"]),
        ({"init": "orthogonal", "gain": 0}, ValueError, ["gain must be a finite number > 0", "got 0"]),
        ({"init": "orthogonal", "gain": INF}, ValueError, ["gain must be a finite number > 0", "got inf"]),
        ({"init": "orthogonal", "forget_bias": None}, TypeError, ["forget_bias must be a finite number", "got None (NoneType)"]),
        ({"init": "orthogonal", "forget_bias": -INF}, ValueError, ["forget_bias must be a finite number", "got -inf"]),
        ({"init": "uniform", "uniform_scale": -0.1}, ValueError, ["uniform_scale must be a finite number > 0", "got -0.1"]),
        ({"init": "uniform", "uniform_scale": 10**400}, ValueError, ["uniform_scale must be a finite number > 0"]),
        # integers are integers
        ({"init": "orthogonal", "chrono_t_max": 1}, ValueError, ["chrono_t_max must be an integer >= 2", "got 1"]),
        ({"init": "orthogonal", "chrono_t_max": 50.0}, TypeError, ["chrono_t_max must be an integer >= 2", "got 50.0 (float)"]),
        ({"init": "orthogonal", "chrono_t_max": True}, TypeError, ["chrono_t_max must be an integer >= 2", "got True (bool)"]),
        ({"chrono_t_max": 50}, ValueError, ["chrono_t_max initializes LSTM biases, which happens only with init"]),
        ({"seed": -1}, ValueError, ["seed must be None or an integer in [0, 2**63)", "got -1"]),
        ({"seed": 2**63}, ValueError, ["seed must be None or an integer in [0, 2**63)", "got 9223372036854775808"]),
        ({"seed": "7"}, TypeError, ["seed must be None or an integer in [0, 2**63)", "got '7' (str)"]),
        ({"seed": 1.5}, TypeError, ["seed must be None or an integer", "got 1.5 (float)"]),
        ({"log_every_n_steps": 0}, ValueError, ["log_every_n_steps must be None or an integer >= 1", "got 0"]),
        ({"log_every_n_steps": 2.0}, TypeError, ["log_every_n_steps must be None or an integer >= 1", "got 2.0 (float)"]),
        ({"log_every_n_steps": True}, TypeError, ["log_every_n_steps must be None or an integer >= 1", "got True (bool)"]),
        ({"full_every_n_steps": -4}, ValueError, ["full_every_n_steps must be None or an integer >= 1", "got -4"]),
        ({"log_every_n_steps": 4, "full_every_n_steps": 6}, ValueError, ["6 must be a multiple of log_every_n_steps=4"]),
        ({"probe_every_n_steps": 0}, ValueError, ["probe_every_n_steps must be None or an integer >= 1", "got 0"]),
        ({"probe_every_n_steps": 200.0}, TypeError, ["probe_every_n_steps must be None or an integer >= 1", "got 200.0 (float)"]),
        (
            {"log_every_n_steps": 50, "probe_every_n_steps": 120},
            ValueError,
            ["probe_every_n_steps=120 must be a multiple of log_every_n_steps=50: the probe runs on logging steps"],
        ),
        # scheme names are strings among the valid names
        ({"init": 5}, TypeError, ["init must be a scheme name ('orthogonal', ", "or None, got 5 (int)"]),
        ({"init": "orthogonl"}, ValueError, ["Unknown init scheme 'orthogonl'. Did you mean 'orthogonal'?", "Valid names: "]),
        ({"input_init": ["glorot"]}, TypeError, ["input_init must be a scheme name", "got ['glorot'] (list)"]),
        ({"linear_init": b"he"}, TypeError, ["linear_init must be a scheme name", "got b'he' (bytes)"]),
        # clipping
        ({"clip": True}, TypeError, ["clip must be None or one of 'norm', 'value', 'agc'", "got True (bool)"]),
        ({"clip": "nrom", "clip_val": 1.0}, ValueError, ["Unknown clip mode 'nrom'. Did you mean 'norm'?"]),
        ({"clip": "norm", "clip_val": "1.0"}, TypeError, ["clip_val must be a finite number > 0", "got '1.0' (str)"]),
        ({"clip": "norm", "clip_val": True}, TypeError, ["clip_val must be a finite number > 0", "got True (bool)"]),
        ({"clip": "norm", "clip_val": -1.0}, ValueError, ["clip='norm' needs clip_val", "finite number > 0; got -1.0"]),
        ({"clip": "norm"}, ValueError, ["clip='norm' needs clip_val"]),
        ({"clip_val": 1.0}, ValueError, ["clip_val=1.0 has no effect without clip"]),
        ({"on_nonfinite": None}, TypeError, ["on_nonfinite must be one of 'warn', 'skip', 'raise'", "got None (NoneType)"]),
        ({"on_nonfinite": "ignore"}, ValueError, ["on_nonfinite must be one of 'warn', 'skip', 'raise'", "got 'ignore'"]),
    ],
)
def test_each_bad_argument_fails_at_construction_naming_it_and_what_is_allowed(arguments, error, fragments):
    with pytest.raises((TypeError, ValueError)) as raised:
        GradHealth(**arguments)
    assert type(raised.value) is error
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_numpy_and_torch_scalars_and_tuples_are_accepted_as_plain_python_values():
    health = GradHealth(
        init="orthogonal",
        gain=np.float32(2.0),
        chrono_t_max=np.int64(50),
        seed=torch.tensor(7),
        custom={"cell.W_hh": np.int32(4)},
        exclude=("head",),
        custom_cells=[],
        log_every_n_steps=np.int16(2),
        probe_every_n_steps=np.int64(4),
        full_every_n_steps=torch.tensor(4),
        vanish_below=torch.tensor(0.01),
        explode_above=np.float64(100.0),
        horizon_factor=10,
        clip="Norm",
        clip_val=np.float64(0.5),
        clip_norm_type="inf",
    )
    assert (health.gain, health.chrono_t_max, health.seed, health.custom, health.exclude, health.custom_cells) == (
        2.0, 50, 7, {"cell.W_hh": 4}, ["head"], None
    )
    assert (health.log_every_n_steps, health.probe_every_n_steps, health.full_every_n_steps) == (2, 4, 4)
    assert (health.vanish_below, health.explode_above, health.horizon_factor) == (pytest.approx(0.01), 100.0, 10.0)
    assert (health.clip, health.clip_val, health.clip_norm_type) == ("norm", 0.5, math.inf)
    assert all(is_plain(getattr(health, name)) for name in ARGUMENTS)


@pytest.mark.parametrize(
    "name, given, canonical",
    [
        ("init", "Identity", "identity"),
        ("input_init", "XAVIER", "glorot"),
        ("linear_init", "He", "he"),
        ("on_nonfinite", "Skip", "skip"),
        ("on_nonfinite", "RAISE", "raise"),
    ],
)
def test_names_are_read_in_any_case_as_lightningcli_reads_them(name, given, canonical):
    arguments = {name: given, **({"init": "orthogonal"} if name == "input_init" else {})}
    assert getattr(GradHealth(**arguments), name) == canonical
    assert SETTING_NAMES[name].parse(given) == canonical  # what LightningCLI passes to the constructor


@pytest.mark.parametrize(
    "name, bad, suggestion",
    [
        ("init", "identiy", "'identity'"),
        ("input_init", "glorto", "'glorot'"),
        ("linear_init", "kaimng", "'kaiming'"),
        ("clip", "Nrom", "'norm'"),
        ("on_nonfinite", "Skp", "'skip'"),
    ],
)
def test_lightningcli_refuses_a_misspelt_name_with_the_constructors_message_in_one_line(name, bad, suggestion):
    arguments = {name: bad, **({"clip_val": 1.0} if name == "clip" else {})}
    with pytest.raises(ValueError) as refused:
        GradHealth(**arguments)
    with pytest.raises(SystemExit) as stopped:
        SETTING_NAMES[name].parse(bad)
    assert stopped.value.code == f"error: GradHealth: {refused.value}"
    assert f"Did you mean {suggestion}?" in stopped.value.code and "\n" not in stopped.value.code


def test_lightningcli_sees_each_name_typed_as_a_name_it_checks():
    def names_a_setting(annotation: object) -> bool:
        members = typing.get_args(annotation) or (annotation,)
        return any(isinstance(member, type) and issubclass(member, SettingName) for member in members)

    parameters = inspect.signature(GradHealth).parameters
    assert {name for name, parameter in parameters.items() if names_a_setting(parameter.annotation)} == set(SETTING_NAMES)
    scheme_name = SETTING_NAMES["init"]
    assert parameters["init"].annotation == Optional[scheme_name]
    assert parameters["on_nonfinite"].annotation is SETTING_NAMES["on_nonfinite"]
    with pytest.raises(ValueError, match="init is a name, got None"):
        SETTING_NAMES["init"].parse(None)  # not a name: jsonargparse goes on to the None in Optional[...]


def test_thresholds_just_inside_their_ranges_are_accepted():
    health = GradHealth(vanish_below=0.999, explode_above=1.001, horizon_factor=1.001, clip_norm_type=0.5)
    assert (health.vanish_below, health.explode_above, health.horizon_factor, health.clip_norm_type) == (0.999, 1.001, 1.001, 0.5)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32).map(torch.tensor),
    st.text(max_size=12),
    st.sampled_from(["orthogonal", "xavier", "norm", "agc", "skip", "inf", "rnn*", ""]),
    st.binary(max_size=8),
    st.lists(st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.none()), max_size=3),
    st.tuples(st.text(max_size=6), st.integers()),
    st.dictionaries(
        st.one_of(st.text(max_size=6), st.integers()), st.one_of(st.integers(), st.floats(), st.text(max_size=3)), max_size=3
    ),
    st.builds(object),
)


@pytest.mark.parametrize("name", ARGUMENTS)
@settings(max_examples=50, deadline=None)
@given(value=ANY_VALUE)
def test_any_value_of_one_argument_is_accepted_or_refused_naming_that_argument(name, value):
    try:
        health = GradHealth(**{name: value})
    except (TypeError, ValueError) as error:
        assert re.search(rf"\b{name}\b", str(error)), f"{type(error).__name__} does not name {name}: {error}"
    else:  # what was accepted is kept as a plain Python value
        assert is_plain(getattr(health, name))


class LoopCell(nn.Module):
    """An LSTM-like cell of our own run over the sequence: W_hh is its hidden-to-hidden matrix,
    W_xh its input matrix, b_hh its bias."""

    def __init__(self, input_size: int = 3, hidden_size: int = 8) -> None:
        super().__init__()
        self.W_hh = nn.Parameter(0.1 * torch.randn(4 * hidden_size, hidden_size))
        self.W_xh = nn.Parameter(0.1 * torch.randn(4 * hidden_size, input_size))
        self.b_hh = nn.Parameter(0.1 * torch.randn(4 * hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], self.W_hh.shape[1])
        states = []
        for t in range(x.shape[1]):
            i, f, g, o = (x[:, t] @ self.W_xh.T + h @ self.W_hh.T + self.b_hh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        return torch.stack(states, dim=1)


BAD_CUSTOM = [
    # an input matrix: 4 blocks of 8 x 3
    ({"rnn.W_*": 4}, ["custom pattern 'rnn.W_*' (gate count 4) matches 'rnn.W_xh'", "shape (32, 3)",
                      "gate blocks would be 8 x 3, not square", "only recurrent matrices of shape (4 * H, H)"]),
    # the head, an nn.Linear weight
    ({"head.weight": 1}, ["custom pattern 'head.weight' (gate count 1) matches 'head.weight'", "shape (1, 8) in a Linear",
                          "not a hidden-to-hidden matrix", "shape (1 * H, H)"]),
    # a bias: 1-D, whatever the gate count
    ({"rnn.*_hh": 4}, ["custom pattern 'rnn.*_hh' (gate count 4) matches 'rnn.b_hh'", "shape (32,)",
                       "it is 1-D, not a matrix (a bias vector?)"]),
]


@pytest.mark.parametrize("custom, fragments", BAD_CUSTOM)
def test_initialize_refuses_a_custom_pattern_that_matches_anything_but_a_recurrent_matrix_and_writes_nothing(custom, fragments):
    torch.manual_seed(0)
    model = PLSequenceModel(build=LoopCell)
    before = weights(model)
    with pytest.raises(ValueError) as raised:
        initialize_(model, "orthogonal", custom=custom, linear_init="he")
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert "does not divide" not in str(raised.value)
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


@pytest.mark.parametrize("custom, fragments", BAD_CUSTOM)
def test_fit_stops_at_its_start_on_such_a_pattern_before_any_weight_changes(custom, fragments):
    torch.manual_seed(0)
    model = PLSequenceModel(build=LoopCell)
    before = weights(model)
    trainer = pytorch_lightning.Trainer(callbacks=[GradHealth(init="orthogonal", custom=custom)], **trainer_kwargs())
    with pytest.raises(ValueError) as raised:
        trainer.fit(model)
    assert all(fragment in str(raised.value) for fragment in fragments)
    assert trainer.global_step == 0
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


def test_a_gate_count_that_does_not_divide_the_rows_says_so():
    with pytest.raises(ValueError, match=re.escape("the gate count 5 does not divide its 32 rows")):
        find_recurrent_weights(LoopCell(), custom={"W_hh": 5})


def test_a_custom_recurrent_matrix_of_the_right_shape_is_initialized_per_gate():
    torch.manual_seed(0)
    model = PLSequenceModel(build=LoopCell)
    report = initialize_(model, "orthogonal", custom={"rnn.W_hh": 4})
    assert [(row.parameter, row.role, len(row.gates)) for row in report] == [("rnn.W_hh", "recurrent", 4)]
    for block in model.rnn.W_hh.detach().double().chunk(4):
        torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_fit_with_a_custom_recurrent_matrix_of_the_right_shape_initializes_and_measures_it():
    torch.manual_seed(0)
    # its W_hh is a normal draw, which cannot be told from trained weights: force_init says to write it
    health = GradHealth(init="orthogonal", custom={"rnn.W_hh": 4}, force_init=True, log_every_n_steps=1, full_every_n_steps=1)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=1))
    trainer.fit(PLSequenceModel(build=LoopCell))
    assert trainer.global_step == 1
    assert [(row.parameter, row.role) for row in health.init_report] == [("rnn.W_hh", "recurrent")]
    assert set(health.spectra) == {"rnn.W_hh"}
