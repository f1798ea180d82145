"""GradHealth inside the forecasting libraries that own the Trainer: darts and neuralforecast.

They do to the callback what ``test_weights_and_pickles.py`` does by hand: darts pickles the
callbacks with the model and loads them with its own restricted unpickler, loads weights into a
new model before ``fit``, and refits deep copies in ``historical_forecasts(retrain=True)``;
neuralforecast deep-copies its models, callbacks included, and fits the copies. These tests run
the real libraries (``pip install lightning-gradhealth[integrations]``) on tiny synthetic series,
on CPU, and are skipped where a library is not installed.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import numpy as np
import pytest
import pytorch_lightning
import torch
from torch import Tensor

from lightning_gradhealth import GradHealth

REPORT_TABLE_HEADER = "init  radius start>end"
"""The column header of the full health report's table, printed once per full report."""


class FitSpy(pytorch_lightning.Callback):
    """Placed after GradHealth in the callbacks: the parameters as the first training step sees
    them (GradHealth initializes in ``on_fit_start``) and the optimizer steps of every fit.

    Both libraries deep-copy their callbacks; every copy of a spy is the spy itself, so the test
    reads what all the fits saw."""

    def __init__(self) -> None:
        self.weights: list[dict[str, Tensor]] = []
        self.steps: list[int] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> FitSpy:
        return self

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.weights.append({name: parameter.detach().clone() for name, parameter in pl_module.named_parameters()})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.steps.append(int(trainer.global_step))


def _orthonormal_gate_blocks(weight: Tensor, gates: int) -> bool:
    """Whether every gate block of ``weight`` (stacked along dim 0) has orthonormal columns, or
    orthonormal rows when it is wide (a one-column block of an LSTM with ``proj_size=1``: a unit vector)."""
    for block in weight.double().chunk(gates, dim=0):
        gram = block.T @ block if block.shape[0] >= block.shape[1] else block @ block.T
        if not torch.allclose(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-5):
            return False
    return True


def _gradhealth_warnings(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("GradHealth") and text in str(w.message)]


@contextlib.contextmanager
def _lightning_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture what GradHealth prints: Lightning's ``rank_zero_info`` logs to the
    ``pytorch_lightning`` logger, which does not propagate to the root logger that caplog watches."""
    lightning_logger = logging.getLogger("pytorch_lightning")
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
            yield
    finally:
        lightning_logger.removeHandler(caplog.handler)


# -- darts -------------------------------------------------------------------------------------


def _darts_series(length: int = 120) -> Any:
    """A noisy sine of period 12, float32, as a darts ``TimeSeries``."""
    from darts import TimeSeries

    values = np.sin(np.arange(length) * 2 * np.pi / 12) + 0.1 * np.random.default_rng(0).standard_normal(length)
    return TimeSeries.from_values(values.astype(np.float32))


def _darts_model(callbacks: list[Any], work_dir: Any, n_epochs: int = 1, random_state: int = 0) -> Any:
    """A small darts ``RNNModel`` (one LSTM layer of 8 units; 16-step chunks, batches of 16, so
    about 7 optimizer steps an epoch on the 120-point series), quiet, on CPU."""
    from darts.models import RNNModel

    return RNNModel(
        model="LSTM",
        hidden_dim=8,
        input_chunk_length=12,
        training_length=16,
        batch_size=16,
        n_epochs=n_epochs,
        random_state=random_state,
        work_dir=str(work_dir),
        pl_trainer_kwargs={
            "callbacks": callbacks,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
    )


def _gradhealth_of(model: Any) -> GradHealth:
    """The one GradHealth among a darts model's Trainer callbacks."""
    [health] = [callback for callback in model.trainer_params["callbacks"] if isinstance(callback, GradHealth)]
    return health


def test_darts_loads_a_saved_model_with_only_gradhealth_allow_listed(tmp_path):
    """``RNNModel.save`` pickles the Trainer's callbacks with the model, and ``RNNModel.load``
    unpickles them with darts' own restricted unpickler (torch's ``add_safe_globals`` does not
    apply there). A user allow-lists exactly one name, ``GradHealth``, and the model loads with a
    callback of the same settings, which keeps the loaded weights when the model trains on; also
    when the callback had already run a fit (a template reused for the next model), so the pickle
    holds its state as well. The allow-list is scoped with darts' ``safe_globals`` context
    manager and left empty."""
    pytest.importorskip("darts")
    from darts.models import RNNModel
    from darts.utils.serialization import get_safe_globals, safe_globals

    series = _darts_series()
    health = GradHealth(init="orthogonal", clip="norm", clip_val=0.5, log_every_n_steps=2)
    model = _darts_model([health], tmp_path)
    model.fit(series, verbose=False)
    path = str(tmp_path / "rnn.pt")
    model.save(path)

    with pytest.raises(Exception, match=r"global `lightning_gradhealth\.callback\.GradHealth` is not allow-listed"):
        RNNModel.load(path)  # darts' safe loader by default: GradHealth is the only name it has to be told
    with safe_globals([GradHealth]):
        loaded = RNNModel.load(path)
    assert get_safe_globals() == []
    copy = _gradhealth_of(loaded)
    assert copy is not health
    assert copy.init_config == health.init_config and copy.monitor.config == health.monitor.config
    assert (copy.init, copy.clip, copy.clip_val, copy.log_every_n_steps) == ("orthogonal", "norm", 0.5, 2)

    spy = FitSpy()  # training the loaded model goes on from the saved weights: its GradHealth keeps them
    loaded.trainer_params["callbacks"].append(spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.fit(series, verbose=False)
    [seen] = spy.weights
    assert all(torch.equal(seen[name], parameter) for name, parameter in model.model.named_parameters())
    assert not copy.init_applied and len(_gradhealth_warnings(caught, "init keeps the weights of 'rnn'")) == 1

    assert health.init_applied and health.health_report is not None
    first_seed = health.init_seed
    reused = _darts_model([health], tmp_path)  # darts copies the callback, state included, at construction
    reused.fit(series, verbose=False)
    reused_path = str(tmp_path / "reused.pt")
    reused.save(reused_path)
    with safe_globals([GradHealth]):
        reloaded = RNNModel.load(reused_path)
    assert get_safe_globals() == []
    copy = _gradhealth_of(reloaded)
    assert copy.init_applied and copy.init_seed == first_seed
    assert copy.monitor.config == health.monitor.config


def test_darts_load_weights_then_fit_keeps_the_loaded_weights_and_a_fresh_model_is_initialized(tmp_path):
    """Fine-tuning in darts: ``load_weights`` builds the LightningModule and loads the saved state
    dict before ``fit``, which then starts a Trainer without a checkpoint path, so nothing but the
    values says the weights were trained. ``GradHealth(init="orthogonal")`` keeps them (the spy,
    after GradHealth, sees exactly the loaded weights) and warns once, naming the layer. A model
    built fresh, with PyTorch's default init, is initialized: no misfire the other way."""
    pytest.importorskip("darts")

    series = _darts_series()
    pretrained = _darts_model([], tmp_path, n_epochs=10)  # 70 optimizer steps, no GradHealth
    pretrained.fit(series, verbose=False)
    path = str(tmp_path / "pretrained.pt")
    pretrained.save(path)
    saved = {name: parameter.detach().clone() for name, parameter in pretrained.model.named_parameters()}

    health, spy = GradHealth(init="orthogonal"), FitSpy()
    tuned = _darts_model([health, spy], tmp_path, random_state=1)
    tuned.load_weights(path)  # darts' safe loader is enough: the saved model holds no GradHealth
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned.fit(series, verbose=False)
    [seen] = spy.weights
    assert set(seen) == set(saved) and "rnn.weight_hh_l0" in seen
    assert all(torch.equal(seen[name], saved[name]) for name in saved), "the loaded weights were overwritten"
    assert health.init_report == [] and not health.init_applied
    [message] = _gradhealth_warnings(caught, "init keeps the weights of")
    assert message.startswith("GradHealth: init keeps the weights of 'rnn' (")
    assert message.endswith("To initialize these too: GradHealth(init='orthogonal', force_init=True).")

    fresh_health, fresh_spy = GradHealth(init="orthogonal"), FitSpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _darts_model([fresh_health, fresh_spy], tmp_path, random_state=1).fit(series, verbose=False)
    assert fresh_health.init_applied and "rnn.weight_hh_l0" in [record.parameter for record in fresh_health.init_report]
    assert _orthonormal_gate_blocks(fresh_spy.weights[0]["rnn.weight_hh_l0"], gates=4)
    assert _gradhealth_warnings(caught, "init keeps the weights of") == []


def test_darts_historical_forecasts_refits_copies_and_the_users_object_holds_the_latest_results(tmp_path, caplog):
    """``historical_forecasts(retrain=True)`` builds a new model from ``copy.deepcopy`` of the
    model's parameters for every forecast point, so every fit runs a copy of the GradHealth the
    user created, never the object itself. That object holds the latest refit's report and
    norms afterwards, and the copies share the once-only messages: the full report prints for
    the first fit, one line for each later one."""
    pytest.importorskip("darts")

    series = _darts_series()
    health, spy = GradHealth(), FitSpy()
    model = _darts_model([health, spy], tmp_path)
    with _lightning_log(caplog), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.historical_forecasts(series, start=80, forecast_horizon=1, stride=15, retrain=True, verbose=False)
    assert len(spy.steps) == 3 and spy.steps[0] < spy.steps[-1]  # three refits on growing series
    assert health.health_report is not None, "the results of the library's copies did not reach the user's object"
    assert health.health_report.step == spy.steps[-1]  # the latest refit's
    assert set(health.timestep_grad_norms) == {"rnn.l0", "rnn.l0.cell"}
    assert all(norms.shape == (16,) and bool(torch.isfinite(norms).all()) for norms in health.timestep_grad_norms.values())
    printed = caplog.text
    assert printed.count(REPORT_TABLE_HEADER) == 1, printed
    assert "(fit 2; the table is in health_report)" in printed and "(fit 3; the table is in health_report)" in printed
    assert len(_gradhealth_warnings(caught, "no TensorBoard logger")) == 1


# -- neuralforecast ------------------------------------------------------------------------------


def _neuralforecast_frame(series: int = 2, length: int = 60) -> Any:
    """``series`` noisy daily sines of period 7 in neuralforecast's long format."""
    import pandas as pd

    rng = np.random.default_rng(0)
    return pd.concat(
        pd.DataFrame(
            {
                "unique_id": f"s{i}",
                "ds": pd.date_range("2020-01-01", periods=length, freq="D"),
                "y": np.sin(np.arange(length) * 2 * np.pi / 7 + i) + 0.1 * rng.standard_normal(length),
            }
        )
        for i in range(series)
    )


@pytest.mark.parametrize("recurrent", [False, True], ids=["direct", "recurrent-proj_size-1"])
def test_neuralforecast_fits_a_copy_and_the_users_object_holds_its_results(recurrent):
    """``NeuralForecast(models=[...])`` deep-copies the models with their trainer kwargs,
    callbacks included, and fits the copies. The GradHealth the user passed holds the fit's
    report, per-timestep norms and init rows afterwards. Init applies on the fresh model, built
    with PyTorch's default init: the spy after GradHealth sees orthonormal gate blocks, also in
    the ``recurrent=True`` model, an ``nn.LSTM`` with ``proj_size=1``."""
    pytest.importorskip("neuralforecast")
    from neuralforecast import NeuralForecast
    from neuralforecast.models import LSTM

    health, spy = GradHealth(init="orthogonal"), FitSpy()
    model = LSTM(
        h=4,
        input_size=12,
        max_steps=5,
        encoder_hidden_size=8,
        decoder_hidden_size=8,
        recurrent=recurrent,
        callbacks=[health, spy],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    forecaster = NeuralForecast(models=[model], freq="D")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forecaster.fit(_neuralforecast_frame())
    assert forecaster.models[0] is not model  # the library fit a copy
    assert health.health_report is not None, "the results of the library's copy did not reach the user's object"
    assert health.health_report.step == spy.steps[-1] == 5
    layers = {f"hist_encoder.l{layer}{state}" for layer in (0, 1) for state in ("", ".cell")}
    assert set(health.timestep_grad_norms) == layers
    assert all(norms.numel() > 0 and bool(torch.isfinite(norms).all()) for norms in health.timestep_grad_norms.values())

    assert health.init_applied and _gradhealth_warnings(caught, "init keeps the weights of") == []
    initialized = {record.parameter for record in health.init_report}
    assert {"hist_encoder.weight_hh_l0", "hist_encoder.weight_hh_l1"} <= initialized
    [seen] = spy.weights
    for layer in (0, 1):
        assert _orthonormal_gate_blocks(seen[f"hist_encoder.weight_hh_l{layer}"], gates=4)
        if recurrent:
            assert f"hist_encoder.weight_hr_l{layer}" in initialized
            assert _orthonormal_gate_blocks(seen[f"hist_encoder.weight_hr_l{layer}"], gates=1)
