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
from lightning_gradhealth.figures import timestep_curve_figure, timestep_curve_image, timestep_heatmap_image
from lightning_gradhealth.defaults import MEMORY_STEPS
from lightning_gradhealth.health import SHORT_MEMORY, LayerKind, advice, layer_verdict, summarize_timesteps
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.layers import find_recurrent_weights
from lightning_gradhealth.probe import ProbeResult
from lightning_gradhealth.trackers import Notices, SpectrumTracker, TimestepTracker

HIDDEN, STEPS = 16, 40
STEPS_GRU = 60


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
    memory = math.log(1e-3) / layer.lyapunov_max
    assert layer.verdict == "vanishing" and "the layer itself forgets: lambda_1" in layer.reason
    assert f"keeps a gradient within 10^-3 for {memory:.1f} steps, fewer than {MEMORY_STEPS}" in layer.reason
    assert f"sigma_max of weight_hh is {layer.spectrum_end.sigma_max:.3g} < 1" in layer.reason
    assert not health.health_report.healthy and "needs attention" in health.health_report.format()
    (notice,) = [notice for notice in notices if "vanishing gradients through time" in notice]
    assert "The layer itself forgets" in notice and "fewer than 10" in notice
    # a tanh RNN with a naive init: a carrying init and a gated cell are the advice
    assert 'GradHealth(init="orthogonal")' in notice and "an LSTM or GRU instead of a plain RNN" in notice
    assert layer.advice in health.health_report.format().replace("\n    ", " ")
    # the notice and the report's advice are paragraphs wrapped to 100 characters
    assert all(len(line) <= 100 for line in notice.splitlines()) and len(notice.splitlines()) >= 3
    assert all(len(line) <= 100 for line in health.health_report.format().splitlines() if line.startswith("    "))


def _saturated_rnn() -> nn.Module:
    rnn = nn.RNN(3, 16, batch_first=True)
    with torch.no_grad():
        rnn.weight_ih_l0.mul_(30)  # inputs drive most tanh units to +-1
    return rnn


@pytest.mark.parametrize(
    ("build", "settings", "verdict"),
    [
        (_saturated_rnn, {}, "vanishing"),
        (lambda: nn.RNN(3, 16, batch_first=True), {"init": "orthogonal", "gain": 3.0}, "exploding"),
    ],
    ids=["saturated", "chaotic"],
)
def test_a_layer_broken_whatever_the_loss_still_needs_attention(build, settings, verdict):
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1, **settings)
    notices = _fit(PLSequenceModel(build=build, output_width=16, seq_len=STEPS_GRU), health, max_steps=1)
    (layer,) = health.health_report.layers
    assert layer.verdict == verdict and not health.health_report.healthy
    assert [notice for notice in notices if f"{verdict} gradients through time" in notice]
    if verdict == "vanishing":  # saturated: the units pass almost no gradient, the layer forgets within a few steps
        assert layer.saturation > 0.5 and math.log(1e-3) / layer.lyapunov_max < MEMORY_STEPS
    else:  # orthogonal x3: chaotic, every perturbation grows
        assert layer.lyapunov_max > 0 and layer.timesteps.transmission > 3


def test_the_memory_rule_follows_lambda_1_against_the_sequence_and_memory_steps():
    decaying = summarize_timesteps(torch.logspace(-7, 0, STEPS_GRU, dtype=torch.float64))

    def memory_of(steps: float) -> float:
        """The lambda_1 of a layer that keeps a gradient within 1e-3 for ``steps`` steps."""
        return math.log(1e-3) / steps

    assert layer_verdict(decaying, lyapunov_max=memory_of(STEPS_GRU - 0.95))[0] == "healthy"  # carries across the sequence
    assert layer_verdict(decaying, lyapunov_max=memory_of(STEPS_GRU - 1.05))[0] == "short memory"
    assert layer_verdict(decaying, lyapunov_max=memory_of(MEMORY_STEPS + 0.05))[0] == "short memory"
    assert layer_verdict(decaying, lyapunov_max=memory_of(MEMORY_STEPS - 0.05))[0] == "vanishing"
    assert layer_verdict(decaying, lyapunov_max=float("-inf"))[0] == "vanishing"
    assert layer_verdict(decaying)[0] == "vanishing"  # without lambda_1: not told apart, the transmission decides
    # a short memory that saturates is saturating, a problem of the layer
    assert layer_verdict(decaying, saturation=0.9, lyapunov_max=memory_of(20))[0] == "saturating"
    # a sequence shorter than MEMORY_STEPS: the layer must carry across it
    short = summarize_timesteps(torch.logspace(-4, 0, 5, dtype=torch.float64))
    assert layer_verdict(short, lyapunov_max=memory_of(4.05))[0] == "healthy"
    assert layer_verdict(short, lyapunov_max=memory_of(3.95))[0] == "vanishing"
    said = advice(SHORT_MEMORY, LayerKind("rnn_tanh", "orthogonal"), steps=60, memory=20.4)
    assert said.startswith("If the task needs dependencies longer than about 20 steps") and "shorter sequence" not in said


class GRUEncoder(pytorch_lightning.LightningModule):
    """A GRU encoder on random inputs whose loss reads a head over its last ``window`` outputs only:
    a healthy model whose loss ignores the early steps."""

    def __init__(self, steps: int = STEPS_GRU, hidden: int = 32, window: int = 10, bidirectional: bool = False) -> None:
        super().__init__()
        self.steps, self.window = steps, window
        self.rnn = nn.GRU(4, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(2 * hidden if bidirectional else hidden, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        output, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(output[:, -self.window :]).squeeze(-1), y[:, -self.window :])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, self.steps, 4, generator=generator)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[..., 0].cumsum(1) / 5), batch_size=16)


@pytest.mark.parametrize("init", [None, "orthogonal"])
def test_a_healthy_gru_whose_loss_ignores_early_steps_is_not_flagged_and_its_short_memory_is_told(init):
    torch.manual_seed(0)
    health = GradHealth(init=init, log_every_n_steps=10)
    notices = _fit(GRUEncoder(), health, max_steps=20)
    report = health.health_report
    (layer,) = report.layers
    # the gradient the loss sends fades ~x0.7 per step over the 50 steps before the window
    assert layer.timesteps.transmission < -4
    # the GRU forgets within a few steps (lambda_1 about -0.3 to -0.5), but keeps a gradient 1000x for more than 10
    memory = math.log(1e-3) / layer.lyapunov_max
    assert -0.6 < layer.lyapunov_max < -0.2 and MEMORY_STEPS <= memory < STEPS_GRU - 1
    assert layer.verdict == "short memory" and layer.advice is None
    assert layer.reason.startswith(f"the layer keeps a gradient within 10^-3 for {memory:.1f} steps")
    assert f"1/|lambda_1| = {-1 / layer.lyapunov_max:.2g} steps" in layer.reason
    assert f"If the task needs dependencies longer than about {memory:.0f} steps" in layer.reason
    assert "update-gate bias" in layer.reason and "GRU" in layer.reason
    assert ('init="orthogonal"' in layer.reason) == (init is None)  # what it has already is left out
    assert report.healthy and "needs attention" not in report.format()
    assert "healthy; short memory in rnn.l0" in report.format().splitlines()[0]
    assert not [notice for notice in notices if "gradients through time" in notice]


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


class NaNAtOneStep(PLSequenceModel):
    """The test model whose loss is NaN at optimizer step ``nan_step``; its own hook, which runs after
    GradHealth's, zeroes NaN/Inf gradients (as a GradScaler skips such a step), so that the weights
    stay finite and the other steps measure as usual."""

    def __init__(self, nan_step: int) -> None:
        super().__init__(seq_len=12)
        self.nan_step = nan_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for param in self.parameters():
            if param.grad is not None:
                torch.nan_to_num_(param.grad, nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("clip", [None, "norm", "value"])
def test_a_step_with_nan_gradients_sends_no_nonfinite_scalar_and_is_counted(tmp_path, clip):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(log_every_n_steps=1, on_nonfinite="warn", clip=clip, clip_val=1.0 if clip else None)
    _fit(NaNAtOneStep(nan_step=2), health, max_steps=4, logger=logger)
    events = tensorboard_events(logger.log_dir)
    scalar_tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("gradhealth/")]
    for tag in scalar_tags:
        assert all(math.isfinite(event.value) for event in events.Scalars(tag)), tag
    # the step is counted, and its norms and clipping statistics are left out, not logged as NaN
    assert [(event.step, event.value) for event in events.Scalars(tags.NONFINITE_STEPS)] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert health.health_report.nonfinite_steps == 1 and not health.health_report.healthy
    assert [event.step for event in events.Scalars(tags.grad_norm_tag("total"))] == [0, 1, 3]
    assert [event.step for event in events.Scalars(tags.layer_tag(LayerKey("rnn", 0), "weight_grad_norm"))] == [0, 1, 3]
    if clip is not None:
        for name in ("total_clipped",):
            assert [event.step for event in events.Scalars(tags.grad_norm_tag(name))] == [0, 1, 3]
        assert [event.step for event in events.Scalars(tags.clip_tag("coefficient"))] == [0, 1, 3]
        assert [event.step for event in events.Scalars(tags.clip_tag("clipped_steps_fraction"))] == [0, 1, 2, 3]
    # the clip suggestion learned from the three finite norms only
    suggester = health.monitor.gradient_tracker.clip_suggester.state_dict()
    assert suggester["count"] == 3
    logged = sorted(event.value for event in events.Scalars(tags.grad_norm_tag("total")))
    assert sorted(norm for norm in suggester["norms"] if math.isfinite(norm)) == pytest.approx(logged, rel=1e-6)


def test_the_pictures_of_a_backward_direction_are_relative_to_input_position_0():
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1)
    _fit(GRUEncoder(steps=12, hidden=8, window=12, bidirectional=True), health, max_steps=2)  # a loss on every output
    pictures = health.monitor.timestep_tracker.pictures(step=2).pictures
    for key in (LayerKey("rnn", 0), LayerKey("rnn", 0, reverse=True)):
        norms = health.timestep_grad_norms[str(key)]
        curve = pictures[tags.layer_tag(key, "timestep_grad_norms")]
        heatmap = pictures[tags.layer_tag(key, "timestep_heatmap")]
        assert curve.reverse == heatmap.reverse == key.reverse
        # the reference is the direction's last step: input position 0 backward, T - 1 forward
        reference = float(norms[0 if key.reverse else -1])
        figure = timestep_curve_figure(curve.norms, curve.title, curve.step, curve.cell_states, curve.reverse)
        assert any(f"(at T: {reference:.3g})" in text.get_text() for text in figure.axes[0].get_legend().get_texts())
        assert ("T = input position 0" if key.reverse else "T = the last step") in figure.axes[0].get_title()
        drawn_curve = curve.render()
        assert (drawn_curve == timestep_curve_image(curve.norms, curve.title, curve.step, curve.cell_states, key.reverse)).all()
        drawn, rows = heatmap.render(), (heatmap.steps, heatmap.rows, heatmap.title, heatmap.timesteps)
        assert (drawn == timestep_heatmap_image(*rows, reverse=key.reverse)).all()
        assert (drawn != timestep_heatmap_image(*rows, reverse=not key.reverse)).any()
