"""The end-of-fit health report: verdicts from numbers, saturation against states computed by
hand, and the report of a real fit against numpy, torch's clipping and TensorBoard's reader."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import numpy as np
import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth
from lightning_gradhealth.health import VERDICTS, layer_verdict, summarize_timesteps
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.probe import TimestepProbe


@pytest.mark.parametrize(
    ("norms", "saturation", "verdict", "reason_part"),
    [
        ([1e-6, 1e-3, 1.0], None, "vanishing", "falls 10^-6.0"),
        ([1e6, 1e3, 1.0], None, "exploding", "grows 10^+6.0"),
        ([float("nan"), 1.0], None, "exploding", "NaN/Inf"),
        ([0.5, 0.8, 1.0], 0.9, "saturating", "90% of tanh candidate units"),
        ([0.5, 0.8, 1.0], 0.1, "healthy", "10% of tanh units saturated"),
        ([1e-6, 1e-3, 1.0], 0.9, "vanishing", "90% of tanh units saturated"),
        ([1.0, 1.0, 0.0], None, "unmeasured", "the loss does not reach it through time"),
    ],
)
def test_verdicts_follow_the_numbers(norms, saturation, verdict, reason_part):
    summary = summarize_timesteps(torch.tensor(norms, dtype=torch.float64))
    got, reason = layer_verdict(summary, saturation)
    assert got == verdict and reason_part in reason


def test_no_measurement_is_unmeasured_not_healthy():
    assert layer_verdict(None)[0] == "unmeasured"


def _candidate_by_hand(lstm: nn.LSTM, x: torch.Tensor) -> torch.Tensor:
    """The LSTM's g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg) for every t, from its own outputs."""
    hidden = lstm.hidden_size
    output, _ = lstm(x)
    previous = torch.cat([torch.zeros_like(output[:1]), output[:-1]])
    rows = slice(2 * hidden, 3 * hidden)
    return torch.tanh(
        x @ lstm.weight_ih_l0[rows].T + lstm.bias_ih_l0[rows] + previous @ lstm.weight_hh_l0[rows].T + lstm.bias_hh_l0[rows]
    )


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm"])
def test_saturation_equals_the_fraction_of_saturated_candidates_computed_by_hand(cell):
    torch.manual_seed(0)
    layer = nn.RNN(4, 16) if cell == "rnn_tanh" else nn.LSTM(4, 16)
    with torch.no_grad():
        layer.weight_ih_l0.mul_(8)  # large inputs push a good share of units into saturation
    x = torch.randn(12, 5, 4)
    probe = TimestepProbe(nn.ModuleDict({"rnn": layer}))
    probe.attach()
    probe.arm()
    output, _ = layer(x)
    output.sum().backward()
    result = probe.compute()
    probe.detach()
    with torch.no_grad():
        candidates = output if cell == "rnn_tanh" else _candidate_by_hand(layer, x)
    expected = float((candidates.abs() > 0.99).double().mean())
    assert 0.05 < expected < 0.95
    assert result.saturation[LayerKey("rnn", 0)] == pytest.approx(expected, abs=1e-7)


def test_saturation_of_packed_sequences_counts_valid_steps_only():
    torch.manual_seed(0)
    layer = nn.RNN(4, 16)
    with torch.no_grad():
        layer.weight_ih_l0.mul_(8)
    x, lengths = torch.randn(10, 3, 4), torch.tensor([10, 6, 3])
    probe = TimestepProbe(nn.ModuleDict({"rnn": layer}))
    probe.attach()
    probe.arm()
    output, _ = layer(pack_padded_sequence(x, lengths))
    output.data.sum().backward()
    result = probe.compute()
    probe.detach()
    with torch.no_grad():
        states = torch.cat([layer(x[: int(n), b : b + 1])[0] for b, n in enumerate(lengths)])
    assert result.saturation[LayerKey("rnn", 0)] == pytest.approx(float((states.abs() > 0.99).double().mean()), abs=1e-7)


def _rnn() -> nn.Module:
    return nn.RNN(3, 8, batch_first=True)


class _Collect(logging.Handler):
    """Keeps the messages Lightning's console logger emits."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_report_of_a_real_fit_matches_numpy_torch_clipping_and_is_printed_and_written(tmp_path):
    torch.manual_seed(0)
    model = PLSequenceModel(build=_rnn)
    health = GradHealth(init="orthogonal", clip="norm", clip_val=1e-6, log_every_n_steps=2, full_every_n_steps=2)
    trainer = pytorch_lightning.Trainer(
        callbacks=[health], **trainer_kwargs(max_steps=5, logger=TensorBoardLogger(tmp_path, name="run"))
    )
    console, lightning_logger = _Collect(), logging.getLogger("pytorch_lightning")
    lightning_logger.addHandler(console)
    try:
        trainer.fit(model)
    finally:
        lightning_logger.removeHandler(console)
    report = health.health_report
    assert report is not None and report.step == 5
    (layer,) = report.layers
    assert layer.layer == "rnn.l0" and layer.init == "orthogonal"
    # step 0 is right after orthogonal init: every singular value and eigenvalue modulus is 1
    assert layer.spectrum_start.step == 0
    assert layer.spectrum_start.sigma_min == pytest.approx(1, abs=1e-6)
    assert layer.spectrum_start.sigma_max == pytest.approx(1, abs=1e-6)
    assert layer.spectrum_start.spectral_radius == pytest.approx(1, abs=1e-6)
    final = model.rnn.weight_hh_l0.detach().double().numpy()
    singular_values = np.linalg.svd(final, compute_uv=False)
    assert layer.spectrum_end.step == 5
    assert layer.spectrum_end.sigma_max == pytest.approx(singular_values.max(), rel=1e-9)
    assert layer.spectrum_end.sigma_min == pytest.approx(singular_values.min(), rel=1e-9)
    assert layer.spectrum_end.spectral_radius == pytest.approx(np.abs(np.linalg.eigvals(final)).max(), rel=1e-9)
    assert layer.timesteps == health.timestep_summaries["rnn.l0"]
    assert layer.verdict in VERDICTS and layer.verdict != "unmeasured"
    assert 0 <= layer.saturation <= 1
    # a threshold of 1e-6 clips every step, as torch's clip_grad_norm_ would
    assert report.clipped_fraction == 1.0 and report.nonfinite_steps == 0
    assert [message for message in console.messages if "health report" in message] == [report.format()]
    assert "clipping: 100.0% of steps" in report.format()
    events = tensorboard_events(tmp_path / "run" / "version_0")
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    assert {"gradhealth/config/text_summary", "gradhealth/report/text_summary"} <= set(texts)
    report_text = texts["gradhealth/report/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert report_text == report.markdown() and "| rnn.l0 | orthogonal |" in report_text
    table = [line for line in report_text.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in table]  # a "|" not escaped by "\\" splits cells
    assert len(table) >= 3 and len(set(cells)) == 1
    config_text = texts["gradhealth/config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert "| init | `'orthogonal'` |" in config_text and "| log_every_n_steps | `2` |" in config_text
    assert "| probe_every_n_steps | `2` |" in config_text  # the interval given here: the probe follows it


def test_a_threshold_never_reached_clips_no_step_and_without_clip_there_is_no_clip_rate():
    torch.manual_seed(0)
    for clip, expected in (("norm", 0.0), (None, None)):
        health = GradHealth(clip=clip, clip_val=1e9 if clip else None)
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=4)).fit(PLSequenceModel())
        assert health.health_report.clipped_fraction == expected
        assert ("clipping: off" in health.health_report.format()) == (clip is None)


def test_a_vanishing_layer_gets_the_vanishing_verdict_with_its_numbers():
    torch.manual_seed(0)
    model = PLSequenceModel(build=lambda: nn.RNN(3, 8, batch_first=True), seq_len=40)
    health = GradHealth(init="uniform", log_every_n_steps=1)
    with pytest.warns(UserWarning, match="vanishing gradients through time"):
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=2)).fit(model)
    (layer,) = health.health_report.layers
    assert layer.verdict == "vanishing" and layer.init.startswith("uniform")
    assert f"10^{layer.timesteps.transmission:+.1f}" in layer.reason
    assert not health.health_report.healthy and "needs attention" in health.health_report.format()
    assert math.isfinite(layer.spectrum_end.spectral_radius) and layer.spectrum_end.spectral_radius < 0.2


def test_a_new_run_with_the_same_callback_reports_only_its_own_steps():
    torch.manual_seed(0)
    health = GradHealth(clip="norm", clip_val=1e-6)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=4)).fit(PLSequenceModel())
    assert health.monitor.clip_steps == 4
    health.monitor.config = dataclasses.replace(health.monitor.config, clip_val=1e9)  # the second run never clips
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3)).fit(PLSequenceModel())
    assert health.monitor.clip_steps == 3 and health.health_report.clipped_fraction == 0.0
