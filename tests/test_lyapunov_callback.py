"""The Lyapunov exponents inside real fits: on GradHealth and GradHealthMonitor, keyed like the
norms, logged to real TensorBoard event files, in the custom-scalars layout and the report; equal
to the function on the sampled batch and the weights of that step."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth, GradHealthMonitor, tags
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.lyapunov import fused_lyapunov_exponents


class KeepLastBatch(pytorch_lightning.Callback):
    """The last training batch and the module as it was before that batch's step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch, self.model = batch, copy.deepcopy(pl_module)


def test_a_fit_keeps_logs_and_reports_the_exponents_of_the_sampled_batch(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(log_every_n_steps=2, lyapunov_k=3)
    last = KeepLastBatch()
    model = PLSequenceModel(lambda: nn.LSTM(3, 8, num_layers=2, bidirectional=True, batch_first=True), output_width=16)
    trainer = pytorch_lightning.Trainer(callbacks=[health, last], **trainer_kwargs(max_steps=17, logger=logger))
    trainer.fit(model)

    assert set(health.lyapunov_exponents) == {key for key in health.timestep_grad_norms if not key.endswith(".cell")}
    x = last.batch[0].transpose(0, 1)  # step 16 is the last sampled step
    zeros = torch.zeros(4, x.shape[1], 8)
    expected = fused_lyapunov_exponents(last.model.rnn, x, zeros, zeros, k=3)
    for (layer, reverse), exponents in expected.items():
        key = f"rnn.l{layer}" + ("_reverse" if reverse else "")
        torch.testing.assert_close(health.lyapunov_exponents[key], exponents, rtol=1e-5, atol=1e-6)

    events = tensorboard_events(logger.log_dir)
    # the probe runs every 2 steps, the exponents every PROBE_EVERY_N_LOGS x 2 = 16
    assert len(health.timestep_history["rnn.l0"]) == 9
    assert [e.step for e in events.Scalars(tags.layer_tag(LayerKey("rnn", 1, reverse=True), tags.LYAPUNOV_MAX))] == [0, 16]
    latest = events.Scalars(tags.layer_tag(LayerKey("rnn", 0), tags.LYAPUNOV_MAX))[-1].value
    assert latest == pytest.approx(float(expected[0, False][0]), rel=1e-5)
    assert tags.layer_tag(LayerKey("rnn", 0), tags.LYAPUNOV) in events.Tags()["histograms"]

    row = next(row for row in health.health_report.rows() if row["layer"] == "rnn.l0")
    exponent = float(health.lyapunov_exponents["rnn.l0"][0])
    assert row["lambda_1 (1/|lambda_1|)"] == f"{exponent:+.3f} ({1 / abs(exponent):.0f})"


def test_the_custom_scalars_layout_charts_lambda_1_per_layer(tmp_path):
    from tensorboard.plugins.custom_scalar import metadata
    from tensorboard.plugins.custom_scalar.layout_pb2 import Layout

    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = pytorch_lightning.Trainer(callbacks=[GradHealth()], **trainer_kwargs(max_steps=1, logger=logger))
    trainer.fit(PLSequenceModel())
    events = tensorboard_events(logger.log_dir)
    (tensor_event,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = Layout.FromString(tensor_event.tensor_proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    lambda_1 = charts["lambda_1, largest Lyapunov exponent (per step)"]
    assert list(lambda_1.multiline.tag) == ["^gradhealth/rnn\\.l0/3_lyapunov_max$"]


def test_lyapunov_k_zero_computes_and_logs_none(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(lyapunov_k=0)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=1, logger=logger))
    trainer.fit(PLSequenceModel())
    assert health.lyapunov_exponents == {} and "rnn.l0" in health.timestep_grad_norms
    assert not [tag for tag in tensorboard_events(logger.log_dir).Tags()["scalars"] if "lyapunov" in tag]
    assert "lambda_1 (1/|lambda_1|)" not in health.health_report.rows()[0]


def test_the_plain_pytorch_monitor_gives_the_exponents_of_a_cell_loop():
    torch.manual_seed(0)
    cell, head = nn.GRUCell(3, 6), nn.Linear(6, 1)
    model = nn.ModuleDict({"cell": cell, "head": head})
    monitor = GradHealthMonitor(log_every_n_steps=1, lyapunov_k=2)
    monitor.attach(model)
    x = torch.randn(12, 4, 3)
    monitor.start_step(0)
    h = None
    for t in range(x.shape[0]):
        h = cell(x[t], h)
    loss = head(h).pow(2).mean()
    monitor.stop_capture()
    loss.backward()
    monitor.before_optimizer_step(0, list(model.parameters()))
    monitor.detach()
    exponents = monitor.lyapunov_exponents["cell"]
    assert exponents.shape == (2,) and bool((exponents[0] >= exponents[1]) & (exponents < 0).all())


@pytest.mark.parametrize("bad, error", [({"lyapunov_k": -1}, ValueError), ({"lyapunov_warmup": 1.5}, TypeError)])
def test_bad_lyapunov_settings_fail_at_construction(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        GradHealth(**bad)
