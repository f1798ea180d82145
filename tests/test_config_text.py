"""The configuration text in TensorBoard shows the init settings that were applied, and only those."""

from __future__ import annotations

import pytest
import pytorch_lightning
from pytorch_lightning.loggers import TensorBoardLogger

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth, InitConfig
from lightning_gradhealth.config import init_settings_in_effect

RECURRENT_ONLY = ("input_init", "gain", "forget_bias", "chrono_t_max")


NOTHING = "'nothing: init=None and linear_init=None leave every weight as it was'"
LINEAR_ONLY = "'nn.Linear layers only (linear_init): init=None leaves the recurrent layers as they were'"


def _config_rows(log_dir) -> dict[str, str]:
    """The ``gradhealth/config`` table as TensorBoard stored it: setting -> the value's text."""
    [event] = tensorboard_events(log_dir).Tensors("gradhealth/config/text_summary")
    lines = event.tensor_proto.string_val[0].decode().splitlines()[2:]  # below the header rows
    cells = [line.strip("|").split("|") for line in lines]
    return {name.strip(): value.strip().strip("`") for name, value in cells}


@pytest.mark.parametrize(
    "arguments, shown, left_out",
    [
        (
            {},
            {"init": "None", "linear_init": "None", "initialized": NOTHING},
            {*RECURRENT_ONLY, "uniform_scale", "exclude", "seed", "force_init"},
        ),
        (
            {"linear_init": "he", "seed": 3},
            {"init": "None", "linear_init": "'he'", "seed": "3", "initialized": LINEAR_ONLY},
            {*RECURRENT_ONLY, "uniform_scale"},
        ),
        (
            {"init": "orthogonal", "seed": 3},
            {"init": "'orthogonal'", "input_init": "'glorot'", "gain": "1.0", "forget_bias": "1.0", "seed": "3"},
            {"uniform_scale", "initialized"},
        ),
    ],
    ids=["nothing", "linear-only", "recurrent"],
)
def test_the_configuration_text_shows_what_init_applied(tmp_path, arguments, shown, left_out):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    pytorch_lightning.Trainer(callbacks=[GradHealth(**arguments)], **trainer_kwargs(max_steps=1, logger=logger)).fit(
        PLSequenceModel()
    )
    rows = _config_rows(logger.log_dir)
    assert {name: rows.get(name) for name in shown} == shown
    assert not left_out & set(rows)
    assert rows["clip"] == "None" and rows["layers"] == "'rnn.l0'"  # the monitor's settings are all there


def test_chrono_biases_replace_the_forget_bias_and_a_uniform_scheme_shows_its_scale():
    chrono = init_settings_in_effect(InitConfig(init="orthogonal", chrono_t_max=100), seed=0)
    assert chrono["chrono_t_max"] == 100 and "forget_bias" not in chrono
    uniform = (InitConfig(init="uniform"), InitConfig(init="orthogonal", input_init="uniform"), InitConfig(linear_init="uniform"))
    for config in uniform:
        assert init_settings_in_effect(config, seed=0)["uniform_scale"] == 0.01
    assert "uniform_scale" not in init_settings_in_effect(InitConfig(init="orthogonal"), seed=0)
