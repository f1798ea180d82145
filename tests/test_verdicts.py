"""Verdicts that tell the layer from the loss, advice that fits the layer, finite scalars only, and
the final spectra and pictures at the last step of a fit: each on a real fit, read back from
GradHealth's report, its warnings and TensorBoard's own event reader."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth, defaults, tags
from lightning_gradhealth.config import MonitorConfig
from lightning_gradhealth.health import LayerKind, advice, layer_verdict, summarize_timesteps
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.layers import find_recurrent_weights
from lightning_gradhealth.probe import ProbeResult
from lightning_gradhealth.trackers import Notices, SpectrumTracker, TimestepTracker

HIDDEN, STEPS = 16, 40


class RecentWindowModel(pytorch_lightning.LightningModule):
    """A tanh RNN whose loss reads only the last ``window`` steps, and only from the units of a
    fast-forgetting block of its recurrent matrix; the other block is the identity, which carries a
    perturbation of the state over the whole sequence unchanged (small inputs keep tanh linear)."""

    def __init__(self, window: int = 10) -> None:
        super().__init__()
        self.window = window
        self.rnn = nn.RNN(3, HIDDEN, batch_first=True)
        half = HIDDEN // 2
        with torch.no_grad():
            recurrent = torch.zeros(HIDDEN, HIDDEN)
            recurrent[:half, :half] = torch.eye(half)  # carries
            recurrent[half:, half:] = 0.1 * torch.linalg.qr(torch.randn(half, half))[0]  # forgets, x0.1 per step
            self.rnn.weight_hh_l0.copy_(recurrent)
            self.rnn.weight_ih_l0.mul_(0.02)
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
        self.head = nn.Linear(HIDDEN - half, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        output, _ = self.rnn(x)
        recent = output[:, -self.window :, HIDDEN // 2 :]
        return nn.functional.mse_loss(self.head(recent).squeeze(-1), y[:, -self.window :])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, STEPS, 3, generator=generator)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[..., 0]), batch_size=16)


def _fit(model: pytorch_lightning.LightningModule, health: GradHealth, **overrides) -> list[str]:
    """A real fit; GradHealth's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(**overrides)).fit(model)
    return [str(w.message) for w in caught if str(w.message).startswith("GradHealth")]


def test_a_layer_that_carries_under_a_loss_on_the_last_steps_is_healthy_not_vanishing():
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1)
    notices = _fit(RecentWindowModel(), health, max_steps=3)
    (layer,) = health.health_report.layers
    # the gradient the loss sends fades ~x0.1 per step before the window: by transmission alone, vanishing
    assert layer.timesteps.transmission < math.log10(1e-3)
    # but the identity block carries: lambda_1 near 0, so the loss, not the layer, asks for short memory
    assert abs(layer.lyapunov_max) < 0.02
    assert layer.verdict == "healthy" and layer.reason.startswith("the loss asks for short memory only")
    assert health.health_report.healthy and "needs attention" not in health.health_report.format()
    assert layer.advice is None
    assert not [notice for notice in notices if "vanishing" in notice]


def test_a_layer_that_forgets_is_still_vanishing_with_its_own_numbers():
    torch.manual_seed(0)
    model = PLSequenceModel(build=lambda: nn.RNN(3, 8, batch_first=True), seq_len=40)
    health = GradHealth(init="uniform", log_every_n_steps=1)
    notices = _fit(model, health, max_steps=2)
    (layer,) = health.health_report.layers
    assert layer.lyapunov_max < -1  # the small uniform init contracts every perturbation
    assert layer.verdict == "vanishing" and "the layer itself forgets: lambda_1" in layer.reason
    assert f"sigma_max of weight_hh is {layer.spectrum_end.sigma_max:.3g} < 1" in layer.reason
    assert not health.health_report.healthy
    (notice,) = [notice for notice in notices if "vanishing gradients through time" in notice]
    assert "The layer itself forgets" in notice
    # a tanh RNN with a naive init: a carrying init and a gated cell are the advice
    assert 'GradHealth(init="orthogonal")' in notice and "an LSTM or GRU instead of a plain RNN" in notice
    assert layer.advice in health.health_report.format().replace("\n    ", " ")


def test_advice_for_an_orthogonal_gru_keeps_to_what_it_is_not_and_is_a_wrapped_paragraph():
    torch.manual_seed(0)
    model = PLSequenceModel(build=lambda: nn.GRU(3, 8, batch_first=True), seq_len=100)
    health = GradHealth(init="orthogonal", log_every_n_steps=1)
    notices = _fit(model, health, max_steps=2)
    (layer,) = health.health_report.layers
    assert layer.init == "orthogonal" and layer.verdict == "vanishing"  # a GRU at init forgets in a few steps
    (notice,) = [notice for notice in notices if "vanishing gradients through time" in notice]
    for said in (notice, layer.advice, health.health_report.format()):
        assert 'init="orthogonal"' not in said and "instead of a plain RNN" not in said
    assert "GRU, orthogonal init" in layer.advice and "update-gate bias" in layer.advice
    assert all(len(line) <= 100 for line in notice.splitlines()) and len(notice.splitlines()) >= 3
    assert all(len(line) <= 100 for line in health.health_report.format().splitlines() if line.startswith("    "))


@pytest.mark.parametrize(
    ("kind", "present", "absent"),
    [
        (LayerKind("rnn_tanh", None), ['init="orthogonal"', "an LSTM or GRU"], ["chrono", "update-gate"]),
        (LayerKind("rnn_relu", "orthogonal"), ['init="identity"', "an LSTM or GRU"], ['init="orthogonal"']),
        (LayerKind("lstm", "glorot (fan 8+8)"), ['init="orthogonal"', "chrono_t_max=50"], ["an LSTM or GRU", "update-gate"]),
        (LayerKind("gru", "identity"), ["update-gate bias"], ["init=", "an LSTM or GRU", "chrono_t_max"]),
    ],
)
def test_vanishing_advice_follows_the_cell_type_and_the_init(kind, present, absent):
    said = advice("vanishing", kind, steps=50)
    assert all(part in said for part in present) and not any(part in said for part in absent)


def test_exploding_advice_leaves_out_clipping_that_is_on_and_the_init_the_layer_has():
    said = advice("exploding", LayerKind("lstm", "orthogonal", clipping=True))
    assert "a lower clip_val" in said and 'clip="norm"' not in said and 'init="orthogonal"' not in said
    assert 'clip="norm"' in advice("exploding", LayerKind("lstm", None)) and "check" in advice("nonfinite")


def test_a_gradient_growing_back_through_a_contracting_layer_is_the_loss_not_exploding():
    growing = summarize_timesteps(torch.tensor([1e4, 1e2, 1.0], dtype=torch.float64))
    assert layer_verdict(growing)[0] == "exploding"
    assert layer_verdict(growing, lyapunov_max=0.5)[0] == "exploding"
    verdict, reason = layer_verdict(growing, lyapunov_max=-0.2)
    assert verdict == "healthy" and reason.startswith("the loss weighs early steps more")


def test_nan_gradients_through_time_and_nan_weights_send_no_nonfinite_scalar():
    key = LayerKey("rnn", 0)
    tracker = TimestepTracker(MonitorConfig(), Notices(warn=lambda message: None))
    output = tracker.update(ProbeResult({key: torch.tensor([float("nan"), 1.0, 2.0])}, {key: 0.1}), step=0)
    assert output.scalars and all(math.isfinite(value) for value in output.scalars.values())
    assert not any(tag.endswith("dh_norm_first") for tag in output.scalars)
    rnn = nn.RNN(3, 4)
    with torch.no_grad():
        rnn.weight_hh_l0[0, 0] = float("nan")
    said: list[str] = []
    spectra = SpectrumTracker(Notices(warn=said.append))
    records = find_recurrent_weights(nn.ModuleDict({"rnn": rnn}))
    for full in (True, False):
        scalars = spectra.update(records, step=0, full=full).scalars
        assert all(math.isfinite(value) for value in scalars.values())
        assert scalars[tags.layer_tag(LayerKey("rnn", 0), "nonfinite_weight_blocks")] == 1.0
    assert len(said) == 1 and "not logged" in said[0]


@pytest.mark.parametrize("pictures_after_seconds, picture_steps", [(0.0, [30]), (3600.0, [])])
def test_the_last_step_of_a_short_fit_has_the_final_spectra_and_pictures_in_tensorboard(
    tmp_path, monkeypatch, pictures_after_seconds, picture_steps
):
    """The final spectra always; the final pictures after FINAL_PICTURES_AFTER_SECONDS of training."""
    monkeypatch.setattr(defaults, "FINAL_PICTURES_AFTER_SECONDS", pictures_after_seconds)
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth()  # the defaults: a full pass at step 0 only, under Lightning's log_every_n_steps=50
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=30, logger=logger)).fit(PLSequenceModel())
    events = tensorboard_events(logger.log_dir)
    final = health.monitor.spectra["rnn.weight_hh_l0"]
    for index, gate in enumerate("ifgo"):
        for name in ("sigma_max", "spectral_radius"):
            logged = events.Scalars(tags.gate_tag(LayerKey("rnn", 0), gate, name))
            assert [event.step for event in logged] == [0, 30]
            assert logged[-1].value == pytest.approx(float(getattr(final, name)[index]), rel=1e-6)
    for scalars in (events.Scalars(tag) for tag in events.Tags()["scalars"] if tag.startswith("gradhealth/")):
        assert all(math.isfinite(event.value) for event in scalars)
    for picture in ("eigenvalues", "timestep_grad_norms", "timestep_heatmap"):
        tag = tags.layer_tag(LayerKey("rnn", 0), picture)
        drawn = [image.step for image in events.Images(tag)] if tag in events.Tags()["images"] else []
        assert drawn == picture_steps
