"""Per-timestep gradient norms inside real Lightning fits, against the unrolled autograd reference."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from conftest import PLManualSequenceModel, PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth
from reference_rnn import reference_norms, unrolled


class RecordBatches(pytorch_lightning.Callback):
    """Keeps each training batch and a copy of the module as it was before that batch's step."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, nn.Module]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((batch, copy.deepcopy(pl_module)))


def _assert_measures_the_reference(health: GradHealth, seen: tuple) -> None:
    """The probe's norms equal the unrolled reference's, to 1e-5, for a batch and the model as
    :class:`RecordBatches` saw them before that step."""
    batch, model_before = seen
    for key, values in _reference_for(model_before, batch).items():
        torch.testing.assert_close(health.timestep_grad_norms[key], values, rtol=1e-5, atol=0, msg=key)


def _reference_for(model: PLSequenceModel, batch, loss_divisor: float = 1.0) -> dict[str, torch.Tensor]:
    """Norms of dL/dh_t from the unrolled reference for the test model's loss on ``batch``."""
    x, y = batch
    layer = model.rnn
    directions = 2 if layer.bidirectional else 1
    shape = (layer.num_layers * directions, x.shape[0], layer.hidden_size)
    c0 = torch.zeros(shape) if isinstance(layer, nn.LSTM) else None
    cell_type = next(name for kind, name in ((nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.RNN, "rnn_tanh")) if isinstance(layer, kind))
    output, _, _, states, cells = unrolled(layer, cell_type, x.transpose(0, 1), torch.zeros(shape), c0)
    loss = nn.functional.mse_loss(model.head(output[-1]), y) / loss_divisor
    loss.backward()
    norms = {f"rnn.{key}": reference_norms(tensors) for key, tensors in states.items()}
    norms.update({f"rnn.{key}.cell": reference_norms(tensors) for key, tensors in cells.items() if tensors[0] is not None})
    return norms


def _stacked_lstm() -> nn.Module:
    return nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)


def test_norms_in_a_real_fit_equal_the_unrolled_reference_on_the_sampled_batch(tmp_path):
    torch.manual_seed(0)
    health = GradHealth(probe_every_n_steps=2)  # every logging step of the Trainer's
    model, recorder = PLSequenceModel(build=_stacked_lstm, output_width=8), RecordBatches()
    trainer = pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=5, log_every_n_steps=2))
    trainer.fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l1_reverse"]] == [0, 2, 4]
    batch, model_before = recorder.seen[4]
    expected = _reference_for(model_before, batch)
    assert set(health.timestep_grad_norms) == set(expected)
    for key, values in expected.items():
        torch.testing.assert_close(health.timestep_grad_norms[key], values, rtol=1e-5, atol=0, msg=key)


def test_with_gradient_accumulation_the_first_micro_batch_is_measured_with_the_divided_loss():
    torch.manual_seed(0)
    health = GradHealth(probe_every_n_steps=2)
    model, recorder = PLSequenceModel(build=_stacked_lstm, output_width=8), RecordBatches()
    trainer = pytorch_lightning.Trainer(
        callbacks=[recorder, health], **trainer_kwargs(max_steps=3, log_every_n_steps=2, accumulate_grad_batches=2)
    )
    trainer.fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 2]
    batch, model_before = recorder.seen[4]  # step 2 = micro-batches 4 and 5
    for key, values in _reference_for(model_before, batch, loss_divisor=2).items():
        torch.testing.assert_close(health.timestep_grad_norms[key], values, rtol=1e-5, atol=0, msg=key)


@pytest.mark.parametrize("build", [lambda: nn.GRU(3, 8, batch_first=True), lambda: nn.RNN(3, 8, batch_first=True)])
def test_16_mixed_norms_are_unscaled(build):
    """A real GradScaler on CPU (fp16 autocast): the norms do not depend on the loss scale."""
    results = []
    for init_scale in (1.0, 4096.0):
        torch.manual_seed(0)
        health = GradHealth()
        precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
        kwargs = trainer_kwargs(max_steps=1, log_every_n_steps=1)
        trainer = pytorch_lightning.Trainer(callbacks=[health], plugins=[precision], **kwargs)
        trainer.fit(PLSequenceModel(build=build))
        results.append(health.timestep_grad_norms["rnn.l0"])
    torch.testing.assert_close(results[0], results[1], rtol=1e-3, atol=0)
    assert results[0].dtype == torch.float32 and bool((results[0] > 0).all())


def test_scalars_and_pictures_reach_the_tensorboard_event_file(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(log_every_n_steps=2, full_every_n_steps=4)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=5, logger=logger))
    trainer.fit(PLSequenceModel())
    events = tensorboard_events(logger.log_dir)
    tags = events.Tags()
    for name in ("1_transmission", "2_horizon", "rate_per_step", "dh_norm_first", "dh_norm_last"):
        assert f"gradhealth/rnn.l0/{name}" in tags["scalars"]
        assert [e.step for e in events.Scalars(f"gradhealth/rnn.l0/{name}")] == [0, 2, 4]
    assert "gradhealth/rnn.l0.cell/1_transmission" in tags["scalars"]
    last = events.Scalars("gradhealth/rnn.l0/dh_norm_last")[-1].value
    assert last == pytest.approx(health.timestep_grad_norms["rnn.l0"][-1].item(), rel=1e-6)
    for picture in ("timestep_grad_norms", "timestep_heatmap"):  # none at step 0; at the full pass and the end of fit
        images = events.Images(f"gradhealth/rnn.l0/{picture}")
        assert [image.step for image in images] == [4, 5]
        assert images[0].width > 100 and images[0].height > 100


def test_vanishing_gradients_are_reported_once_per_layer_with_numbers_and_advice():
    torch.manual_seed(0)
    health = GradHealth(init="uniform", log_every_n_steps=1)
    model = PLSequenceModel(build=lambda: nn.RNN(3, 8, batch_first=True), seq_len=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=4)).fit(model)
    ours = [str(w.message) for w in caught if "gradients through time" in str(w.message)]
    assert len(ours) == 1
    assert "vanishing gradients through time in 'rnn.l0'" in ours[0]
    assert "horizon" in ours[0] and "orthogonal" in ours[0]
    assert health.timestep_summaries["rnn.l0"].transmission < -3


class WithValidation(PLSequenceModel):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def val_dataloader(self):
        return self.train_dataloader()


def test_no_probe_during_validation_and_hooks_are_gone_after_fit():
    torch.manual_seed(0)
    model, health = WithValidation(), GradHealth(log_every_n_steps=1)

    class ProbeStateInValidation(pytorch_lightning.Callback):
        armed: list[bool] = []

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.armed.append(health.monitor._probe.armed)

    watcher = ProbeStateInValidation()
    trainer = pytorch_lightning.Trainer(
        callbacks=[health, watcher], **trainer_kwargs(max_steps=4, val_check_interval=2, num_sanity_val_steps=2)
    )
    trainer.fit(model)
    assert len(watcher.armed) > 2 and not any(watcher.armed)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1, 2, 3]
    assert not model.rnn._forward_hooks and not model.rnn._forward_hooks_with_kwargs
    pickle.dumps(model)


def test_manual_optimization_is_measured_inside_optimizer_step():
    torch.manual_seed(0)
    recorder, health = RecordBatches(), GradHealth(log_every_n_steps=2)
    model = PLManualSequenceModel(build=_stacked_lstm, output_width=8)
    pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=3)).fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 2]
    _assert_measures_the_reference(health, recorder.seen[2])


def test_timesteps_false_attaches_nothing():
    model, health = PLSequenceModel(), GradHealth(timesteps=False)

    class CheckHooks(pytorch_lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert not pl_module.rnn._forward_hooks

    pytorch_lightning.Trainer(callbacks=[health, CheckHooks()], **trainer_kwargs()).fit(model)
    assert health.timestep_grad_norms == {}


def test_inter_layer_dropout_and_a_discarded_extra_call_are_measured_without_a_notice():
    torch.manual_seed(0)

    class TwiceWithDropout(PLSequenceModel):
        def forward(self, x):
            self.rnn(x)  # an extra call whose output the loss never reaches: not measured
            return super().forward(x)

    health = GradHealth(log_every_n_steps=1)
    model = TwiceWithDropout(build=lambda: nn.GRU(3, 8, num_layers=2, dropout=0.5, batch_first=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3)).fit(model)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "GradHealth: dL/dh_t" in m or "cannot measure" in m]
    # the measured call is the one the loss reaches (the first call's output is discarded)
    assert set(health.timestep_grad_norms) == {"rnn.l0", "rnn.l1"}
    assert all(bool((v > 0).all()) for v in health.timestep_grad_norms.values())


def test_a_repeated_call_whose_output_is_discarded_is_not_the_one_measured():
    torch.manual_seed(0)

    class DiscardFirst(PLSequenceModel):
        def forward(self, x):
            self.rnn(x[:, :3])
            return super().forward(x)

    model, recorder, health = DiscardFirst(build=_stacked_lstm, output_width=8), RecordBatches(), GradHealth(log_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=1)).fit(model)
    _assert_measures_the_reference(health, recorder.seen[0])


def test_a_skipped_batch_on_a_sampled_step_does_not_leave_stale_captures():
    torch.manual_seed(0)

    class SkipFirstBatch(PLSequenceModel):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    model, recorder = SkipFirstBatch(build=_stacked_lstm, output_width=8), RecordBatches()
    health = GradHealth(log_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=2)).fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [1]  # batch 0 had no backward pass
    _assert_measures_the_reference(health, recorder.seen[1])


def test_input_passed_by_keyword_and_a_layer_subclass_are_measured():
    torch.manual_seed(0)

    class MyGRU(nn.GRU):
        def __init__(self, width: int) -> None:
            super().__init__(3, width, num_layers=2, batch_first=True)

    class Keyword(PLSequenceModel):
        def forward(self, x):
            states, _ = self.rnn(input=x)
            return self.head(states[:, -1])

    health = GradHealth(log_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=1)).fit(Keyword(build=lambda: MyGRU(8)))
    assert set(health.timestep_grad_norms) == {"rnn.l0", "rnn.l1"}
    assert all(bool((v > 0).all()) for v in health.timestep_grad_norms.values())


def test_a_second_fit_with_a_new_trainer_restarts_the_history():
    health = GradHealth(log_every_n_steps=1)
    model = PLSequenceModel()
    for _ in range(2):
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=2)).fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1]


def test_a_subclass_with_its_own_forward_is_measured_on_its_kernel_call():
    torch.manual_seed(0)

    class OutputOnly(nn.LSTM):
        def forward(self, x):
            return super().forward(x)[0]

    class UsesOutputOnly(PLSequenceModel):
        def forward(self, x):
            return self.head(self.rnn(x)[:, -1])

    model, recorder = UsesOutputOnly(build=lambda: OutputOnly(3, 8, batch_first=True)), RecordBatches()
    health = GradHealth(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=1)).fit(model)
    assert not [str(w.message) for w in caught if "dL/dh_t of 'rnn'" in str(w.message)]
    _assert_measures_the_reference(health, recorder.seen[0])


def test_a_layer_the_probe_cannot_read_is_left_out_with_one_notice_and_training_goes_on():
    torch.manual_seed(0)

    class KeywordKernel(nn.LSTM):
        def forward(self, x):  # calls the kernel itself, with keyword arguments the probe does not read
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            flat = self._flat_weights
            output, _, _ = torch._VF.lstm(x, (zeros, zeros), flat, self.bias, self.num_layers, 0.0, self.training,
                                          self.bidirectional, batch_first=True)
            return output

    class UsesOutputOnly(PLSequenceModel):
        def forward(self, x):
            return self.head(self.rnn(x)[:, -1])

    health = GradHealth(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3))
        trainer.fit(UsesOutputOnly(build=lambda: KeywordKernel(3, 8, batch_first=True)))
    assert trainer.global_step == 3
    notices = [str(w.message) for w in caught if "cannot measure dL/dh_t of 'rnn'" in str(w.message)]
    assert len(notices) == 1 and "keyword arguments" in notices[0]
    assert "rnn.l0" not in health.timestep_grad_norms
