"""What production training does around GradHealth: pretrained, loaded and frozen weights,
pickles of the callback, copies of it, and resumed runs into a new log directory."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import pickletools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs, weights
from lightning_gradhealth import GradHealth, initialize_
from lightning_gradhealth.layers import find_recurrent_weights
from lightning_gradhealth.provenance import fresh_pattern, trained_modules


class WeightsAtTrainStart(pytorch_lightning.Callback):
    """The weights as the first step sees them (GradHealth initializes in ``on_fit_start``)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = weights(pl_module)


def _train(model: PLSequenceModel, steps: int = 20) -> PLSequenceModel:
    """Train ``model`` without GradHealth, as a pretraining run would."""
    pytorch_lightning.Trainer(**trainer_kwargs(max_steps=steps, max_epochs=-1)).fit(model)
    return model


def _fit_with(health: GradHealth, model: PLSequenceModel, **kwargs) -> WeightsAtTrainStart:
    recorder = WeightsAtTrainStart()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health, recorder], **trainer_kwargs(max_steps=1, **kwargs)).fit(model)
    recorder.warnings = [str(w.message) for w in caught if "GradHealth" in str(w.message)]
    return recorder


# -- fresh or trained: the values are the evidence ---------------------------------------------


@pytest.mark.parametrize("layer", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}, {"hidden_size": 64}])
def test_pytorch_default_init_is_fresh_and_a_few_optimizer_steps_are_not(layer, options):
    options = dict(options)
    hidden_size = options.pop("hidden_size", 16)
    for seed in range(10):  # fresh draws are never taken for trained ones
        torch.manual_seed(seed)
        module = layer(6, hidden_size, **options)
        assert trained_modules(module) == {}, seed
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(10):
        optimizer.zero_grad()
        module(torch.randn(5, 2, 6))[0].pow(2).mean().backward()  # this loss pulls weights inward
        optimizer.step()
    assert list(trained_modules(module)) == [""]


@pytest.mark.parametrize("seed", range(5))
def test_default_weights_trained_past_their_bound_are_not_taken_for_a_wider_fresh_draw(seed):
    """A short pretraining (21 Adam steps, as a forecasting library's first epochs) pushes a few
    entries of a small layer past PyTorch's bound, where they could pass for a Glorot draw; the
    biases that kept PyTorch's default say otherwise."""
    torch.manual_seed(seed)
    rnn, head = nn.LSTM(1, 8, batch_first=True), nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
    x = torch.randn(32, 12, 1)
    for _ in range(21):
        optimizer.zero_grad()
        nn.functional.mse_loss(head(rnn(x)[0][:, -1]), x.sum(1)).backward()
        optimizer.step()
    assert list(trained_modules(rnn)) == [""]


@pytest.mark.parametrize("scheme", ["orthogonal", "glorot", "identity", "uniform"])
def test_gradhealths_own_bounded_and_structured_inits_are_fresh(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(6, 16, num_layers=2), nn.GRU(16, 8))
    for chrono in (None, 50):
        initialize_(model, scheme, chrono_t_max=chrono)
        assert trained_modules(model, uniform_scale=0.01) == {}


def test_torch_inits_a_library_may_apply_are_fresh():
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 32, proj_size=8)
    for init in (nn.init.xavier_uniform_, nn.init.orthogonal_, nn.init.kaiming_uniform_):
        for name, parameter in lstm.named_parameters():
            init(parameter) if "weight" in name else nn.init.zeros_(parameter)
        assert trained_modules(lstm) == {}, init.__name__


def test_a_normal_init_cannot_be_told_from_training_and_is_kept():
    """Unbounded draws have no edge to test: the safe side is to keep them (README)."""
    rnn = nn.RNN(6, 32)
    nn.init.normal_(rnn.weight_hh_l0, std=0.3)
    [record] = [r for r in find_recurrent_weights(rnn) if r.param_name == "weight_hh_l0"]
    pattern, evidence = fresh_pattern(record)
    assert pattern is None and "beyond PyTorch's default bound 0.177" in evidence


# -- the three cases of the issue, and plain load_state_dict ----------------------------------


def test_frozen_pretrained_weights_are_never_written(caplog):
    torch.manual_seed(0)
    model = PLSequenceModel()
    model.rnn.requires_grad_(False)
    before = weights(model)
    lightning_logger = logging.getLogger("pytorch_lightning")
    lightning_logger.addHandler(caplog.handler)
    try:
        recorder = _fit_with(GradHealth(init="orthogonal", linear_init="he"), model)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert all(torch.equal(recorder.weights[name], before[name]) for name in before if name.startswith("rnn."))
    assert not torch.equal(recorder.weights["head.weight"], before["head.weight"])  # the head trains and is fresh
    assert "init leaves the 4 frozen parameters (requires_grad=False) as they are: rnn.weight_ih_l0" in caplog.text


def test_load_from_checkpoint_then_fit_keeps_the_trained_weights(tmp_path):
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(tmp_path, save_last=True)
    pytorch_lightning.Trainer(
        callbacks=[checkpoints], **trainer_kwargs(max_steps=20, max_epochs=-1, enable_checkpointing=True)
    ).fit(PLSequenceModel())
    model = PLSequenceModel.load_from_checkpoint(checkpoints.last_model_path)
    loaded = weights(model)
    health = GradHealth(init="orthogonal")
    recorder = _fit_with(health, model)
    assert all(torch.equal(recorder.weights[name], loaded[name]) for name in loaded)
    assert health.init_report == [] and not health.init_applied
    [message] = [m for m in recorder.warnings if "keeps the weights" in m]
    assert message.startswith("GradHealth: init keeps the weights of 'rnn' (weight_")
    assert "no other fresh-init pattern): they were loaded or trained before this fit" in message
    assert message.endswith("To initialize these too: GradHealth(init='orthogonal', force_init=True).")


def test_plain_load_state_dict_is_kept_and_force_init_overwrites():
    torch.manual_seed(0)
    pretrained = _train(PLSequenceModel())
    model = PLSequenceModel()
    model.load_state_dict(pretrained.state_dict())
    recorder = _fit_with(GradHealth(init="orthogonal"), model)
    assert torch.equal(recorder.weights["rnn.weight_hh_l0"], pretrained.rnn.weight_hh_l0)
    forced = _fit_with(GradHealth(init="orthogonal", force_init=True), model)
    blocks = forced.weights["rnn.weight_hh_l0"].view(4, 8, 8)
    assert torch.allclose(blocks @ blocks.transpose(1, 2), torch.eye(8).expand(4, 8, 8), atol=1e-5)


def test_a_model_pickled_after_training_and_loaded_is_kept():
    """A library's ``Model.load`` unpickles the whole model: its version counters start over."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(_train(PLSequenceModel()), buffer)
    buffer.seek(0)
    model = torch.load(buffer, weights_only=False)
    loaded = weights(model)
    recorder = _fit_with(GradHealth(init="orthogonal"), model)
    assert all(torch.equal(recorder.weights[name], loaded[name]) for name in loaded)


@pytest.mark.parametrize("seed", range(5))
def test_a_freshly_built_model_is_initialized(seed):
    torch.manual_seed(seed)
    health = GradHealth(init="orthogonal")
    recorder = _fit_with(health, PLSequenceModel())
    assert health.init_applied and [r.parameter for r in health.init_report][1] == "rnn.weight_hh_l0"
    assert not [m for m in recorder.warnings if "keeps the weights" in m]


# -- pickles, copies, resumed runs -------------------------------------------------------------


def test_the_callbacks_pickle_holds_settings_and_plain_data_and_loads_with_the_safe_loader(tmp_path):
    torch.manual_seed(0)
    health = GradHealth(init="orthogonal", clip="norm", clip_val=0.5, exclude=["rnn.bias_hh*"])
    _fit_with(health, PLSequenceModel())
    path = tmp_path / "model.pt"
    torch.save({"trainer_kwargs": {"callbacks": [health]}}, path)  # how a forecasting library saves it
    pickled = path.read_bytes()
    with torch.serialization._open_zipfile_reader(io.BytesIO(pickled)) as archive:
        data = archive.get_record("data.pkl" if archive.has_record("data.pkl") else archive.get_all_records()[0])
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL") and arg}
    assert not any("lightning_gradhealth" in str(name) and "GradHealth" not in str(name) for name in names)
    program = (
        "import sys, torch, lightning_gradhealth\n"
        f"health = torch.load({str(path)!r}, weights_only=True)['trainer_kwargs']['callbacks'][0]\n"
        "print(type(health).__name__, health.clip_val, health.exclude, health.init_applied)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["GradHealth", "0.5", "['rnn.bias_hh*']", "True"]


class Predicts(PLSequenceModel):
    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_the_object_the_user_holds_shows_the_results_of_its_copies(caplog):
    """neuralforecast deep-copies its models with their callbacks; retrain loops refit copies."""
    health = GradHealth(init="orthogonal")
    lightning_logger = logging.getLogger("pytorch_lightning")
    lightning_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(3):
                torch.manual_seed(seed)
                pytorch_lightning.Trainer(callbacks=[copy.deepcopy(health)], **trainer_kwargs(max_steps=2)).fit(
                    PLSequenceModel()
                )
    finally:
        lightning_logger.removeHandler(caplog.handler)
    model = Predicts()
    pytorch_lightning.Trainer(callbacks=[copy.deepcopy(health)], **trainer_kwargs()).predict(model, model.train_dataloader())
    assert health.health_report is not None and health.health_report.step == 2  # a copy that only predicted changed nothing
    assert set(health.timestep_grad_norms) == {"rnn.l0", "rnn.l0.cell"} and len(health.init_report) == 4
    printed = caplog.text
    assert printed.count("rnn.l0  weight_hh_l0  recurrent") == 1  # the init table once
    assert printed.count("rnn.l0: healthy: transmission") == 1  # the full report once, then one line per fit
    assert "(fit 3; the table is in health_report)" in printed
    assert sum("no TensorBoard logger" in str(w.message) for w in caught) == 1


def test_a_run_resumed_into_a_new_log_directory_gets_the_config_and_the_layout(tmp_path: Path):
    torch.manual_seed(0)
    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", save_last=True)
    first = TensorBoardLogger(tmp_path, name="run", version=0)
    pytorch_lightning.Trainer(
        callbacks=[GradHealth(log_every_n_steps=1), checkpoints],
        **trainer_kwargs(max_steps=3, logger=first, enable_checkpointing=True),
    ).fit(PLSequenceModel())
    resumed = TensorBoardLogger(tmp_path, name="run", version=1)
    pytorch_lightning.Trainer(
        callbacks=[GradHealth(log_every_n_steps=1)], **trainer_kwargs(max_steps=5, logger=resumed)
    ).fit(PLSequenceModel(), ckpt_path=checkpoints.last_model_path)
    events = tensorboard_events(resumed.log_dir)
    [config] = events.Tensors("gradhealth/config/text_summary")
    assert config.step == 3  # written where the resumed run starts
    [layout] = events.Tensors("custom_scalars__config__")
    assert b"gradhealth rnn.l0" in layout.tensor_proto.string_val[0] and b"transmission" in layout.tensor_proto.string_val[0]


# -- the edges found in review -----------------------------------------------------------------


class RootCell(pytorch_lightning.LightningModule):
    """A custom recurrent matrix on the root module itself, built with ``randn``."""

    def __init__(self) -> None:
        super().__init__()
        self.W_hh = nn.Parameter(0.1 * torch.randn(8, 8))
        self.W_xh = nn.Parameter(0.1 * torch.randn(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ self.W_xh.T + h @ self.W_hh.T)
        return nn.functional.mse_loss(h.sum(1, keepdim=True), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return PLSequenceModel().train_dataloader()


def test_a_kept_custom_matrix_on_the_root_module_does_not_stop_the_fit():
    torch.manual_seed(0)
    model = RootCell()
    before = model.W_hh.detach().clone()
    recorder = _fit_with(GradHealth(init="orthogonal", custom={"W_hh": 1}), model)
    assert torch.equal(recorder.weights["W_hh"], before)
    assert any("init keeps the weights of '' (W_hh: " in message for message in recorder.warnings)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fresh_layers_are_fresh(dtype):
    """Rounding the draw to the dtype moves its largest entry by up to one unit of the last place."""
    for seed in range(3):
        torch.manual_seed(seed)
        assert trained_modules(nn.LSTM(8, 512).to(dtype)) == {}
        assert trained_modules(nn.GRU(8, 64).to(dtype)) == {}


def test_tensors_without_values_to_judge_are_kept_without_failing():
    records = [
        r._replace(tensor=tensor) if hasattr(r, "_replace") else dataclasses.replace(r, tensor=tensor)
        for r, tensor in zip(
            find_recurrent_weights(nn.RNN(2, 4))[:3],
            (torch.empty(16, 2, device="meta"), torch.tensor(1.0), torch.ones(4, 4, dtype=torch.int64)),
        )
    ]
    for record in records:
        assert fresh_pattern(record)[0] is None


def test_a_deep_copy_keeps_one_copy_per_callback():
    health = GradHealth()
    first, second = copy.deepcopy([health, health])
    assert first is second and first is not health
